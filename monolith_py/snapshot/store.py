"""The snapshot manager's state and logic (no RPC): parts, blocks, catalog, retention.

One :class:`SnapshotStore` runs in each SMP process (see :mod:`monolith_py.snapshot.smp`
for its gRPC face). What it does, in the order a snapshot flows through it:

1. **lease / commit** — a participant on this host leases a pre-faulted segment, writes
   its part frame into it and commits it (or sends the bytes with :meth:`put_part`). The
   frame is validated (checksum, participant, ids) before it is adopted.
2. **encode and place** (worker thread) — the part is cut into ``k`` data blocks plus
   ``m - k`` zfec parity, streamed chunk by chunk to the SMPs of hosts ``home + i``; the
   crc32c of every block goes into the part's :class:`PartRecord`.
3. **wait_part** — the coordinator collects the records; it seals only when all arrived.
4. **seal** — a manifest arrives; retention keeps the newest ``keep`` sealed snapshots and
   the parts their increment chains need, frees the rest (segments are recycled).
5. **compaction** — when a home part's chain reaches ``full_every`` increments, the worker
   composes a full part off the training path, erasure-codes it like any part and
   broadcasts its record (:meth:`put_record`), after which the old chain can be freed.

Thread-safety: every public method may be called from any thread (gRPC handlers); long
work (checksums, coding, transfers) runs outside the lock on pinned blobs.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import crc32c
import numba

from monolith_py.errors import (
    ConfigError,
    CorruptDataError,
    DeadlineExceededError,
    DecodeError,
    InvalidInputError,
    MonolithError,
    SnapshotError,
    UnavailableError,
)
from monolith_py.observe.metrics import counter, gauge, histogram
from monolith_py.snapshot.codec import (
    CodecConfig,
    ParityEncoder,
    block_placement,
    block_size,
    crc32c_combine,
    data_block,
)
from monolith_py.snapshot.blocks import BlockKey, block_frame, decode_block_frame
from monolith_py.snapshot.maintenance import compact, repair, repair_manifest
from monolith_py.snapshot.manifest import (
    Manifest,
    PartKey,
    PartRecord,
    check_capture,
    check_participant,
)
from monolith_py.snapshot.retention import chain_length, needed_parts
from monolith_py.snapshot.shm import Segment, SegmentPool, default_shm_root
from monolith_py.testing.faults import fault_point
from monolith_py.wire import decode_arrays

__all__ = ["SMPConfig", "SnapshotStore", "Peers", "BlockKey", "block_frame", "decode_block_frame",
           "STREAM_CHUNK"]

log = logging.getLogger("monolith.snapshot.store")

_CODE_STRIPE = 1 << 20  # bytes of each block coded and checksummed at a time (in cache)
_MAX_LEASES = 3  # per participant: one in flight, one current, one spare


def _half_the_filesystem(directory: str) -> int:
    st = os.statvfs(directory)
    return max(st.f_blocks * st.f_frsize // 2, 1 << 20)


@dataclass(frozen=True)
class SMPConfig:
    """Settings of one SMP.

    Args:
        job: job name (part of the segment directory name).
        host_id: this host's index in the group, ``0 <= host_id < num_hosts``.
        num_hosts: hosts in the group (``>= m``: every block on a distinct host).
        k, m: erasure code (``k`` data blocks of ``m``).
        keep: sealed snapshots retained (each with the chain it needs).
        full_every: compose a full part when a chain has this many increments (0: never).
        shm_dir: segment directory (default ``/dev/shm/monolith-<job>-h<host_id>``).
        chunk_bytes: block bytes per transfer message.
        place_timeout_s: how long a block transfer may retry an unavailable peer.
        keep_free_bytes: released segment bytes kept for reuse.
        max_part_bytes: the largest part this SMP accepts (a lease, a committed or sent
            part, the part of a block a peer places here); larger requests are refused
            before any memory is reserved. 0: half the size of the filesystem holding
            the segment directory (a part that large could not be held beside the chain
            and the compaction that replaces it anyway).
        background_nice: CPU priority decrease of the threads doing background work
            (erasure coding, placement, compaction), so they yield to training on a
            shared host; the threads serving reads (restores) keep normal priority.
    """

    job: str = "monolith"
    host_id: int = 0
    num_hosts: int = 3
    k: int = 2
    m: int = 3
    keep: int = 2
    full_every: int = 8
    shm_dir: str | None = None
    chunk_bytes: int = 8 << 20
    place_timeout_s: float = 60.0
    keep_free_bytes: int = 1 << 30
    max_part_bytes: int = 0
    background_nice: int = 10

    def __post_init__(self) -> None:
        CodecConfig(self.k, self.m)
        if not isinstance(self.job, str) or not self.job.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"SMPConfig.job must be alphanumeric (- and _ allowed), got {self.job!r}")
        if not 0 <= self.host_id < self.num_hosts:
            raise ConfigError(f"SMPConfig needs 0 <= host_id < num_hosts, got {self.host_id}, "
                              f"{self.num_hosts}")
        if self.num_hosts < self.m:
            raise ConfigError(
                f"SMPConfig: {self.num_hosts} hosts cannot hold m={self.m} blocks on distinct "
                f"hosts; add hosts or lower m (and k)")
        if (self.keep < 1 or self.full_every < 0 or self.chunk_bytes < 4096
                or self.max_part_bytes < 0):
            raise ConfigError("SMPConfig: keep >= 1, full_every >= 0, chunk_bytes >= 4096, "
                              "max_part_bytes >= 0")

    @property
    def directory(self) -> str:
        return self.shm_dir or os.path.join(default_shm_root(),
                                            f"monolith-{self.job}-h{self.host_id}")


class Peers(Protocol):
    """How a store reaches the other SMPs of its group (gRPC in production)."""

    def put_block(self, host: int, frame: bytes) -> None:
        """Deliver one block chunk frame (:func:`block_frame`); raise
        :class:`UnavailableError` when the host does not answer."""

    def put_record(self, host: int, record: PartRecord) -> None:
        """Deliver a compaction record."""

    def get_block(self, host: int, key: BlockKey) -> bytes | None:
        """Read a stored block (``None``: not there)."""

    # optional: ``block_writer(host, key, block_bytes, part_size)`` -> an object with
    # ``write(chunk)`` and ``finish(block_crc)`` that places a whole block in one stream
    # (the SMP data port), or ``None`` when the host has none: chunks then go one by one
    # through ``put_block``.


@dataclass
class _Blob:
    seg: Segment
    size: int

    @property
    def view(self) -> memoryview:
        return self.seg.view[: self.size]


@dataclass
class _Job:
    done: threading.Event
    capture: str | None = None  # the capture's token (its part's meta), if it had one
    record: PartRecord | None = None
    error: str | None = None


class SnapshotStore:
    """The state of one SMP (see the module docstring).

    Args:
        config: :class:`SMPConfig`.
        peers: transport to the other SMPs (``None``: a one-host group, ``m`` must be 1).
        chain_reader: ``(participant, snapshot_id) -> frame bytes`` of a full state, used by
            compaction when a part of the chain is not held locally (normally the recovery
            policy over the group).
    """

    def __init__(self, config: SMPConfig, peers: Peers | None = None, *,
                 chain_reader: Callable[[Manifest, str], Any] | None = None) -> None:
        if peers is None and config.m > 1:
            raise ConfigError("an SMP with m > 1 needs peers to place blocks on")
        self.config = config
        self.peers = peers
        self.chain_reader = chain_reader
        self.pool = SegmentPool(config.directory, config.keep_free_bytes)
        self.max_part_bytes = config.max_part_bytes or _half_the_filesystem(config.directory)
        self._mu = threading.RLock()
        self._leases: dict[str, str] = {}
        self._parts: dict[PartKey, _Blob] = {}
        self._blocks: dict[BlockKey, _Blob] = {}
        self._incoming: dict[BlockKey, tuple[_Blob, int]] = {}
        self._jobs: dict[PartKey, _Job] = {}
        self._manifests: dict[int, tuple[Manifest, bytes]] = {}
        self._records: dict[PartKey, PartRecord] = {}
        self._pins: dict[Any, int] = {}
        self._newest_id = -1  # the highest snapshot id seen here (see catalog)
        self._scratch: list[bytearray] = []  # parity buffers (see _take_scratch)
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._send = ThreadPoolExecutor(max_workers=max(1, config.m - 1),
                                        thread_name_prefix="smp-send",
                                        initializer=self._lower_priority)
        self._closed = False
        self._repair_result: dict[str, int] | None = {}
        self._repair_sources: dict[int, Any] | None = None
        self._busy = False  # the worker is running a job (coding, placement, compaction)
        self._worker = threading.Thread(target=self._work, name="smp-worker", daemon=True)
        self._worker.start()
        h = str(config.host_id)
        self._m_bytes = gauge("monolith_smp_stored_bytes", "Bytes held by the SMP.", ["host"]).labels(h)
        self._m_encode = histogram("monolith_smp_encode_seconds",
                                   "Time to erasure-code and place one part.", ["host"]).labels(h)
        self._m_parts = counter("monolith_smp_parts_total", "Parts committed.", ["host"]).labels(h)
        self._m_rejected = counter("monolith_smp_rejected_total",
                                   "Inputs rejected by the SMP.", ["host", "what"])
        self._m_compactions = counter("monolith_smp_compactions_total",
                                      "Full parts composed from increments.", ["host"]).labels(h)

    # -- leases and commits -------------------------------------------------------------------

    def lease(self, participant: str, nbytes: int) -> dict[str, Any]:
        """A segment of at least ``nbytes`` for ``participant`` to write its next part."""
        check_participant(participant)
        if not 0 < nbytes <= self.max_part_bytes:
            self._reject("lease")
            raise InvalidInputError(f"lease size must be in (0, {self.max_part_bytes}] (this "
                                    f"SMP's largest part), got {nbytes}")
        # the part committed into a lease keeps it (one much smaller than its lease moves
        # to a segment of its own size)
        seg = self.pool.create(int(nbytes))
        stale: list[str] = []
        with self._mu:
            self._leases[seg.name] = participant
            mine = [s for s, p in self._leases.items() if p == participant]
            stale = mine[:-_MAX_LEASES]  # oldest first (dicts keep insertion order)
            for s in stale:
                del self._leases[s]
        for s in stale:
            old = self.pool.get(s)
            if old is not None:
                self.pool.release(old)
        return {"segment": seg.name, "path": seg.path, "capacity": seg.capacity,
                "directory": self.pool.directory}

    def release(self, participant: str, segment: str) -> bool:
        """Give back a leased segment that will not be committed; False if unknown."""
        with self._mu:
            if self._leases.get(segment) != participant:
                return False
            del self._leases[segment]
            seg = self.pool.get(segment)
        if seg is not None:
            self.pool.release(seg)
        return True

    def commit(self, participant: str, segment: str, nbytes: int) -> PartKey:
        """Adopt the part ``participant`` wrote into leased ``segment``; starts coding."""
        with self._mu:
            owner = self._leases.get(segment)
            seg = self.pool.get(segment)
            if owner != participant or seg is None:
                self._reject("commit")
                raise InvalidInputError(
                    f"segment {segment!r} is not leased to {participant!r} (SMP restarted?)")
            if not 0 < nbytes <= seg.capacity:
                raise InvalidInputError(f"{nbytes} bytes do not fit segment {segment}")
            del self._leases[segment]
        nbytes = int(nbytes)
        small = (self.pool.take(nbytes) if 2 * seg.capacity > 3 * nbytes + (32 << 20)
                 else None)
        if small is not None:
            # keeping a part much smaller than its lease (e.g. the first increment after
            # a full part) would hold memory it does not use. Move the part to a free
            # segment of its size (warm: the copy runs at memory speed) and put the lease
            # back in the pool for the next one. With none free the part keeps the
            # lease: new memory faults in at up to 3 s/GiB, a copy would cost more than
            # the memory it saves.
            small.view[:nbytes] = seg.view[:nbytes]
            self.pool.release(seg)
            seg = small
        blob = _Blob(seg, nbytes)
        try:
            key = self._adopt(participant, blob)
        except BaseException:
            self.pool.release(seg)
            raise
        return key

    def put_part(self, participant: str, data: Any) -> PartKey:
        """Store a part sent as bytes (remote writers, small parts)."""
        check_participant(participant)
        view = memoryview(data).cast("B")
        if view.nbytes > self.max_part_bytes:
            self._reject("part")
            raise InvalidInputError(f"a part of {view.nbytes} bytes: more than this SMP's "
                                    f"largest part ({self.max_part_bytes} bytes)")
        seg = self.pool.create(view.nbytes)
        seg.view[: view.nbytes] = view
        try:
            return self._adopt(participant, _Blob(seg, view.nbytes))
        except BaseException:
            self.pool.release(seg)
            raise

    def _adopt(self, participant: str, blob: _Blob) -> PartKey:
        try:
            _, meta = decode_arrays(blob.view, require_checksum=True)
            sid, kind, base = int(meta["snapshot_id"]), str(meta["kind"]), int(meta["base_id"])
            if meta.get("participant") != participant or kind not in ("full", "inc"):
                raise DecodeError(f"part of {meta.get('participant')!r} ({kind}) committed by "
                                  f"{participant!r}")
            if (kind == "full") != (base == -1) or sid < 0 or base >= sid:
                raise DecodeError(f"part ids inconsistent: {kind} {sid} on base {base}")
            token = check_capture(meta.get("capture"))
        except (DecodeError, InvalidInputError, KeyError, TypeError, ValueError) as exc:
            self._reject("part")
            raise DecodeError(f"rejected part from {participant!r}: {exc}") from exc
        fault_point("smp.commit")
        key: PartKey = (participant, sid, kind)
        with self._mu:
            old = self._parts.pop(key, None)
            self._parts[key] = blob
            job = _Job(threading.Event(), token)
            self._jobs[key] = job
            self._newest_id = max(self._newest_id, sid)
        if old is not None:  # after the replaced part's own coding (queued before) is done
            self._queue.put(functools.partial(self.pool.release, old.seg))
        self._m_parts.inc()
        self._queue.put(lambda: self._encode_job(key, job, base))
        return key

    def wait_part(self, participant: str, snapshot_id: int, kind: str,
                  timeout_s: float, capture: str | None = None) -> PartRecord:
        """The record of a committed part once all its blocks are placed. With ``capture``
        (the token the capture returned), only the part of that capture counts: a part
        under the same key from an earlier run (a snapshot id taken again after a crash)
        is not its record."""
        key: PartKey = (participant, int(snapshot_id), kind)
        deadline = time.monotonic() + timeout_s
        while True:
            with self._mu:
                job = self._jobs.get(key)
            if job is not None and capture is not None and job.capture != capture:
                job = None  # not (yet) the part of this capture
            if job is not None:
                if job.done.wait(max(0.0, deadline - time.monotonic())):
                    if job.record is None:
                        raise SnapshotError(f"part {key} could not be placed: {job.error}")
                    return job.record
            elif time.monotonic() >= deadline:
                raise DeadlineExceededError(f"part {key} was not committed to host "
                                            f"{self.config.host_id} within {timeout_s:.1f} s")
            else:
                time.sleep(0.01)
            if time.monotonic() >= deadline:
                raise DeadlineExceededError(f"part {key} not placed within {timeout_s:.1f} s")

    # -- erasure coding and placement (worker thread) -----------------------------------------

    def _lower_priority(self) -> None:
        """Lower this thread's CPU priority (Linux: nice is per thread)."""
        if self.config.background_nice:
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(),
                               os.getpriority(os.PRIO_PROCESS, 0) + self.config.background_nice)
            except (OSError, AttributeError):
                pass

    def _work(self) -> None:
        self._lower_priority()
        # One thread for the compiled kernels of background jobs (a compaction's compose):
        # beside a training that keeps every core busy, a second kernel thread only waits
        # at the region's end (spinning, in OpenMP) for its half to get a core.
        numba.set_num_threads(1)
        while True:
            job = self._queue.get()
            if job is None:
                return
            self._busy = True
            try:
                job()
            except Exception:  # a bug must not kill the worker
                log.exception("SMP %d: background job failed", self.config.host_id)
            finally:
                self._busy = False

    def _pin_locked(self, key: Any) -> None:
        """Keep ``key`` from retention until :meth:`_unpin` (holding ``_mu``)."""
        self._pins[key] = self._pins.get(key, 0) + 1

    def _unpin(self, key: Any) -> None:
        with self._mu:
            self._pins[key] -= 1
            if not self._pins[key]:
                del self._pins[key]

    @contextmanager
    def _pinned(self, key: Any) -> Iterator[None]:
        with self._mu:
            self._pin_locked(key)
        try:
            yield
        finally:
            self._unpin(key)

    def _encode_job(self, key: PartKey, job: _Job, base_id: int) -> None:
        t0 = time.perf_counter()
        try:
            with self._pinned(key):
                with self._mu:
                    blob = self._parts.get(key)
                if blob is None:
                    raise SnapshotError("part was dropped before it was coded")
                job.record = self._encode_and_place(key, blob.view, base_id)
            self._m_encode.observe(time.perf_counter() - t0)
        except Exception as exc:
            job.error = f"{type(exc).__name__}: {exc}"
            log.warning("SMP %d: part %s not placed: %s", self.config.host_id, key, job.error)
        finally:
            job.done.set()

    def _encode_and_place(self, key: PartKey, view: memoryview, base_id: int) -> PartRecord:
        """Erasure-code the part and place its blocks: each remote block in one stream to
        the host's data port when it has one, else chunk by chunk over ``PutBlock`` (also
        the fallback when a data port fails midway: the part is then placed again)."""
        cfg = self.config
        placement = block_placement(cfg.host_id, cfg.num_hosts, cfg.k, cfg.m)
        writers = self._open_writers(key, placement, view.nbytes)
        if writers:
            try:
                return self._code_and_send(key, view, base_id, placement, writers)
            except MonolithError as exc:
                log.info("SMP %d: placing %s over data ports failed (%s); again over PutBlock",
                         cfg.host_id, key, exc)
            finally:
                for w in writers.values():
                    w.close()
        return self._code_and_send(key, view, base_id, placement, {})

    def _open_writers(self, key: PartKey, placement: tuple[int, ...], size: int
                      ) -> dict[int, Any]:
        """``{block index: stream}`` to the data ports of the hosts that have one."""
        open_writer = getattr(self.peers, "block_writer", None)
        if open_writer is None:
            return {}
        bs = block_size(size, self.config.k)
        writers: dict[int, Any] = {}
        for i, host in enumerate(placement):
            if host == self.config.host_id:
                continue
            try:
                w = open_writer(host, (*key, i), bs, size)
            except MonolithError as exc:
                log.info("SMP %d: data port of host %d unusable (%s); PutBlock",
                         self.config.host_id, host, exc)
                continue
            if w is not None:
                writers[i] = w
        return writers

    def _code_and_send(self, key: PartKey, view: memoryview, base_id: int,
                       placement: tuple[int, ...], writers: dict[int, Any]) -> PartRecord:
        cfg = self.config
        k, m, size = cfg.k, cfg.m, view.nbytes
        bs = block_size(size, k)
        home = cfg.host_id
        # a data block placed here is served from the home copy; a parity block is kept
        kept = {i: _Blob(self.pool.create(bs), bs) for i in range(k, m) if placement[i] == home}
        sent = [i for i in range(m) if placement[i] != home]
        crcs = [0] * m
        # the part's own bytes in each data block (the last one is zero padded), and
        # their crcs: the part's crc is combined from them (one pass over the part)
        real = [max(0, min(bs, size - i * bs)) for i in range(k)]
        real_crcs: list[int | None] = [None] * k
        scratch = self._take_scratch(m - k - len(kept), min(cfg.chunk_bytes, bs))
        try:
            enc = ParityEncoder(k, m)
            for lo in range(0, bs, cfg.chunk_bytes):
                hi = min(lo + cfg.chunk_bytes, bs)
                chunks: list[Any] = [_data_chunk(view, i, bs, lo, hi) for i in range(k)]
                # parity straight into the kept block, or into reused scratch to send
                spare = iter(scratch)
                chunks += [kept[i].seg.view[lo:hi] if i in kept else
                           memoryview(next(spare))[: hi - lo] for i in range(k, m)]
                for a in range(0, hi - lo, _CODE_STRIPE):  # coded and summed from cache
                    b = min(a + _CODE_STRIPE, hi - lo)
                    stripe = [memoryview(c)[a:b] for c in chunks]
                    enc.encode_into(stripe[:k], stripe[k:])
                    for i in range(k):
                        cut = real[i] - (lo + a)  # the part's bytes end in this stripe
                        if real_crcs[i] is None and cut < b - a:
                            real_crcs[i] = (crc32c.crc32c(stripe[i][:cut], crcs[i]) if cut > 0
                                            else crcs[i])
                    for i in range(m):
                        crcs[i] = crc32c.crc32c(stripe[i], crcs[i])
                final = hi == bs
                futures = [self._send.submit(_send_chunk, writers[i], chunks[i],
                                             crcs[i] if final else None)
                           if i in writers else
                           self._send.submit(self._deliver, placement[i],
                                             block_frame((*key, i), lo, chunks[i], block_bytes=bs,
                                                         part_size=size, final=final,
                                                         block_crc=crcs[i] if final else 0))
                           for i in sent]
                wait(futures)  # all of them, before a failure of one is raised
                for f in futures:
                    f.result()
                fault_point("smp.encode")
        except BaseException:
            for blob in kept.values():
                self.pool.release(blob.seg)
            raise
        finally:
            self._give_scratch(scratch)
        part_crc = 0
        for i in range(k):
            whole = real_crcs[i]
            part_crc = crc32c_combine(part_crc, crcs[i] if whole is None else whole, real[i])
        record = PartRecord(participant=key[0], snapshot_id=key[1], kind=key[2],
                            base_id=base_id, size=size, crc=part_crc, home=home, k=k, m=m,
                            block_crcs=tuple(crcs), placement=placement)
        for i, blob in kept.items():
            self._keep_block((*key, i), blob)
        fault_point("smp.place")
        return record

    def _take_scratch(self, count: int, nbytes: int) -> list[bytearray]:
        """``count`` buffers of at least ``nbytes`` for parity being sent, reused from job
        to job (fresh memory faults in slowly on VMs)."""
        with self._mu:
            fit = [b for b in self._scratch if len(b) >= nbytes][:count]
            self._scratch = [b for b in self._scratch if all(b is not f for f in fit)]
        return fit + [bytearray(nbytes) for _ in range(count - len(fit))]

    def _give_scratch(self, bufs: list[bytearray]) -> None:
        with self._mu:
            self._scratch = (self._scratch + bufs)[-4:]

    def _keep_block(self, key: BlockKey, blob: _Blob) -> None:
        """Hold ``blob`` as block ``key`` (replacing an older copy)."""
        with self._mu:
            old = self._blocks.pop(key, None)
            self._blocks[key] = blob
            self._newest_id = max(self._newest_id, key[1])
        if old is not None:
            self.pool.release(old.seg)

    def _deliver(self, host: int, frame: bytes) -> None:
        assert self.peers is not None
        deadline = time.monotonic() + self.config.place_timeout_s
        delay = 0.05
        while True:
            try:
                self.peers.put_block(host, frame)
                return
            except UnavailableError:
                if time.monotonic() + delay > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    # -- blocks from peers -----------------------------------------------------------------------

    def put_block(self, frame: Any) -> None:
        """Receive one chunk of a block placed here by another host's SMP."""
        try:
            key, meta, data = decode_block_frame(frame)
        except DecodeError:
            self._reject("block")
            raise
        off, bb = int(meta["offset"]), int(meta["block_bytes"])
        self._check_block(key, bb, int(meta["part_size"]))
        n = data.shape[0]
        if off + n > bb:
            self._reject("block")
            raise InvalidInputError(f"chunk of {key} at offset {off} runs past its {bb} bytes")
        # the chunk is copied under the lock: retention (or a restarted stream of the same
        # block) may give the segment back, and must not while a chunk is written into it
        with self._mu:
            entry = self._incoming.get(key)
            if off == 0:
                if entry is not None:
                    self.pool.release(entry[0].seg)
                entry = (_Blob(self.pool.create(bb), bb), 0)
            elif entry is None or entry[1] != off or entry[0].size != bb:
                self._reject("block")
                raise InvalidInputError(f"chunk of {key} at offset {off} out of order")
            blob, got = entry[0], off + n
            blob.seg.view[off: got] = data.data
            if meta.get("final"):
                self._incoming.pop(key, None)
            else:
                self._incoming[key] = (blob, got)
        if not meta.get("final"):
            return
        fault_point("smp.block")
        if got != bb or crc32c.crc32c(blob.view) != int(meta["block_crc"]):
            self.pool.release(blob.seg)
            self._reject("block")
            raise CorruptDataError(f"block {key} arrived incomplete or corrupt")
        self._keep_block(key, blob)

    def block_target(self, key: BlockKey, block_bytes: int, part_size: int) -> _BlockTarget:
        """Where block ``key`` placed in one stream (the data port) is written: a segment
        of ``block_bytes``, kept by ``commit(block_crc)`` if the crc32c matches."""
        self._check_block(key, block_bytes, part_size)
        return _BlockTarget(self, key, self.pool.create(block_bytes), block_bytes)

    def _check_block(self, key: BlockKey, block_bytes: int, part_size: int) -> None:
        """A block placed here (either way) must be one this group's coding makes: an
        index below ``m`` and the size a ``k``-way split of its part gives."""
        p, sid, kind, idx = key
        try:
            check_participant(p)
            if kind not in ("full", "inc") or sid < 0 or not 0 <= idx < self.config.m:
                raise InvalidInputError(f"bad block key {key}")
            if not 0 < part_size <= self.max_part_bytes:
                raise InvalidInputError(f"a block of a {part_size}-byte part: more than this "
                                        f"SMP's largest part ({self.max_part_bytes} bytes)")
            if block_bytes != block_size(part_size, self.config.k):
                raise InvalidInputError(f"a block of a {part_size}-byte part with k="
                                        f"{self.config.k} is not {block_bytes} bytes")
        except InvalidInputError:
            self._reject("block")
            raise

    def get_block(self, key: BlockKey, offset: int = 0, length: int | None = None) -> bytes | None:
        """A copy of (a range of) block ``key`` held here; data blocks ``< k`` of a home
        part are cut from the part."""
        p, sid, kind, idx = key
        if offset < 0 or (length is not None and length < 0):
            raise InvalidInputError("offset and length must be >= 0")
        with self._mu:
            blob = self._blocks.get(key)
            part = self._parts.get((p, sid, kind)) if blob is None and idx < self.config.k else None
        if blob is not None:
            with self._pinned(key):
                end = blob.size if length is None else offset + length
                return bytes(blob.view[offset:end])
        if part is not None:
            with self._pinned((p, sid, kind)):
                blk = data_block(part.view, idx, self.config.k)
                end = len(blk) if length is None else offset + length
                return bytes(memoryview(blk)[offset:end])
        return None

    def open_block(self, key: BlockKey) -> _Pinned | None:
        """Block ``key`` held here, pinned until the returned context exits (its
        ``__enter__`` gives a ``memoryview``); ``None`` when not held. Data blocks ``< k``
        of a home part are views cut from the part (the padded last one a copy)."""
        p, sid, kind, idx = key
        with self._mu:
            blob = self._blocks.get(key)
            pin: Any = key
            if blob is None and idx < self.config.k:
                blob, pin = self._parts.get((p, sid, kind)), (p, sid, kind)
                if blob is not None:
                    self._pin_locked(pin)
                    return _Pinned(self, pin, data_block(blob.view, idx, self.config.k))
                return None
            if blob is None:
                return None
            self._pin_locked(pin)
        return _Pinned(self, pin, blob.view)

    def open_part(self, key: PartKey) -> _Pinned | None:
        """The whole part ``key``, pinned (see :meth:`open_block`), or ``None``."""
        with self._mu:
            blob = self._parts.get(key)
            if blob is None:
                return None
            self._pin_locked(key)
        return _Pinned(self, key, blob.view)

    def stream_block(self, key: BlockKey, sink: Callable[[int, memoryview], None],
                     size_hint: int | None = None) -> int | None:
        """Hand block ``key`` to ``sink(offset, chunk)`` chunk by chunk; its size, or
        ``None`` when not held (the in-process twin of ``SMPClient.stream_block``)."""
        return _stream_to(self.open_block(key), sink)

    def read_block_into(self, key: BlockKey, offset: int, out: memoryview) -> bool:
        """Bytes ``[offset, offset + len(out))`` of block ``key`` into ``out``; ``False``
        when not held (the in-process twin of ``SMPClient.read_block_into``)."""
        reader = self.open_block(key)
        if reader is None:
            return False
        with reader as view:
            if offset < 0 or offset + out.nbytes > view.nbytes:
                raise InvalidInputError(f"range [{offset}, +{out.nbytes}) outside block {key}")
            out[:] = view[offset: offset + out.nbytes]
        return True

    def stream_part(self, key: PartKey, sink: Callable[[int, memoryview], None],
                    size_hint: int | None = None) -> int | None:
        """:meth:`stream_block` for the whole part."""
        return _stream_to(self.open_part(key), sink)

    def part_location(self, key: PartKey) -> dict[str, Any] | None:
        """Where the whole part lies (same host: map it, zero copy)."""
        with self._mu:
            blob = self._parts.get(key)
            if blob is None:
                return None
            return {"path": blob.seg.path, "capacity": blob.seg.capacity, "size": blob.size,
                    "directory": self.pool.directory}

    def part_view(self, key: PartKey) -> memoryview | None:
        with self._mu:
            blob = self._parts.get(key)
            return None if blob is None else blob.view

    def read_part(self, key: PartKey, offset: int, length: int) -> bytes | None:
        """``length`` bytes of the whole part from ``offset`` (remote readers)."""
        with self._mu:
            blob = self._parts.get(key)
        if blob is None:
            return None
        if offset < 0 or length < 0:
            raise InvalidInputError("offset and length must be >= 0")
        with self._pinned(key):
            return bytes(blob.view[offset: offset + length])

    # -- catalog: manifests and compaction records ----------------------------------------------

    def seal(self, manifest_bytes: Any) -> Manifest:
        """Store a sealed manifest (validated), then apply retention and maybe compact."""
        try:
            man = Manifest.decode(manifest_bytes)
        except DecodeError:
            self._reject("manifest")
            raise
        if man.job != self.config.job:
            self._reject("manifest")
            raise InvalidInputError(f"manifest of job {man.job!r} sent to job {self.config.job!r}")
        fault_point("smp.seal")
        with self._mu:
            self._manifests[man.snapshot_id] = (man, bytes(manifest_bytes))
            self._newest_id = max(self._newest_id, man.snapshot_id)
        self._collect()
        if self._repair_sources is not None:  # parts placed before a restart of this SMP
            self._queue.put(functools.partial(repair_manifest, self, man, self._repair_sources))
        self._maybe_compact(man)
        return man

    def put_record(self, record: PartRecord) -> None:
        """A compaction record (a full form of a part, all blocks placed)."""
        if record.kind != "full":
            raise InvalidInputError("compaction records describe full parts")
        with self._mu:
            self._records[record.key] = record
            self._newest_id = max(self._newest_id, record.snapshot_id)
        self._collect()

    def catalog(self) -> dict[str, Any]:
        """``{"manifests": [bytes], "records": [PartRecord], "newest_id": int}`` held
        here; ``newest_id`` is the highest snapshot id this SMP was given a part, block or
        manifest of, sealed or not (-1: none). A restarted coordinator starts above it."""
        with self._mu:
            return {"manifests": [raw for _, (_, raw) in sorted(self._manifests.items())],
                    "records": list(self._records.values()), "newest_id": self._newest_id}

    def manifests(self) -> list[Manifest]:
        with self._mu:
            return [m for _, (m, _) in sorted(self._manifests.items())]

    def records(self) -> dict[PartKey, PartRecord]:
        with self._mu:
            return dict(self._records)

    # -- retention -------------------------------------------------------------------------------

    def _needed(self) -> tuple[set[PartKey], set[int], int]:
        return needed_parts({sid: m for sid, (m, _) in self._manifests.items()},
                            self._records, self.config.keep)

    def _chain_length(self, man: Manifest, p: str) -> int:
        return chain_length({sid: m for sid, (m, _) in self._manifests.items()},
                            self._records, man.snapshot_id, p)

    def _collect(self) -> None:
        """Free what no retained snapshot needs (data of newer, in-flight ids is kept)."""
        drop: list[_Blob] = []
        with self._mu:
            keys, mans, newest = self._needed()
            if newest < 0:
                return
            for sid in [s for s in self._manifests if s not in mans]:
                del self._manifests[sid]
            for k in [k for k in self._records if k not in keys]:
                del self._records[k]
            for pk in [pk for pk in self._parts
                       if pk[1] <= newest and pk not in keys and pk not in self._pins]:
                drop.append(self._parts.pop(pk))
                self._jobs.pop(pk, None)
            for bk in [bk for bk in self._blocks
                       if bk[1] <= newest and bk[:3] not in keys and bk not in self._pins]:
                drop.append(self._blocks.pop(bk))
            for bk in [bk for bk in self._incoming if bk[1] <= newest and bk[:3] not in keys]:
                drop.append(self._incoming.pop(bk)[0])
        if drop:
            log.debug("SMP %d: retention (newest %d, retained %s) freed %d blobs",
                      self.config.host_id, newest, sorted(mans), len(drop))
        # largest last: when the pool is over budget it removes the segments freed
        # longest ago, and the largest (the full part a compaction replaced) is the one
        # the next compaction wants back
        drop.sort(key=lambda b: b.seg.capacity)
        for blob in drop:
            self.pool.release(blob.seg)
        self._m_bytes.set(self.stats()["stored_bytes"])

    # -- compaction --------------------------------------------------------------------------------

    def _maybe_compact(self, man: Manifest) -> None:
        every = self.config.full_every
        if not every or self.peers is None and self.config.m > 1:
            return
        with self._mu:
            todo = [p for p, rec in man.parts.items()
                    if rec.home == self.config.host_id and rec.kind == "inc"
                    and self._chain_length(man, p) >= every]
        for p in todo:
            self._queue.put(functools.partial(self._compact, man, p))

    def _compact(self, man: Manifest, p: str) -> None:
        compact(self, man, p)

    # -- repair after a restart -----------------------------------------------------------------------

    def repair(self, sources: dict[int, Any]) -> dict[str, int]:
        """Re-protect this host's share after a restart (see
        :func:`~monolith_py.snapshot.maintenance.repair`)."""
        return repair(self, sources)

    def start_repair(self, sources: dict[int, Any]) -> None:
        """Queue :meth:`repair` on the worker thread; from then on every seal also
        rebuilds what its manifest places here but is missing."""
        self._repair_result = None
        self._repair_sources = dict(sources)
        self._queue.put(lambda: self._repair_quietly(sources))

    def _repair_quietly(self, sources: dict[int, Any]) -> None:
        try:
            self.repair(sources)
        except Exception as exc:
            self._repair_result = {"parts": 0, "blocks": 0, "failed": -1}
            log.warning("SMP %d: repair failed: %s: %s", self.config.host_id,
                        type(exc).__name__, exc)

    # -- misc ----------------------------------------------------------------------------------------

    def _reject(self, what: str) -> None:
        self._m_rejected.labels(host=str(self.config.host_id), what=what).inc()

    def stats(self) -> dict[str, Any]:
        with self._mu:
            stored = sum(b.size for b in self._parts.values()) + sum(
                b.size for b in self._blocks.values())
            return {"host": self.config.host_id, "parts": len(self._parts),
                    "blocks": len(self._blocks), "manifests": sorted(self._manifests),
                    "records": len(self._records), "stored_bytes": stored,
                    "repair": self._repair_result,
                    "pending_jobs": self._queue.qsize(), "busy": self._busy,
                    **self.pool.stats()}

    def drain(self, timeout_s: float = 60.0) -> None:
        """Wait until background jobs queued so far have run (tests, benchmarks)."""
        done = threading.Event()
        self._queue.put(done.set)
        if not done.wait(timeout_s):
            raise DeadlineExceededError("SMP background work did not finish in time")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._worker.join(timeout=30)
        self._send.shutdown(wait=False, cancel_futures=True)
        self.pool.close(remove_directory=True)


