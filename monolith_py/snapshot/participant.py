"""Participants: the PS shard and trainer ends of a snapshot.

:class:`PSParticipant` wraps a :class:`~monolith_py.ps.PSShard`. ``capture`` holds the shard
lock only while the changed rows are copied into a segment leased from the host's SMP
(pre-faulted, reused); the frame checksum, the commit and the lease of the next segment
happen afterwards on a background thread, while training goes on. It is served on the PS
port (service ``monolith.snapshot.v1.Participant``: ``Capture``, ``Restore``, ``State``) so
the coordinator can trigger it; ``monolith ps --smp ...`` wires it up.

:class:`TrainerParticipant` captures whatever ``state_fn()`` returns (see
:func:`trainer_state`: trainer, Kafka offsets, ledger, RNGs, joiner) and ships it as bytes.

Both restore through :class:`~monolith_py.snapshot.recovery.Recovery` (local SMP, then
erasure decode from peers, then disk) and then forget their increment bases, so the next
capture after a restore is full.
"""

from __future__ import annotations

import logging
import os
import queue
import random
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import grpc
import numpy as np

from monolith_py.errors import DecodeError, InvalidInputError, MonolithError, SnapshotError
from monolith_py.observe.metrics import histogram
from monolith_py.snapshot.manifest import check_participant, new_capture
from monolith_py.snapshot.pspart import (CapturedPart, ShardCapturer, row_bytes,
                                         table_extra_bytes)
from monolith_py.snapshot.recovery import PartSource, Recovery, Restored
from monolith_py.snapshot.shm import attach
from monolith_py.snapshot.trainerpart import encode_trainer_part
from monolith_py.testing.faults import fault_point
from monolith_py.wire import decode_arrays, encode_arrays

__all__ = ["PSParticipant", "TrainerParticipant", "ParticipantClient", "trainer_state",
           "load_trainer_state", "PARTICIPANT_SERVICE"]

log = logging.getLogger("monolith.snapshot.participant")

PARTICIPANT_SERVICE = "monolith.snapshot.v1.Participant"
_MIN_LEASE = 1 << 20
_OVERDUE = 1.25  # a capture is overdue after this many typical intervals; also the
                 # margin a lease keeps over the increment it is meant for
_EARLY = 0.5  # ... and early before this many (an on-demand snapshot between two
              # scheduled ones): neither sizes the next lease
_RENEW_AT = 0.4  # the next lease is taken this many typical intervals after a capture


