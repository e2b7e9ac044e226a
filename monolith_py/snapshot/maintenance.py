"""SMP background maintenance: compaction (full parts composed from increments) and repair
(a restarted SMP rebuilding its share from its peers). Both run on the store's worker
thread; they use the store's internals, so they live next to it (private to the package).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import crc32c

from monolith_py.errors import CorruptDataError
from monolith_py.snapshot.codec import data_block
from monolith_py.snapshot.manifest import Manifest, PartKey, PartRecord
from monolith_py.snapshot.shm import Segment
from monolith_py.testing.faults import fault_point

if TYPE_CHECKING:
    from monolith_py.snapshot.store import SnapshotStore

__all__ = ["compact", "local_chain", "repair", "repair_manifest"]

log = logging.getLogger("monolith.snapshot.store")


def compact(self: SnapshotStore, man: Manifest, p: str) -> None:
    """Compose ``p``'s chain at sealed snapshot ``man`` into a full part, erasure-code and
    place it, and broadcast its record (on the store's worker thread)."""
    from monolith_py.snapshot.store import _Blob

    from monolith_py.snapshot.compose import compose_frame
    from monolith_py.snapshot.pspart import decode_part, encode_shard_state

    sid = man.snapshot_id
    key: PartKey = (p, sid, "full")
    with self._mu:
        if key in self._records or sid not in self._manifests:
            return
    t0 = time.perf_counter()
    segs: list[Segment] = []

    def alloc(n: int) -> memoryview:
        segs.append(self.pool.create(n))
        return segs[-1].view

    extra = {"participant": p, "composed": True}
    pins: list[PartKey] = []
    try:
        chain = local_chain(self, man, p, pins)
        if chain is None:
            if self.chain_reader is None:
                log.info("SMP %d: %s chain of snapshot %d not all local; compaction skipped",
                         self.config.host_id, p, sid)
                return
            state = self.chain_reader(man, p)
            fault_point("smp.compact")
            frame = encode_shard_state(state, sid, man.step, alloc=alloc, extra_meta=extra)
            del state
        else:  # composed straight into the new part's segment: no intermediate state
            fault_point("smp.compact")
            # each frame matched its sealed record's crc: not checked a second time
            frame = compose_frame([decode_part(f, verified=True) for f in chain], sid,
                                  man.step, alloc=alloc, extra_meta=extra)
        del chain
        _unpin(self, pins)
        blob = _Blob(segs[0], frame.nbytes)
        with self._mu:
            old = self._parts.pop(key, None)
            self._parts[key] = blob
        if old is not None:
            self.pool.release(old.seg)
        with self._pinned(key):
            record = self._encode_and_place(key, blob.view, -1)
        for host in range(self.config.num_hosts):
            if host == self.config.host_id:
                continue
            assert self.peers is not None
            self.peers.put_record(host, record)
        self.put_record(record)
        self._m_compactions.inc()
        log.info("SMP %d: composed a full part of %s at snapshot %d (%d bytes, %.2f s)",
                 self.config.host_id, p, sid, frame.nbytes, time.perf_counter() - t0)
    except Exception as exc:
        log.warning("SMP %d: compaction of %s at %d failed: %s: %s", self.config.host_id,
                    p, sid, type(exc).__name__, exc)
        with self._mu:
            adopted = {id(b.seg) for b in self._parts.values()}
        for seg in segs:  # a segment not adopted as a part goes back to the pool
            if id(seg) not in adopted:
                self.pool.release(seg)
    finally:
        _unpin(self, pins)

def local_chain(self: SnapshotStore, man: Manifest, p: str,
                pins: list[PartKey]) -> list[memoryview] | None:
    """Frames base-first (from the newest composed full part in the chain, if any), all
    from local home parts whose crc matches their sealed record, or ``None``. The parts
    are pinned (retention keeps their segments) and their keys appended to ``pins``:
    unpin them with :func:`_unpin` when done reading. The crcs are computed outside the
    store's lock (2 GiB of chain take a quarter of a second)."""
    chain = list(man.chain(p))
    with self._mu:
        for i in range(len(chain) - 1, -1, -1):
            full = self._records.get((p, chain[i].snapshot_id, "full"))
            if full is not None and full.key != chain[i].key:
                chain = [full, *chain[i + 1:]]
                break
        blobs = [self._parts.get(rec.key) for rec in chain]
        if any(b is None or b.size != rec.size for b, rec in zip(blobs, chain)):
            return None
        for rec in chain:
            self._pins[rec.key] = self._pins.get(rec.key, 0) + 1
            pins.append(rec.key)
    frames = [b.view for b in blobs if b is not None]
    if any(crc32c.crc32c(f) != rec.crc for f, rec in zip(frames, chain)):
        _unpin(self, pins)
        return None
    return frames


def _unpin(self: SnapshotStore, keys: list[PartKey]) -> None:
    with self._mu:
        for k in keys:
            self._pins[k] -= 1
            if not self._pins[k]:
                del self._pins[k]
    keys.clear()


def _rebuild(self: SnapshotStore, rec: Any, records: list[PartRecord],
             done: dict[str, int]) -> None:
    """Rebuild, from the peers, each whole part (home) or block of ``records`` that is
    placed on this host and missing here."""
    from monolith_py.snapshot.codec import encode_parity
    from monolith_py.snapshot.store import _Blob

    me = self.config.host_id
    for r in sorted(records, key=lambda r: (r.snapshot_id, r.participant, r.kind)):
        for idx in _missing_here(self, r):
            key = r.key
            try:
                data = rec.part_bytes(r)
                if idx is None:
                    seg = self.pool.create(r.size)
                    seg.view[: r.size] = data
                    with self._mu:
                        self._parts.setdefault(key, _Blob(seg, r.size))
                    done["parts"] += 1
                    continue
                blk = data_block(data, idx, r.k) if idx < r.k else \
                    encode_parity(data, r.k, r.m)[idx - r.k]
                if crc32c.crc32c(blk) != r.block_crcs[idx]:
                    raise CorruptDataError(f"rebuilt block {idx} of {key} fails its crc")
                seg = self.pool.create(len(blk))
                seg.view[: len(blk)] = blk
                with self._mu:
                    self._blocks.setdefault((*key, idx), _Blob(seg, len(blk)))
                done["blocks"] += 1
            except Exception as exc:
                done["failed"] += 1
                log.warning("SMP %d: cannot rebuild %s: %s: %s", me, key, type(exc).__name__,
                            exc)


def _missing_here(self: SnapshotStore, r: PartRecord) -> list[int | None]:
    """What of part ``r`` belongs on this host but is not here: ``None`` for the whole
    part (this is its home; data blocks placed here are served from it), else the
    indices of the blocks placed here. The whole part comes first, so that the blocks
    after it are cut or encoded from a local copy."""
    me = self.config.host_id
    out: list[int | None] = []
    with self._mu:
        home = r.home == me
        if home and r.key not in self._parts:
            out.append(None)
        out.extend(i for i, h in enumerate(r.placement)
                   if h == me and not (home and i < r.k) and (*r.key, i) not in self._blocks)
    return out


def repair(self: SnapshotStore, sources: dict[int, Any]) -> dict[str, int]:
    """Re-protect this host's share after a restart: learn the sealed catalog from the
    peers (``sources``: ``{host: PartSource}``), then rebuild (erasure decode from
    peers) every whole part this host is home of and every block placed here that
    the retained snapshots need. Runs on the worker thread (see :meth:`start_repair`)."""
    from monolith_py.snapshot.recovery import Recovery

    me = self.config.host_id
    rec = Recovery({**sources, me: self}, me, job=self.config.job)
    cat = rec.catalog()
    with self._mu:
        for sid, man in cat.manifests.items():
            self._manifests.setdefault(sid, (man, man.encode()))
        for k, r in cat.records.items():
            self._records.setdefault(k, r)
    self._collect()
    with self._mu:
        keys, _, _ = self._needed()
        records = {r.key: r for _, (m, _) in self._manifests.items()
                   for p in m.parts for r in m.chain(p)}
        records.update(self._records)
    done = {"parts": 0, "blocks": 0, "failed": 0}
    _rebuild(self, rec, [records[k] for k in keys if k in records], done)
    rec.close()
    self._repair_result = done
    log.info("SMP %d repaired after restart: %s", me, done)
    return done


def repair_manifest(self: SnapshotStore, man: Manifest, sources: dict[int, Any]) -> None:
    """After a seal: rebuild what the manifest places here but this SMP lacks (a part
    committed to this host's previous SMP, or a block sent to it, before it restarted)."""
    from monolith_py.snapshot.recovery import Recovery

    me = self.config.host_id
    with self._mu:  # only what retention keeps: a chain a composed full part replaced is
        keys, _, _ = self._needed()  # freed on purpose, not lost
        records = [r for p in man.parts for r in man.chain(p) if r.key in keys]
    missing = [r for r in records if _missing_here(self, r)]
    if not missing:
        return
    rec = Recovery({**sources, me: self}, me, job=self.config.job)
    done = {"parts": 0, "blocks": 0, "failed": 0}
    _rebuild(self, rec, missing, done)
    rec.close()
    log.info("SMP %d: rebuilt what snapshot %d places here: %s", me, man.snapshot_id, done)