STREAM_CHUNK = 4 << 20
"""Bytes per message when blocks and parts are streamed (gRPC Python moved 1.0-1.3 GB/s
between two processes here with 1-8 MiB messages, 0.3-0.4 GB/s with 32 MiB ones)."""


def _send_chunk(writer: Any, chunk: Any, final_crc: int | None) -> None:
    writer.write(chunk)
    if final_crc is not None:
        writer.finish(final_crc)


class _BlockTarget:
    """A segment receiving one placed block (see :meth:`SnapshotStore.block_target`)."""

    def __init__(self, store: SnapshotStore, key: BlockKey, seg: Segment, nbytes: int) -> None:
        self._store, self.key, self._seg, self._open = store, key, seg, True
        self.view = seg.view[:nbytes]

    def commit(self, block_crc: int, received_crc: int | None = None) -> None:
        """Keep the block if its crc32c is ``block_crc``; else give the segment back and
        raise :class:`CorruptDataError`. ``received_crc``: the crc32c of the bytes in
        :attr:`view`, summed by the receiver as they arrived (else computed here)."""
        self._open = False
        fault_point("smp.block")
        actual = crc32c.crc32c(self.view) if received_crc is None else received_crc
        if actual != block_crc:
            self._store.pool.release(self._seg)
            self._store._reject("block")
            raise CorruptDataError(f"block {self.key} arrived corrupt (crc mismatch)")
        self._store._keep_block(self.key, _Blob(self._seg, self.view.nbytes))

    def abort(self) -> None:
        if self._open:
            self._open = False
            self._store.pool.release(self._seg)


class _Pinned:
    """A pinned view of a stored block or part (retention keeps it while entered)."""

    def __init__(self, store: SnapshotStore, pin: Any, view: Any) -> None:
        self._store, self._pin, self._view = store, pin, memoryview(view).cast("B")
        self._open = True

    def __enter__(self) -> memoryview:
        return self._view

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._open:
            self._open = False
            self._store._unpin(self._pin)


def _stream_to(reader: _Pinned | None, sink: Callable[[int, memoryview], None],
               chunk: int = STREAM_CHUNK) -> int | None:
    if reader is None:
        return None
    with reader as view:
        for lo in range(0, view.nbytes, chunk):
            sink(lo, view[lo: lo + chunk])
        return view.nbytes


def _data_chunk(view: memoryview, i: int, bs: int, lo: int, hi: int) -> Any:
    start, end = i * bs + lo, i * bs + hi
    size = view.nbytes
    if end <= size:
        return view[start:end]
    out = bytearray(hi - lo)
    if start < size:
        out[: size - start] = view[start:size]
    return bytes(out)

