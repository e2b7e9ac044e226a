"""The snapshot coordinator (trainer rank 0): when to snapshot, the cut, and the seal.

Call order, at a step boundary where every trainer finished step ``s`` and every push was
acknowledged (the training loop's barrier):

1. :meth:`SnapshotCoordinator.cut` — picks the next snapshot id, triggers every participant
   it drives (PS shards over gRPC, in-process trainers) in parallel, and returns once all
   have captured: training may resume. Trainers on other ranks capture themselves at the
   same step with the same id (``coordinator.next_id`` is deterministic: last id + 1).
2. :meth:`SnapshotCoordinator.seal` — may run on a background thread: waits until every
   part's home SMP reports the part stored and all its blocks placed, builds the
   :class:`~monolith_py.snapshot.manifest.Manifest` and writes it to every SMP of the
   group. A snapshot whose parts did not all arrive is abandoned (never sealed); its data
   is freed by the SMPs' retention once a newer snapshot is sealed.
3. every ``checkpoint_every`` sealed snapshots, a universal checkpoint is written to disk
   from the SMPs (background thread, off the training path).

:class:`SnapshotPolicy` is the pure "is a snapshot due?" rule (time passed in).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from monolith_py.errors import ConfigError, MonolithError, ShardError, SnapshotError
from monolith_py.observe.metrics import counter, gauge, histogram
from monolith_py.snapshot.manifest import Manifest, PartRecord, check_participant
from monolith_py.snapshot.recovery import Recovery
from monolith_py.testing.faults import fault_point

__all__ = ["SnapshotPolicy", "Cut", "SnapshotCoordinator"]

log = logging.getLogger("monolith.snapshot.coordinator")

_CUT_CHAINS_AT = 16  # chains longer than this start at an SMP-composed full part if any


@dataclass(frozen=True)
class SnapshotPolicy:
    """When snapshots and checkpoints are due.

    Args:
        every_s: seconds between snapshots (0: not time based).
        every_steps: steps between snapshots (0: not step based).
        checkpoint_every: write a universal checkpoint every this many sealed snapshots
            (0: only on demand).

    Example::

        >>> SnapshotPolicy(every_s=10).due(now_s=25.0, step=7, last_s=14.0, last_step=3)
        True
    """

    every_s: float = 10.0
    every_steps: int = 0
    checkpoint_every: int = 0

    def __post_init__(self) -> None:
        if self.every_s < 0 or self.every_steps < 0 or self.checkpoint_every < 0:
            raise ConfigError("SnapshotPolicy values must be >= 0 (0 disables)")
        if not self.every_s and not self.every_steps:
            raise ConfigError("SnapshotPolicy needs every_s > 0 or every_steps > 0")

    def due(self, *, now_s: float, step: int, last_s: float | None, last_step: int | None) -> bool:
        """Whether a snapshot is due at ``step`` and time ``now_s`` (``last_*``: the
        previous snapshot, ``None`` if none)."""
        if last_s is None or last_step is None:
            return True
        if self.every_steps and step - last_step >= self.every_steps:
            return True
        return bool(self.every_s) and now_s - last_s >= self.every_s


@dataclass
class Cut:
    """A snapshot whose parts were captured (not yet sealed)."""

    snapshot_id: int
    step: int
    base_id: int | None
    captured: dict[str, dict[str, Any]] = field(default_factory=dict)
    stall_s: float = 0.0
    started_s: float = 0.0


class SnapshotCoordinator:
    """Drives snapshots of one job.

    Args:
        job: job name (must match the SMPs').
        smps: ``{host: SMP client}`` of the group (objects with ``wait_part`` and ``seal``).
        triggered: participants this coordinator triggers (objects with ``name`` and
            ``capture(snapshot_id, step, base_id) -> {"kind", "home", ...}``): PS shards
            (:class:`~monolith_py.snapshot.participant.ParticipantClient`) and in-process
            trainers.
        self_captured: ``{participant: home host}`` of trainers on other ranks that capture
            themselves at the same step and id (their parts are always full).
        hosts: SMP addresses recorded in manifests.
        timeout_s: how long to wait for a part to be placed.
        checkpoint_dir: where universal checkpoints go (``None``: never).
        policy: :class:`SnapshotPolicy`.
        info: JSON facts stored in every manifest (``num_shards``, tables...).
        start_id: the last snapshot id used (default: the newest sealed in the SMPs).
    """

    def __init__(self, job: str, smps: Mapping[int, Any], triggered: Sequence[Any] = (), *,
                 self_captured: Mapping[str, int] | None = None, hosts: Sequence[str] = (),
                 timeout_s: float = 120.0, checkpoint_dir: str | None = None,
                 policy: SnapshotPolicy | None = None, info: Mapping[str, Any] | None = None,
                 start_id: int | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        if not smps:
            raise ConfigError("the coordinator needs the SMPs of the group")
        self.job = job
        self.smps = dict(smps)
        self.triggered = list(triggered)
        self.self_captured = {check_participant(p): int(h)
                              for p, h in (self_captured or {}).items()}
        names = [t.name for t in self.triggered] + list(self.self_captured)
        if len(set(names)) != len(names) or not names:
            raise ConfigError(f"participants must be distinct and non-empty, got {names}")
        self.hosts = tuple(hosts)
        self.timeout_s = float(timeout_s)
        self.checkpoint_dir = checkpoint_dir
        self.policy = policy or SnapshotPolicy()
        self.info = dict(info or {})
        self.clock = clock
        self._pool = ThreadPoolExecutor(max_workers=max(4, len(self.triggered)),
                                        thread_name_prefix="coord")
        self._bg = ThreadPoolExecutor(max_workers=1, thread_name_prefix="coord-seal")
        self._ckpt = ThreadPoolExecutor(max_workers=1, thread_name_prefix="coord-ckpt")
        self._mu = threading.Lock()
        self.last_sealed: Manifest | None = None
        self.sealed_count = 0
        self.last_checkpoint: str | None = None
        self._last_time: float | None = None
        self._records: dict[Any, PartRecord] | None = None
        self._records_age = 0
        self._last_step: int | None = None
        if start_id is None:
            # ids are never taken again: a run killed before its seal may have left parts
            # of the next ids on the SMPs, and a part of this run under the same key would
            # be confused with them (the old record sealed over the new data)
            cat = Recovery(self.smps, job=job).catalog()
            if cat.manifests:
                self.last_sealed = cat.manifests[max(cat.manifests)]
            start_id = cat.newest_id
        self._last_id = int(start_id)
        self._m_stall = histogram("monolith_snapshot_cut_seconds",
                                  "Time training is paused for a snapshot cut.", ["job"]).labels(job)
        self._m_seal = histogram("monolith_snapshot_seal_seconds",
                                 "From cut to sealed manifest.", ["job"]).labels(job)
        self._m_sealed = counter("monolith_snapshots_sealed_total", "Snapshots sealed.",
                                 ["job"]).labels(job)
        self._m_failed = counter("monolith_snapshots_failed_total",
                                 "Snapshots abandoned before their seal.", ["job"]).labels(job)
        self._m_bytes = gauge("monolith_snapshot_bytes", "Bytes of the last sealed snapshot.",
                              ["job"]).labels(job)

    @property
    def next_id(self) -> int:
        return self._last_id + 1

    def due(self, step: int) -> bool:
        return self.policy.due(now_s=self.clock(), step=step, last_s=self._last_time,
                               last_step=self._last_step)

    # -- the cut ---------------------------------------------------------------------------------

    def cut(self, step: int) -> Cut:
        """Capture every triggered participant at ``step`` (the caller guarantees that
        training is paused at the step boundary). Raises :class:`ShardError` naming every
        participant that failed (the snapshot is then abandoned)."""
        with self._mu:
            self._last_id += 1
            sid = self._last_id
            base = self.last_sealed.snapshot_id if self.last_sealed is not None else None
        t0 = time.perf_counter()
        cut = Cut(sid, int(step), base, started_s=t0)
        futs = {t.name: self._pool.submit(t.capture, sid, int(step), base) for t in self.triggered}
        errors: dict[object, BaseException] = {}
        for name, f in futs.items():
            try:
                cut.captured[name] = f.result()
            except Exception as exc:
                errors[name] = exc
        cut.stall_s = time.perf_counter() - t0
        self._m_stall.observe(cut.stall_s)
        self._last_time, self._last_step = self.clock(), int(step)
        if errors:
            self._m_failed.inc()
            raise ShardError(f"snapshot {sid} capture", errors)
        fault_point("coord.cut")
        return cut

    # -- the seal --------------------------------------------------------------------------------

    def seal(self, cut: Cut) -> Manifest:
        """Wait for every part and its blocks, then seal the manifest on every SMP."""
        try:
            return self._seal(cut)
        except BaseException:
            self._m_failed.inc()
            raise

    def _seal(self, cut: Cut) -> Manifest:
        want: dict[str, tuple[int, str]] = {
            name: (int(info["home"]), str(info["kind"])) for name, info in cut.captured.items()}
        want.update({p: (h, "full") for p, h in self.self_captured.items()})
        # the capture's token, where the participant gave one, picks its own part
        tokens = {name: info.get("capture") for name, info in cut.captured.items()}
        futs = {p: self._pool.submit(self._smp(h).wait_part, p, cut.snapshot_id, kind,
                                     self.timeout_s, tokens.get(p))
                for p, (h, kind) in want.items()}
        parts: dict[str, PartRecord] = {}
        errors: dict[object, BaseException] = {}
        for p, f in futs.items():
            try:
                parts[p] = f.result()
            except Exception as exc:
                errors[p] = exc
        if errors:
            raise ShardError(f"snapshot {cut.snapshot_id} placement", errors)
        chains = {p: self._base_chain(p, rec) for p, rec in parts.items() if rec.kind == "inc"}
        man = Manifest(self.job, cut.snapshot_id, cut.step, parts, hosts=self.hosts,
                       created_s=time.time(), info=self.info, chains=chains)
        raw = man.encode()
        fault_point("coord.seal.begin")
        seal_errors: dict[object, BaseException] = {}
        for host, smp in sorted(self.smps.items()):
            try:
                smp.seal(raw)
            except MonolithError as exc:
                seal_errors[f"smp {host}"] = exc
            fault_point("coord.seal")
        if seal_errors:
            raise ShardError(f"snapshot {cut.snapshot_id} seal", seal_errors)
        with self._mu:
            self.last_sealed = man
            self.sealed_count += 1
            self._records_age += 1
            count = self.sealed_count
        self._m_seal.observe(time.perf_counter() - cut.started_s)
        self._m_sealed.inc()
        self._m_bytes.set(sum(r.size for r in parts.values()))
        log.info("snapshot %d (step %d) sealed: %d parts, %d bytes, cut %.1f ms", man.snapshot_id,
                 man.step, len(parts), sum(r.size for r in parts.values()), 1e3 * cut.stall_s)
        every = self.policy.checkpoint_every
        if self.checkpoint_dir and every and count % every == 0:
            self._ckpt.submit(self._checkpoint_quietly, man)
        return man

    def _base_chain(self, p: str, rec: PartRecord) -> tuple[PartRecord, ...]:
        """The chain an increment applies to: its base manifest's chain of ``p``."""
        base = self.last_sealed
        if base is None or base.snapshot_id != rec.base_id:
            base = Recovery(self.smps, job=self.job).catalog().manifests.get(rec.base_id)
        if base is None or p not in base.parts:
            raise SnapshotError(f"{p}: the base snapshot {rec.base_id} of its increment is "
                                "not sealed anywhere")
        chain = base.chain(p)
        if len(chain) > _CUT_CHAINS_AT:  # start from the newest full part an SMP composed
            if self._records_age >= _CUT_CHAINS_AT or self._records is None:
                self._records = Recovery(self.smps, job=self.job).catalog().records
                self._records_age = 0
            for i in range(len(chain) - 1, 0, -1):
                full = self._records.get((p, chain[i].snapshot_id, "full"))
                if full is not None:
                    return (full, *chain[i + 1:])
        return chain

    def _smp(self, host: int) -> Any:
        smp = self.smps.get(host)
        if smp is None:
            raise SnapshotError(f"no SMP for host {host}")
        return smp

    def snapshot(self, step: int, *, background: bool = False) -> Manifest | Future[Manifest]:
        """:meth:`cut` then :meth:`seal` (on a background thread when ``background``)."""
        cut = self.cut(step)
        if background:
            return self._bg.submit(self.seal, cut)
        return self.seal(cut)

    # -- universal checkpoints -------------------------------------------------------------------

    def checkpoint(self, manifest: Manifest | None = None) -> str:
        """Write a universal checkpoint of ``manifest`` (default: the last sealed) now."""
        from monolith_py.snapshot.checkpoint import write_checkpoint

        man = manifest or self.last_sealed
        if man is None or not self.checkpoint_dir:
            raise SnapshotError("nothing sealed yet, or no checkpoint_dir")
        rec = Recovery(self.smps, job=self.job)
        try:
            path = write_checkpoint(self.checkpoint_dir, man, rec)
        finally:
            rec.close()
        self.last_checkpoint = path
        return path

    def _checkpoint_quietly(self, man: Manifest) -> None:
        try:
            self.checkpoint(man)
        except Exception as exc:
            log.warning("checkpoint of snapshot %d failed: %s: %s", man.snapshot_id,
                        type(exc).__name__, exc)

    def wait_idle(self, timeout_s: float = 120.0) -> None:
        """Wait for background seals and checkpoints submitted so far."""
        for ex in (self._bg, self._ckpt):
            ex.submit(lambda: None).result(timeout=timeout_s)

    def close(self) -> None:
        for ex in (self._bg, self._ckpt, self._pool):
            ex.shutdown(wait=True, cancel_futures=False)
