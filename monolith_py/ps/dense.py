"""Dense parameters across trainers: synchronous data parallelism over ``torch.distributed``.

Sparse rows live on the PS shards; the dense layers (MLPs, a few hundred KB) are
replicated on every trainer and kept identical: the same initial values (broadcast from
rank 0) and, every step, the same update -- each trainer's gradients are averaged with
one ``all_reduce`` (gloo on CPU) before the wrapped optimizer steps.

Trainers read different Kafka partitions, so they run out of data at different times,
and a step may be skipped (a bad batch). Each collective round therefore carries two
flags beside the gradients: *contributed* (this trainer has gradients this round) and
*alive* (it still has data). A trainer that has nothing to contribute joins the round
with :meth:`DataParallelOptimizer.idle_step` and applies the same averaged update, so the
replicas never diverge; when no trainer is alive every trainer leaves at the same round
and nobody waits on a collective that will never come.

Every trainer must call exactly one of ``step()`` (through its training loop) or
``idle_step()`` per round.

Example (one process; real jobs run one per trainer)::

    >>> import torch, torch.distributed as dist
    >>> dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29517",
    ...                         rank=0, world_size=1)            # doctest: +SKIP
    >>> model = torch.nn.Linear(4, 1)
    >>> opt = DataParallelOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))  # doctest: +SKIP
    >>> model(torch.ones(2, 4)).sum().backward(); opt.step()     # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from monolith_py.errors import ConfigError

__all__ = ["DataParallelOptimizer", "broadcast_parameters"]


def broadcast_parameters(module: nn.Module, src: int = 0, group: Any = None) -> None:
    """Copy every parameter and buffer of ``module`` from rank ``src`` to all ranks."""
    tensors = [p.data for p in module.parameters()] + [b for b in module.buffers()]
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])
    dist.broadcast(flat, src=src, group=group)
    offset = 0
    with torch.no_grad():
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t).to(t.dtype))
            offset += n


class DataParallelOptimizer:
    """Wraps a torch optimizer: ``step()`` averages gradients over the process group, then
    steps. Duck-types ``torch.optim.Optimizer`` for the training loop (``zero_grad``,
    ``step``, ``param_groups``, ``state_dict``, ``load_state_dict``).

    Args:
        optimizer: the dense optimizer (identical settings on every trainer).
        group: the ``torch.distributed`` process group (default: the world).

    Attributes:
        rounds: collective rounds joined so far (``step`` + ``idle_step``).
        last_contributors: trainers that contributed gradients in the last round.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, group: Any = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise ConfigError("DataParallelOptimizer needs torch.distributed initialized "
                              "(init_process_group('gloo', ...)) first")
        self.optimizer = optimizer
        self.group = group
        self.params: list[torch.Tensor] = [
            p for g in optimizer.param_groups for p in g["params"]]
        self._numel = sum(p.numel() for p in self.params)
        self.rounds = 0
        self.last_contributors = 0

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @property
    def world_size(self) -> int:
        return int(dist.get_world_size(self.group))

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Callable[[], Any] | None = None) -> None:
        """Contribute this trainer's gradients to the round and apply the average."""
        if closure is not None:
            raise ConfigError("DataParallelOptimizer.step does not take a closure")
        self._round(contributed=True, alive=True)

    def idle_step(self, alive: bool) -> bool:
        """Join a round without gradients (``alive``: this trainer still has data).
        Applies the others' average if any contributed. Returns whether any trainer is
        still alive (``False``: every trainer is done; leave the loop)."""
        return self._round(contributed=False, alive=alive)

    def _round(self, contributed: bool, alive: bool) -> bool:
        flat = torch.zeros(self._numel + 2, dtype=torch.float32)
        if contributed:
            offset = 0
            for p in self.params:
                n = p.numel()
                if p.grad is not None:
                    flat[offset : offset + n].copy_(p.grad.reshape(-1))
                offset += n
        flat[-2] = 1.0 if contributed else 0.0
        flat[-1] = 1.0 if alive else 0.0
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
        self.rounds += 1
        contributors = int(round(float(flat[-2])))
        self.last_contributors = contributors
        if contributors > 0:
            flat[: self._numel].div_(contributors)
            offset = 0
            for p in self.params:
                n = p.numel()
                p.grad = flat[offset : offset + n].view_as(p)  # fresh buffer each round
                offset += n
            self.optimizer.step()
        return float(flat[-1]) > 0

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)

    def add_param_group(self, group: dict[str, Any]) -> None:  # pragma: no cover
        raise ConfigError("add parameter groups to the wrapped optimizer before wrapping it")