def _typical_gap(times: list[float]) -> float | None:
    """The median of the intervals between ``times`` (``None``: too few)."""
    if len(times) < 3:
        return None
    gaps = sorted(b - a for a, b in zip(times, times[1:]))
    return max(gaps[len(gaps) // 2], 0.05)


class _Shipper:
    """Background thread that finishes and commits captured parts, one at a time."""

    def __init__(self, name: str, fn: Callable[[Any], None],
                 on_idle: Callable[[], float | None] | None = None) -> None:
        self._q: queue.Queue[Any] = queue.Queue()
        self._fn = fn
        self._on_idle = on_idle  # called when the queue is empty: seconds until next call
        self._idle = threading.Event()
        self._idle.set()
        self.errors: list[str] = []
        self._t = threading.Thread(target=self._run, name=f"ship-{name}", daemon=True)
        self._t.start()

    def put(self, item: Any) -> None:
        self._idle.clear()
        self._q.put(item)

    def _run(self) -> None:
        try:  # background work (checksums, commits, leases) yields to training
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(),
                           os.getpriority(os.PRIO_PROCESS, 0) + 10)
        except (OSError, AttributeError):
            pass
        wait: float | None = None
        while True:
            try:
                item = self._q.get(timeout=wait)
            except queue.Empty:
                wait = self._tick()
                continue
            if item is None:
                return
            try:
                self._fn(item)
            except Exception as exc:
                self.errors.append(f"{type(exc).__name__}: {exc}")
                log.warning("shipping a part failed: %s: %s", type(exc).__name__, exc)
            finally:
                if self._q.empty():
                    self._idle.set()
            wait = self._tick()

    def _tick(self) -> float | None:
        """``on_idle`` once the queue is empty: seconds until the next call, or ``None``."""
        if self._on_idle is None or not self._q.empty():
            return None
        try:
            return self._on_idle()
        except Exception as exc:  # a failed lease renewal: the next part is copied
            log.warning("renewing the lease failed: %s: %s", type(exc).__name__, exc)
            return 30.0

    def wait(self, timeout_s: float) -> bool:
        return self._idle.wait(timeout_s)

    def close(self) -> None:
        self._q.put(None)
        self._t.join(timeout=30)


class PSParticipant:
    """The snapshot end of one PS shard.

    Args:
        shard: the :class:`~monolith_py.ps.PSShard`.
        smp: this host's SMP (an :class:`~monolith_py.snapshot.smp.SMPClient` or a
            :class:`~monolith_py.snapshot.store.SnapshotStore` in-process).
        host_id: this host's index (home of the shard's parts).
        group: ``{host: PartSource}`` of every SMP of the group (for restores).
        checkpoint_dir, job: for restores (disk fallback, manifest filter).
        prelease: lease (and fault in) a segment for the first, full part right away, in
            the background, so even the first capture copies at memory speed.
    """

    def __init__(self, shard: Any, smp: Any, host_id: int, *,
                 group: Mapping[int, PartSource] | None = None,
                 checkpoint_dir: str | None = None, job: str | None = None,
                 prelease: bool = True) -> None:
        self.shard = shard
        self.smp = smp
        self.host_id = int(host_id)
        self.group = dict(group or {host_id: smp})
        self.checkpoint_dir = checkpoint_dir
        self.job = job
        self.name = check_participant(f"ps/{shard.shard_id}")
        self.capturer = ShardCapturer(shard)
        self._lease: dict[str, Any] | None = None
        self._mapping: Any = None
        self._lease_lock = threading.Lock()
        self._mu = threading.Lock()
        self._captured_at: list[float] = []  # monotonic times of recent captures
        self._steady_inc = 0  # bytes of the last increment not taken after a pause
        self._renew_due: int | None = None  # bytes of a lease to take at _RENEW_AT
        self._renew_mu = threading.Lock()
        self._shipper = _Shipper(self.name, self._ship, self._watch_lease)
        self.last: dict[str, Any] = {}
        self.stalls: list[float] = []  # lock-held seconds of recent captures
        self._stall = histogram("monolith_snapshot_stall_seconds",
                                "Time training is blocked by a snapshot capture.",
                                ["participant"]).labels(self.name)
        if prelease:
            self._shipper.put("lease")

    def full_size_estimate(self) -> int:
        """Bytes of a full part of the shard now (rows, slots, metadata, small arrays)."""
        total = 1 << 20
        for t in self.shard.tables.values():
            total += int(t.stats().get("size", 0)) * row_bytes(t) + table_extra_bytes(t)
        return total

    # -- leases ------------------------------------------------------------------------------------

    def _take_lease(self, nbytes: int) -> Any:
        """``alloc`` for the capturer: the leased segment if it is big enough."""
        with self._lease_lock:
            if self._lease is not None and nbytes <= int(self._lease["capacity"]):
                return self._mapping.view
        return None

    def _renew_lease(self, nbytes: int) -> None:
        """Lease a segment of ``nbytes`` for the next part, then swap it in between two
        captures (a capture may be writing into the current one) and give the old one
        back."""
        lease = self.smp.lease(self.name, max(_MIN_LEASE, int(nbytes)))
        try:
            mapping = attach(lease["path"], int(lease["capacity"]), writable=True,
                             directory=lease.get("directory"))
        except BaseException:
            self._give_back(None, lease)
            raise
        with self._mu, self._lease_lock:
            old = (self._mapping, self._lease)
            self._mapping, self._lease = mapping, lease
        self._give_back(*old)

    def _renew_later(self, nbytes: int) -> None:
        """Lease ``nbytes`` for the next part once :data:`_RENEW_AT` typical intervals
        have passed since the last capture (right away while the interval is unknown).

        A part is committed before its snapshot is sealed, and the seal is what frees
        the segments no retained snapshot needs any more: the seal after a compaction's
        snapshot frees the whole chain the composed part replaced. A lease taken at that
        commit found the chain still in use, and the SMP made new memory for it (up to
        3 s/GiB on a VM) once every compaction cycle. By :data:`_RENEW_AT` the seal is
        long done. A capture that comes sooner takes the lease first (outside the shard
        lock)."""
        with self._renew_mu:
            self._renew_due = int(nbytes)
        if _typical_gap(self._captured_at) is None:
            self._renew_pending()

    def _renew_pending(self) -> None:
        """Take the lease :meth:`_renew_later` left due, if any (once)."""
        with self._renew_mu:
            nbytes, self._renew_due = self._renew_due, None
            if nbytes is not None:
                self._renew_lease(nbytes)

    def _drop_lease_locked(self) -> None:
        self._give_back(self._mapping, self._lease)
        self._mapping, self._lease = None, None

    def _give_back(self, mapping: Any, lease: dict[str, Any] | None) -> None:
        if mapping is not None:
            mapping.close()
        if lease is not None:
            try:
                self.smp.release(self.name, lease["segment"])
            except MonolithError:  # the SMP restarted or is down: nothing to give back
                pass

    def _watch_lease(self) -> float | None:
        """Between captures (on the shipper thread): takes the lease left due by
        :meth:`_renew_later` when its time comes; once the next capture is overdue,
        count the rows changed since the last one and lease a larger segment if the
        increment would no longer fit. After a pause in snapshots the increment grows
        past the lease, and a part that does not fit is copied into fresh private memory
        while training is blocked (hundreds of ms per 100 MB on a VM). Returns the seconds
        until the next look (``None``: not before the next capture)."""
        times, last = self._captured_at, self.last.get("snapshot_id")
        typical = _typical_gap(times)
        if self._renew_due is not None:
            wait = 0.0 if typical is None else times[-1] + _RENEW_AT * typical - time.monotonic()
            if wait > 0:
                return wait
            self._renew_pending()
        if typical is None or last is None:
            return None
        due = times[-1] + _OVERDUE * typical - time.monotonic()
        if due > 0:
            return due
        est = self.capturer.estimate_inc_bytes(int(last))
        with self._lease_lock:
            cap = int(self._lease["capacity"]) if self._lease is not None else 0
        if est is not None and _OVERDUE * est > cap:
            log.info("%s: the next increment grew to about %.0f MB (lease %.0f MB): "
                     "leasing a larger segment", self.name, est / 1e6, cap / 1e6)
            self._renew_lease(int(1.5 * est))
        return max(0.5, 0.5 * typical)

    # -- capture -----------------------------------------------------------------------------------

    def capture(self, snapshot_id: int, step: int, base_id: int | None) -> dict[str, Any]:
        """Take this shard's part of the cut (returns once the lock is released; the part
        is committed to the SMP in the background)."""
        try:  # an early capture: its lease is not taken yet
            self._renew_pending()
        except Exception as exc:  # the part is then copied into new memory
            log.warning("%s: leasing a segment for the capture failed: %s: %s", self.name,
                        type(exc).__name__, exc)
        with self._mu:
            fault_point("ps.capture")
            token = new_capture()  # tells this capture's part from an earlier run's
            part = self.capturer.capture(snapshot_id, step, base_id, alloc=self._take_lease,
                                         extra_meta={"participant": self.name, "capture": token})
            now, times = time.monotonic(), self._captured_at
            typical = _typical_gap(times)
            off_time = typical is not None and not (
                _EARLY * typical <= now - times[-1] <= _OVERDUE * typical)
            self._captured_at = (times + [now])[-6:]
            self._stall.observe(part.stall_s)
            self.stalls = (self.stalls + [part.stall_s])[-1000:]
            lease = mapping = None
            with self._lease_lock:
                if self._mapping is not None and part.buffer is self._mapping.view:
                    lease, mapping = self._lease, self._mapping  # handed over with the part
                    self._lease, self._mapping = None, None
            self.last = {"snapshot_id": snapshot_id, "kind": part.kind, "rows": part.rows,
                         "nbytes": part.nbytes, "stall_s": part.stall_s, "home": self.host_id,
                         "base_id": part.base_id, "leased": lease is not None, "capture": token}
            self._shipper.put((part, lease, mapping, off_time))
            return dict(self.last)

    def _ship(self, item: Any) -> None:
        if item == "lease":  # a full part next: this lease replaces any still due
            with self._renew_mu:
                self._renew_due = None
                self._renew_lease(int(1.1 * self.full_size_estimate()))
            return
        part, lease, mapping, off_time = item
        part.finish()
        nbytes, kind = part.nbytes, part.kind
        fault_point("ps.commit")
        if lease is not None:
            try:
                self.smp.commit(self.name, lease["segment"], nbytes)
            except InvalidInputError as exc:  # the SMP restarted: its leases are gone
                log.info("%s: lease lost (%s); copying the part into a new one", self.name, exc)
                self._commit_copy(part)
            del part, item
            mapping.close()
        elif nbytes < (48 << 20):
            self.smp.put_part(self.name, part.frame())
        else:
            self._commit_copy(part)
        # room for the next increment if it grows by half over the last one taken on
        # time (a longer pause is caught by _watch_lease); not more, or the leases after
        # one large increment would take the segment a compaction needs next. An early
        # one is small: a lease sized on it would make the next on-time increment miss
        # it and be copied into new memory inside the stall (~400 ms for 130 MB here)
        if kind == "inc" and (not off_time or not self._steady_inc):
            self._steady_inc = nbytes
        self._renew_later(int(1.5 * self._steady_inc) if kind == "inc" else int(0.5 * nbytes))

    def _commit_copy(self, part: CapturedPart) -> None:
        lease = self.smp.lease(self.name, part.nbytes)
        m = attach(lease["path"], int(lease["capacity"]), writable=True,
                   directory=lease.get("directory"))
        try:
            m.view[: part.nbytes] = part.frame()
        finally:
            m.close()
        self.smp.commit(self.name, lease["segment"], part.nbytes)

    def wait_shipped(self, timeout_s: float = 60.0) -> None:
        """Block until every captured part was handed to the SMP."""
        if not self._shipper.wait(timeout_s):
            raise SnapshotError(f"{self.name}: parts not shipped within {timeout_s} s")

    # -- restore -----------------------------------------------------------------------------------

    def restore(self, snapshot_id: int | None = None, num_shards: int | None = None) -> Restored:
        """Load the shard's state at ``snapshot_id`` (``None``: newest that rebuilds)."""
        rec = Recovery(self.group, self.host_id, checkpoint_dir=self.checkpoint_dir,
                       job=self.job)
        try:
            restored = rec.restore(self.name, snapshot_id,
                                   num_shards=num_shards or self.shard.num_shards,
                                   stage=self._stage)
            self.shard.load_state_dict(restored.state)
        finally:
            rec.close()
        self.capturer.forget()
        self._captured_at, self._steady_inc = [], 0
        self._shipper.put("lease")  # the next part is full: lease for its size
        return restored

    def _stage(self, table: str, rows: int) -> Any:
        """Compose a restored table straight into a staged arena of the shard's table (the
        load then adopts it: the rows are written once)."""
        t = self.shard.tables.get(table)
        if t is None or not hasattr(t, "staged_state"):
            return None
        with self.shard.lock:
            return t.staged_state(rows)

    # -- gRPC --------------------------------------------------------------------------------------

    def handler(self) -> grpc.GenericRpcHandler:
        """The ``monolith.snapshot.v1.Participant`` service for the PS server."""
        def wrap(fn: Callable[[dict[str, Any]], dict[str, Any]]) -> Any:
            def handle(request: bytes, context: grpc.ServicerContext) -> bytes:
                try:
                    _, meta = decode_arrays(request, require_checksum=True)
                    return encode_arrays({}, fn(meta))
                except (DecodeError, InvalidInputError) as exc:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc)[:4000])
                except MonolithError as exc:
                    context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                  f"{type(exc).__name__}: {exc}"[:4000])
                return b""  # pragma: no cover
            return grpc.unary_unary_rpc_method_handler(handle)

        return grpc.method_handlers_generic_handler(PARTICIPANT_SERVICE, {
            "Capture": wrap(self._rpc_capture), "Restore": wrap(self._rpc_restore),
            "LoadCheckpoint": wrap(self._rpc_load_checkpoint),
            "Digest": wrap(self._rpc_digest)})

    def _rpc_capture(self, m: dict[str, Any]) -> dict[str, Any]:
        sid, step, base = m.get("snapshot_id"), m.get("step"), m.get("base_id")
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (sid, step)):
            raise InvalidInputError("snapshot_id and step must be ints >= 0")
        if base is not None and (not isinstance(base, int) or isinstance(base, bool)):
            raise InvalidInputError("base_id must be an int or null")
        return self.capture(sid, step, base)  # type: ignore[arg-type]

    def _rpc_restore(self, m: dict[str, Any]) -> dict[str, Any]:
        sid = m.get("snapshot_id")
        if sid is not None and (not isinstance(sid, int) or isinstance(sid, bool)):
            raise InvalidInputError("snapshot_id must be an int or null")
        r = self.restore(sid)
        return {"snapshot_id": r.snapshot_id, "step": r.step, "source": r.source,
                "log": r.log[-20:]}

    def load_checkpoint(self, path: str) -> dict[str, Any]:
        """Load a universal checkpoint (any source shard count) into the shard."""
        from monolith_py.snapshot.checkpoint import load_checkpoint

        ckpt = load_checkpoint(path)
        self.shard.load_state_dict(ckpt.shard_state(self.shard.shard_id, self.shard.num_shards))
        self.capturer.forget()
        return {"shard": self.shard.shard_id, "snapshot_id": ckpt.snapshot_id,
                "step": ckpt.step, "source_shards": ckpt.num_shards,
                "keys": {n: len(t) for n, t in self.shard.tables.items()}}

    def _rpc_load_checkpoint(self, m: dict[str, Any]) -> dict[str, Any]:
        path = m.get("path")
        if not isinstance(path, str) or not path:
            raise InvalidInputError("'path' must be a checkpoint directory")
        return self.load_checkpoint(path)

    def _rpc_digest(self, m: dict[str, Any]) -> dict[str, Any]:
        from monolith_py.testing.state import state_digest

        return {"digest": state_digest(self.shard.state_dict())}

    def close(self) -> None:
        self._shipper.close()
        with self._lease_lock:
            self._drop_lease_locked()


