"""``ShardedBackend``: the single-process mode of the parameter server.

The same :class:`~monolith_py.ps.PSShard` objects a PS process would serve, called
directly (no RPC, no copies of the rows beyond putting them back in order), with the same
routing as :class:`~monolith_py.ps.PSClient`. With one shard it is the embedded default;
with several it lets a single process hold exactly the state a multi-process job would
(and tests compare the two).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from monolith_py.errors import InvalidInputError
from monolith_py.ps import _router
from monolith_py.ps.shard import PSShard
from monolith_py.table import TableConfig

__all__ = ["ShardedBackend"]


class ShardedBackend:
    """:class:`~monolith_py.table.backend.SparseBackend` over in-process shards.

    Args:
        shards: shard ``i`` of ``n`` at position ``i``; all with the same tables.

    Example::

        >>> import torch
        >>> from monolith_py.table import TableConfig
        >>> backend = ShardedBackend.build([TableConfig("user", dim=4)], num_shards=2)
        >>> rows = backend.lookup({"user": torch.tensor([3, 9, 12])}, train=True)
        >>> rows["user"].shape
        torch.Size([3, 4])
        >>> backend.apply_gradients({"user": (torch.tensor([3, 9, 12]), torch.ones(3, 4))}, 7)
        >>> backend.stats()["user"]["size"]
        3
    """

    def __init__(self, shards: Sequence[PSShard]) -> None:
        shards = list(shards)
        if not shards:
            raise InvalidInputError("ShardedBackend needs at least one shard")
        n = len(shards)
        for i, s in enumerate(shards):
            if not isinstance(s, PSShard) or s.shard_id != i or s.num_shards != n:
                raise InvalidInputError(
                    f"position {i} must hold shard {i} of {n}, got {s!r}")
            if s.dims != shards[0].dims:
                raise InvalidInputError(
                    f"shard {i} has tables {s.dims}, shard 0 has {shards[0].dims}")
        self._shards = shards
        self._dims = shards[0].dims

    @classmethod
    def build(cls, tables: Sequence[TableConfig], num_shards: int = 1) -> ShardedBackend:
        """New empty shards ``0..num_shards-1`` of ``tables``."""
        return cls([PSShard(i, num_shards, tables) for i in range(num_shards)])

    @property
    def shards(self) -> list[PSShard]:
        return list(self._shards)

    @property
    def dims(self) -> dict[str, int]:
        return dict(self._dims)

    # -- SparseBackend ------------------------------------------------------------------------

    def lookup(self, keys: Mapping[str, torch.Tensor], train: bool) -> dict[str, torch.Tensor]:
        checked = _router.check_keys(keys, self._dims)
        if len(self._shards) == 1:  # the embedded default: no routing, no reordering
            return _router.to_torch(self._shards[0].pull_many(checked, train))
        out = _router.new_rows(checked, self._dims)
        for shard, parts in zip(self._shards, _router.split(checked, len(self._shards))):
            if not parts:
                continue
            rows = shard.pull_many({p.table: p.keys for p in parts}, train)
            for p in parts:
                _router.scatter_rows(out[p.table], p.pos, rows[p.table])
        return _router.to_torch(out)

    def apply_gradients(self, grads: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                        now: int) -> None:
        checked = _router.check_grads(grads, self._dims)
        if len(self._shards) == 1:
            self._shards[0].push_many(checked, int(now))
            return
        keys = {t: k for t, (k, _) in checked.items()}
        for shard, parts in zip(self._shards, _router.split(keys, len(self._shards))):
            if parts:
                shard.push_many({p.table: (p.keys, _router.gather_rows(checked[p.table][1], p.pos))
                                 for p in parts},
                                int(now))

    def evict_expired(self, now: int) -> dict[str, int]:
        total = {t: 0 for t in self._dims}
        for shard in self._shards:
            for t, n in shard.evict_expired(int(now)).items():
                total[t] += n
        return total

    def stats(self) -> dict[str, dict[str, Any]]:
        return _router.merge_stats([s.stats() for s in self._shards])

    # -- state ----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """``{"shards": [shard.state_dict(), ...]}``."""
        return {"shards": [s.state_dict() for s in self._shards]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        parts = state.get("shards") if isinstance(state, Mapping) else None
        if not isinstance(parts, list) or len(parts) != len(self._shards):
            raise InvalidInputError(
                f"expected the state of {len(self._shards)} shards, got "
                f"{len(parts) if isinstance(parts, list) else type(parts).__name__}")
        for s, sd in zip(self._shards, parts):
            s.load_state_dict(sd)
