"""Snapshots inside a training loop: restore at start, ledger per batch, cut at step
boundaries (used by ``monolith trainer``; any loop with the same shape can use it).

Call order (one object per trainer process)::

    snaps = LoopSnapshots(settings, rank, world_size, ps_addresses=..., local_shard=...)
    pending = snaps.restore_begin(source)     # before the source is read: seeks it, ledger
    ... build the model and the OnlineTrainer ...
    snaps.restore_finish(trainer)             # dense model, optimizer, RNG, metrics
    for each round r (every trainer, in lockstep):
        result = trainer.step(batch)
        snaps.after_step(batch, result)       # exactly-once ledger
        snaps.at_boundary(r, trainer, offsets_after_that_batch, flush=client.flush)
    snaps.close()

At a boundary where a snapshot is due (every ``every_steps`` rounds; with one trainer also
every ``every_s`` seconds), every trainer flushes its pushes and waits at a barrier; rank 0
cuts (PS shards over gRPC or the in-process shard, and its own state) and broadcasts the
snapshot id; the other ranks capture their state with that id; rank 0 seals in the
background. The offsets stored are the next offsets after the last *trained* batch.

Restores are job-wide: every rank restores ``trainer/<rank>`` of the newest snapshot that
holds every participant, and rank 0 makes every PS shard restore the same snapshot.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from monolith_py.errors import ConfigError, MonolithError
from monolith_py.snapshot.ledger import ExactlyOnceLedger
from monolith_py.testing.faults import fault_point

__all__ = ["LoopSettings", "LoopSnapshots"]

log = logging.getLogger("monolith.snapshot.loop")


@dataclass(frozen=True)
class LoopSettings:
    """Snapshot settings of a trainer.

    Args:
        smp_group: SMP addresses of the group by host index (empty: snapshots off).
        host_id: this trainer's host (its SMP is ``smp_group[host_id]``).
        job: job name.
        every_steps: rounds between snapshots (0: time based, one trainer only).
        every_s: seconds between snapshots (one trainer).
        restore: ``"none"``, ``"latest"`` or a snapshot id.
        checkpoint_dir, checkpoint_every: universal checkpoints every N sealed snapshots.
        trainer_hosts: home host of each rank (default: rank ``r`` on host
            ``r % len(smp_group)``; this rank always uses ``host_id``).
        timeout_s: how long a seal may wait for parts.
    """

    smp_group: tuple[str, ...] = ()
    host_id: int = 0
    job: str = "monolith"
    every_steps: int = 0
    every_s: float = 10.0
    restore: str = "none"
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    trainer_hosts: tuple[int, ...] = ()
    timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if self.smp_group and not 0 <= self.host_id < len(self.smp_group):
            raise ConfigError(f"host_id {self.host_id} is not an index of smp_group "
                              f"({len(self.smp_group)} hosts)")
        if self.restore not in ("none", "latest") and not self.restore.isdigit():
            raise ConfigError(f"restore must be 'none', 'latest' or a snapshot id, got "
                              f"{self.restore!r}")
        if self.every_steps < 0 or self.every_s < 0:
            raise ConfigError("every_steps and every_s must be >= 0")

    @property
    def enabled(self) -> bool:
        return bool(self.smp_group)


class LoopSnapshots:
    """See the module docstring."""

    def __init__(self, settings: LoopSettings, rank: int, world_size: int, *,
                 ps_addresses: Sequence[str] = (), local_shard: Any = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        from monolith_py.snapshot.coordinator import SnapshotCoordinator, SnapshotPolicy
        from monolith_py.snapshot.participant import (
            ParticipantClient,
            PSParticipant,
            TrainerParticipant,
        )
        from monolith_py.snapshot.smp import smp_clients

        if world_size > 1 and not settings.every_steps:
            raise ConfigError("several trainers snapshot in lockstep: set every_steps > 0")
        self.s = settings
        self.rank, self.world = rank, world_size
        self.clock = clock
        self.ledger = ExactlyOnceLedger()
        self.group = smp_clients(settings.smp_group)
        self.local = self.group[settings.host_id]
        self._trainer: Any = None
        self._source: Any = None
        self._pending_state: Mapping[str, Any] | None = None
        self._offsets: dict[int, int] = {}
        self.trainer_part = TrainerParticipant(
            f"trainer/{rank}", self.local, settings.host_id, self._state, self._load,
            group=self.group, job=settings.job, checkpoint_dir=settings.checkpoint_dir)
        self.ps: list[Any] = []
        if local_shard is not None:
            self.ps = [PSParticipant(local_shard, self.local, settings.host_id, group=self.group,
                                     job=settings.job, checkpoint_dir=settings.checkpoint_dir)]
        elif rank == 0:
            self.ps = [ParticipantClient(f"ps/{i}", a) for i, a in enumerate(ps_addresses)]
        self.coord: Any = None
        if rank == 0:
            hosts = settings.trainer_hosts or tuple(r % len(self.group) for r in range(world_size))
            others = {f"trainer/{r}": hosts[r] for r in range(1, world_size)}
            self.coord = SnapshotCoordinator(
                settings.job, self.group, [*self.ps, self.trainer_part], self_captured=others,
                hosts=settings.smp_group, timeout_s=settings.timeout_s,
                checkpoint_dir=settings.checkpoint_dir,
                policy=SnapshotPolicy(every_s=settings.every_s or 0.0,
                                      every_steps=settings.every_steps,
                                      checkpoint_every=settings.checkpoint_every),
                clock=clock)
        self._last_round: int | None = None
        self._last_time = clock()
        self.snapshots = 0
        self.failures = 0
        self.on_durable: Callable[[dict[int, int]], None] | None = None
        """Called with this trainer's Kafka positions of a snapshot once it is known to
        be sealed (rank 0: when its seal returns; other ranks, which are not told of
        seals: when they take the next snapshot). For lag monitoring only."""
        self._prev_captured: dict[int, int] | None = None

    # -- state of this trainer ---------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        from monolith_py.snapshot.participant import trainer_state

        st = trainer_state(self._trainer, None, self.ledger)
        st["offsets"] = dict(self._offsets)
        return st

    def _load(self, state: Mapping[str, Any]) -> None:
        self._pending_state = state

    # -- restore -----------------------------------------------------------------------------

    def restore_begin(self, source: Any) -> int | None:
        """Restore this trainer's part (and, on rank 0, every PS shard) of the newest
        complete snapshot; seek ``source`` to its offsets. Returns the snapshot id."""
        self._source = source
        if self.s.restore == "none":
            return None
        from monolith_py.snapshot.recovery import Recovery

        from monolith_py.errors import NoValidSnapshotError

        sid: int | None = None if self.s.restore == "latest" else int(self.s.restore)
        if sid is None:
            names = [f"trainer/{r}" for r in range(self.world)] + [p.name for p in self.ps]
            man = Recovery(self.group, job=self.s.job).newest_common(names)
            sid = None if man is None else man.snapshot_id
        try:
            restored = self.trainer_part.restore(sid)
        except NoValidSnapshotError as exc:
            if sid is not None or self.s.restore != "latest":
                raise
            log.info("trainer %d: nothing to restore (%s); starting fresh", self.rank,
                     str(exc).splitlines()[0])
            return None
        sid = restored.snapshot_id
        for p in self.ps:
            p.restore(sid)
        st = self._pending_state or {}
        self._offsets = {int(p): int(o) for p, o in st.get("offsets", {}).items()}
        if self._offsets and source is not None:
            source.load_state_dict(self._offsets)
        if "ledger" in st:
            self.ledger.load_state_dict(st["ledger"])
        from monolith_py.snapshot.participant import load_trainer_state

        load_trainer_state({"rng": st.get("rng", {})})
        log.info("trainer %d restored snapshot %d (step %d, %s) offsets %s", self.rank, sid,
                 restored.step, restored.source, self._offsets)
        return sid

    def restore_finish(self, trainer: Any) -> None:
        """Load the restored dense state into ``trainer`` (an ``OnlineTrainer``)."""
        self._trainer = trainer
        st = self._pending_state
        if st is not None and "trainer" in st:
            trainer.load_state_dict(st["trainer"])
        self._pending_state = None

    # -- the loop ----------------------------------------------------------------------------

    def after_step(self, batch: Any, result: Any) -> None:
        """Account a batch in the exactly-once ledger if it was trained."""
        if getattr(result, "trained", False):
            self.ledger.update(batch.example_ids)
        fault_point("trainer.step")

    def _due(self, round_: int) -> bool:
        if self.s.every_steps:
            return round_ > 0 and round_ % self.s.every_steps == 0 and round_ != self._last_round
        return self.clock() - self._last_time >= self.s.every_s

    def at_boundary(self, round_: int, trainer: Any, offsets: Mapping[Any, Any] | None,
                    flush: Callable[[], None] | None = None) -> bool:
        """Take a snapshot if one is due after round ``round_`` (every rank calls this
        every round). ``offsets``: the source position after the last trained batch."""
        self._trainer = trainer
        if offsets is not None:
            self._offsets = {int(p): int(o) for p, o in offsets.items()}
        if not self._due(round_):
            return False
        self._last_round, self._last_time = round_, self.clock()
        if flush is not None:
            flush()
        if self.world > 1:
            import torch
            import torch.distributed as dist

            dist.barrier()
            sid = torch.tensor([-1], dtype=torch.int64)
        try:
            if self.rank == 0:
                cut = self.coord.cut(int(getattr(trainer, "steps", round_)))
                sealing = self.coord._bg.submit(self._seal, cut, dict(self._offsets))
                del sealing
                if self.world > 1:
                    sid[0] = cut.snapshot_id
            if self.world > 1:
                dist.broadcast(sid, src=0)
                if self.rank != 0 and int(sid[0]) >= 0:
                    self.trainer_part.capture(int(sid[0]), round_)
                    if self._prev_captured is not None:
                        self._durable(self._prev_captured)
                    self._prev_captured = dict(self._offsets)
        except MonolithError as exc:
            self.failures += 1
            log.warning("trainer %d: snapshot at round %d failed: %s", self.rank, round_, exc)
            if self.world > 1 and self.rank == 0:
                dist.broadcast(sid, src=0)  # release the other ranks
            return False
        return True

    def _seal(self, cut: Any, offsets: dict[int, int]) -> None:
        try:
            self.coord.seal(cut)
            self.snapshots += 1
        except MonolithError as exc:
            self.failures += 1
            log.warning("snapshot %d not sealed: %s", cut.snapshot_id, exc)
            return
        self._durable(offsets)

    def _durable(self, offsets: dict[int, int]) -> None:
        hook = self.on_durable
        if hook is None or not offsets:
            return
        try:
            hook(offsets)
        except Exception:  # monitoring must never fail a snapshot or a step
            log.warning("trainer %d: on_durable hook failed", self.rank, exc_info=True)

    def wait_idle(self, timeout_s: float = 120.0) -> None:
        self.trainer_part.wait_shipped(timeout_s)
        if self.coord is not None:
            self.coord.wait_idle(timeout_s)

    def close(self) -> None:
        try:
            self.wait_idle()
        except MonolithError as exc:
            log.warning("snapshots still in flight at exit: %s", exc)
        if self.coord is not None:
            self.coord.close()
        self.trainer_part.close()
        for p in self.ps:
            p.close()
        for c in self.group.values():
            c.close()