class ParticipantClient:
    """The coordinator's handle on a remote :class:`PSParticipant` (on a PS address)."""

    def __init__(self, name: str, address: str, timeout_s: float = 60.0) -> None:
        self.name = check_participant(name)
        self.address = address
        self.timeout_s = timeout_s
        self._channel = grpc.insecure_channel(address)

    def _call(self, method: str, meta: Mapping[str, Any], timeout_s: float | None = None
              ) -> dict[str, Any]:
        from monolith_py.errors import UnavailableError

        stub = self._channel.unary_unary(f"/{PARTICIPANT_SERVICE}/{method}")
        try:
            raw = stub(encode_arrays({}, dict(meta)), timeout=timeout_s or self.timeout_s)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            msg = f"{self.name} at {self.address} {method}: {exc.details() if hasattr(exc, 'details') else exc}"
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED,
                        grpc.StatusCode.DEADLINE_EXCEEDED):
                raise UnavailableError(msg) from None
            raise SnapshotError(msg) from None
        return decode_arrays(raw, require_checksum=True)[1]

    def capture(self, snapshot_id: int, step: int, base_id: int | None) -> dict[str, Any]:
        return self._call("Capture", {"snapshot_id": snapshot_id, "step": step,
                                      "base_id": base_id})

    def restore(self, snapshot_id: int | None = None) -> dict[str, Any]:
        return self._call("Restore", {"snapshot_id": snapshot_id}, timeout_s=600.0)

    def digest(self) -> str:
        return str(self._call("Digest", {})["digest"])

    def load_checkpoint(self, path: str) -> dict[str, Any]:
        return self._call("LoadCheckpoint", {"path": path}, timeout_s=600.0)

    def close(self) -> None:
        self._channel.close()


# -- trainers ------------------------------------------------------------------------------------

def trainer_state(trainer: Any = None, source: Any = None, ledger: Any = None,
                  joiner: Any = None, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What a trainer snapshots: ``trainer.state_dict()`` (dense model and optimizer, torch
    RNG, metrics, counters), ``source.state_dict()`` (next offset per partition),
    ``ledger.state_dict()``, numpy and python RNG states, ``joiner.state_dict()``."""
    out: dict[str, Any] = {"rng": {"numpy": np.random.get_state(), "python": random.getstate()}}
    if trainer is not None:
        out["trainer"] = trainer.state_dict()
    if source is not None:
        out["offsets"] = {int(p): int(o) for p, o in source.state_dict().items()}
    if ledger is not None:
        out["ledger"] = ledger.state_dict()
    if joiner is not None:
        out["joiner"] = joiner.state_dict()
    if extra:
        out["extra"] = dict(extra)
    return out


def load_trainer_state(state: Mapping[str, Any], trainer: Any = None, source: Any = None,
                       ledger: Any = None, joiner: Any = None) -> None:
    """Inverse of :func:`trainer_state` (components not given are skipped)."""
    rng = state.get("rng", {})
    if "numpy" in rng:
        np.random.set_state(rng["numpy"])
    if "python" in rng:
        random.setstate(rng["python"])
    for name, obj in (("trainer", trainer), ("offsets", source), ("ledger", ledger),
                      ("joiner", joiner)):
        if obj is not None:
            if name not in state:
                raise InvalidInputError(f"trainer snapshot has no {name!r} state")
            obj.load_state_dict(state[name])


class TrainerParticipant:
    """The snapshot end of a trainer (any process whose state fits in memory twice).

    Args:
        name: ``trainer/<rank>``.
        smp: this host's SMP (client or in-process store).
        host_id: this host's index.
        state_fn: returns the state to snapshot (e.g. ``lambda: trainer_state(...)``).
        load_fn: loads a restored state.
        group, checkpoint_dir, job: for restores.
    """

    def __init__(self, name: str, smp: Any, host_id: int, state_fn: Callable[[], Mapping[str, Any]],
                 load_fn: Callable[[Mapping[str, Any]], None], *,
                 group: Mapping[int, PartSource] | None = None,
                 checkpoint_dir: str | None = None, job: str | None = None) -> None:
        self.name = check_participant(name)
        self.smp = smp
        self.host_id = int(host_id)
        self.state_fn = state_fn
        self.load_fn = load_fn
        self.group = dict(group or {host_id: smp})
        self.checkpoint_dir = checkpoint_dir
        self.job = job
        self._shipper = _Shipper(self.name, self._ship)
        self.last: dict[str, Any] = {}

    def capture(self, snapshot_id: int, step: int, base_id: int | None = None) -> dict[str, Any]:
        """Encode the state now (a copy: the cut) and ship it in the background."""
        t0 = time.perf_counter()
        fault_point("trainer.capture")
        token = new_capture()
        frame = encode_trainer_part(self.state_fn(), self.name, snapshot_id, step, capture=token)
        stall = time.perf_counter() - t0
        self._shipper.put(frame)
        self.last = {"snapshot_id": snapshot_id, "kind": "full", "nbytes": len(frame),
                     "stall_s": stall, "home": self.host_id, "base_id": -1, "capture": token}
        return dict(self.last)

    def _ship(self, frame: bytes) -> None:
        fault_point("trainer.commit")
        self.smp.put_part(self.name, frame)

    def wait_shipped(self, timeout_s: float = 60.0) -> None:
        if not self._shipper.wait(timeout_s):
            raise SnapshotError(f"{self.name}: part not shipped within {timeout_s} s")

    def restore(self, snapshot_id: int | None = None) -> Restored:
        rec = Recovery(self.group, self.host_id, checkpoint_dir=self.checkpoint_dir, job=self.job)
        try:
            restored = rec.restore(self.name, snapshot_id)
        finally:
            rec.close()
        self.load_fn(restored.state)
        return restored

    def close(self) -> None:
        self._shipper.close()
