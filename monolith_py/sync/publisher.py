"""The PS-shard side of sync: deltas from table change tracking, and the dense board.

:class:`ShardPublisher` wraps one shard's tables (``{name: EmbeddingTable}``) and answers
"I have you at ``position``" with the delta that brings that reader to the current state
(rows only, no optimizer slots): incremental via ``EmbeddingTable.changes_since`` when the
reader is in this shard's epoch and the deletion log still covers it, a full resync
otherwise. It never loses a change whatever the gap: rows carry the version of their last
write, and deletions are logged until trimmed (see :mod:`monolith_py.sync.retention`).

The ``epoch`` is a random id drawn at construction and whenever a table's version goes
back (a restore from a snapshot): readers of an older epoch get a full resync instead of
mixing two histories. Call :meth:`ShardPublisher.new_epoch` after restoring the tables.

Thread-safety: the tables are not thread-safe; pass the ``lock`` their writer holds while
mutating them (e.g. :class:`~monolith_py.sync.locked.LockedBackend`'s). Every read of the
tables here happens under it; encoding happens outside it.

Example::

    >>> import torch
    >>> from monolith_py.table import EmbeddingTable, TableConfig
    >>> t = EmbeddingTable(TableConfig("item", dim=4))
    >>> pub = ShardPublisher(0, {"item": t})
    >>> _ = t.lookup(torch.tensor([5, 6]), train=True)          # admits two keys
    >>> full = pub.delta_since(None)
    >>> full.full, full.tables["item"].keys.tolist()
    (True, [5, 6])
    >>> _ = t.erase(torch.tensor([5]))
    >>> d = pub.delta_since(pub.position_of(full))
    >>> d.full, d.tables["item"].deleted.tolist()
    (False, [5])
"""

from __future__ import annotations

import collections
import contextlib
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from monolith_py.errors import InvalidInputError
from monolith_py.observe.metrics import counter, gauge
from monolith_py.sync.codec import DEFAULT_CHUNK_BYTES, encode_delta, encode_dense, decode_dense
from monolith_py.sync.protocol import ShardDelta, ShardPosition, TablePatch
from monolith_py.sync.retention import trim_version

__all__ = ["ShardPublisher", "DenseBoard", "new_epoch_id"]

_HISTORY = 4096
_CACHE_ENTRIES = 8
_CACHE_MAX_BYTES = 64 << 20


def new_epoch_id() -> int:
    """A random incarnation id (JSON-safe: below 2**53)."""
    return secrets.randbits(52)


class ShardPublisher:
    """Deltas of one PS shard for any number of readers.

    Args:
        shard: this shard's index.
        tables: ``{table name: EmbeddingTable}`` held by the shard.
        lock: held by whoever mutates the tables; ``None`` when nothing else runs.
        retention_s: deletions are kept this long (readers further behind resync fully).
        auto_trim: trim the tables' deletion logs per the retention policy (set False
            when another reader, e.g. incremental snapshots, owns trimming; then call
            :meth:`trim_point` and trim to the minimum of all readers).
        trim_guard: optional ``table -> lowest version another reader still needs``;
            automatic trimming never goes past it.
        clock: monotonic seconds (injectable for tests).
    """

    def __init__(
        self,
        shard: int,
        tables: Mapping[str, Any],
        *,
        lock: threading.Lock | threading.RLock | None = None,
        retention_s: float = 600.0,
        auto_trim: bool = True,
        trim_guard: Callable[[str], int] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not tables:
            raise InvalidInputError("ShardPublisher needs at least one table")
        if not retention_s > 0:
            raise InvalidInputError(f"retention_s must be > 0 seconds, got {retention_s!r}")
        self.shard = int(shard)
        self._tables = dict(tables)
        self._lock = lock if lock is not None else contextlib.nullcontext()
        self._retention = float(retention_s)
        self._auto_trim = bool(auto_trim)
        self._guard = trim_guard
        self._clock = clock
        self._mu = threading.Lock()  # publisher's own state
        self._history: dict[str, collections.deque[tuple[float, int]]] = {
            n: collections.deque(maxlen=_HISTORY) for n in self._tables}
        self._cache: collections.OrderedDict[Any, tuple[list[bytes], ShardPosition]] = (
            collections.OrderedDict())
        self._last_trim = -1e18
        self._seq = 0
        with self._lock:
            self._start_epoch_locked()
        self._m_full = counter("monolith_sync_full_resyncs_total",
                               "Full resyncs served by a PS shard.", ["shard"])
        self._m_deltas = counter("monolith_sync_deltas_total",
                                 "Incremental deltas computed by a PS shard.", ["shard"])
        self._m_epoch = gauge("monolith_sync_epoch_changes", "Epochs started by a shard.",
                              ["shard"])

    @classmethod
    def for_ps_shard(cls, shard: Any, **kwargs: Any) -> ShardPublisher:
        """The publisher of a :class:`monolith_py.ps.PSShard` (its id, tables and lock).

        Host it on the shard's gRPC server::

            pub = ShardPublisher.for_ps_shard(shard)
            sync = SyncService(pub, DenseBoard() if shard.shard_id == 0 else None)
            PSServer(shard, extra_handlers=[sync.handler()], max_workers=4 + subscribers)
        """
        return cls(int(shard.shard_id), shard.tables, lock=shard.lock, **kwargs)

    # -- epoch and position ---------------------------------------------------------------

    def _start_epoch_locked(self) -> None:
        with self._mu:
            self._epoch = new_epoch_id()
            self._seen = {n: int(t.version) for n, t in self._tables.items()}
            # readers of this epoch start from a full copy at or after these versions
            self._floor = dict(self._seen)
            self._cache.clear()

    def new_epoch(self) -> int:
        """Start a new epoch (call after the tables were restored); returns it."""
        with self._lock:
            self._start_epoch_locked()
        self._m_epoch.labels(shard=str(self.shard)).inc()
        return self._epoch

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def table_names(self) -> list[str]:
        return list(self._tables)

    def _versions_locked(self) -> dict[str, int]:
        versions = {n: int(t.version) for n, t in self._tables.items()}
        with self._mu:
            regressed = any(v < self._seen[n] for n, v in versions.items())
        if regressed:  # restored behind our back: never mix the two histories
            self._start_epoch_locked()
            self._m_epoch.labels(shard=str(self.shard)).inc()
        with self._mu:
            self._seen = versions
        return versions

    def position(self) -> ShardPosition:
        """The shard's current position."""
        with self._lock:
            return ShardPosition(self._epoch, self._versions_locked())

    def position_of(self, delta: ShardDelta) -> ShardPosition:
        """Where a reader stands after applying ``delta`` (a full one from this shard)."""
        return ShardPosition(delta.epoch, delta.position_after())

    # -- deltas ---------------------------------------------------------------------------

    def _needs_full(self, pos: ShardPosition | None, versions: Mapping[str, int]) -> bool:
        if pos is None or pos.epoch != self._epoch or set(pos.versions) != set(versions):
            return True
        return any(pos.versions[n] < self._floor[n] or pos.versions[n] > versions[n]
                   for n in versions)

    def _delta_locked(self, pos: ShardPosition | None,
                      versions: Mapping[str, int]) -> ShardDelta | None:
        full = self._needs_full(pos, versions)
        patches: dict[str, TablePatch] = {}
        for name, t in self._tables.items():
            since = -1 if full else int(pos.versions[name])  # type: ignore[union-attr]
            if not full and since == versions[name]:
                continue
            d = t.changes_since(since)
            # a full delta replaces the reader's rows: deletions are implied
            deleted = d.deleted_keys if not full else np.zeros(0, np.int64)
            patches[name] = TablePatch(name, int(t.dim), since, int(d.version), d.keys,
                                       d.rows, deleted)
        if not full and not patches:
            return None
        (self._m_full if full else self._m_deltas).labels(shard=str(self.shard)).inc()
        return ShardDelta(self.shard, self._epoch, full, patches)

    def delta_since(self, pos: ShardPosition | None) -> ShardDelta | None:
        """The delta that brings a reader at ``pos`` to now (``None``: nothing new)."""
        with self._lock:
            versions = self._versions_locked()
            return self._delta_locked(pos, versions)

    def frames_since(
        self,
        pos: ShardPosition | None,
        *,
        fp16: bool = False,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> tuple[list[bytes], ShardPosition]:
        """Encoded frames of :meth:`delta_since` and the reader's position after them
        (no frames when there is nothing new). Readers at the same position share one
        computation (a small cache keyed by both positions)."""
        self.maybe_trim()
        key_pos = None if pos is None else (pos.epoch, tuple(sorted(pos.versions.items())))
        with self._lock:
            versions = self._versions_locked()
            key = (self._epoch, key_pos, tuple(sorted(versions.items())), bool(fp16),
                   int(chunk_bytes))
            with self._mu:
                hit = self._cache.get(key)
            if hit is not None:
                return hit
            delta = self._delta_locked(pos, versions)
            epoch = self._epoch
            with self._mu:
                self._seq += 1
                seq = self._seq
        if delta is None:
            return [], ShardPosition(epoch, versions)
        frames = encode_delta(delta, seq=seq, fp16=fp16, chunk_bytes=chunk_bytes)
        after = ShardPosition(epoch, {**(pos.versions if pos and not delta.full else {}),
                                      **delta.position_after()})
        if sum(len(f) for f in frames) <= _CACHE_MAX_BYTES:
            with self._mu:
                self._cache[key] = (frames, after)
                while len(self._cache) > _CACHE_ENTRIES:
                    self._cache.popitem(last=False)
        return frames, after

    # -- deletion-log retention -----------------------------------------------------------

    def trim_point(self, now: float | None = None) -> dict[str, int]:
        """Per table, the version the retention policy allows trimming to (sampling the
        tables' versions as a side effect)."""
        t_now = self._clock() if now is None else float(now)
        with self._lock:
            versions = self._versions_locked()
        out = {}
        with self._mu:
            for name, v in versions.items():
                h = self._history[name]
                if not h or h[-1][1] != v:
                    h.append((t_now, v))
                times = np.fromiter((x[0] for x in h), dtype=np.float64, count=len(h))
                vers = np.fromiter((x[1] for x in h), dtype=np.int64, count=len(h))
                out[name] = trim_version(times, vers, t_now, self._retention)
        return out

    def trim(self, now: float | None = None) -> dict[str, int]:
        """Trim every table's deletion log per the policy (and ``trim_guard``); readers
        behind the new floor get a full resync. Returns the floors."""
        points = self.trim_point(now)
        with self._lock:
            for name, v in points.items():
                if self._guard is not None:
                    v = min(v, int(self._guard(name)))
                with self._mu:
                    if v <= self._floor[name]:
                        continue
                    self._floor[name] = v
                self._tables[name].trim_changes(v)
            with self._mu:
                return dict(self._floor)

    def maybe_trim(self) -> None:
        """Sample versions and trim at most once a second (called on every read)."""
        now = self._clock()
        if now - self._last_trim < 1.0:
            return
        self._last_trim = now
        if self._auto_trim:
            self.trim(now)
        else:
            self.trim_point(now)

    @property
    def floors(self) -> dict[str, int]:
        """Per table, the oldest version readers can follow incrementally from."""
        with self._mu:
            return dict(self._floor)


class DenseBoard:
    """The latest dense state (model spec + tensors) of a training job, held by one PS
    shard's sync service so serving workers pull it with their deltas.

    ``put`` validates the frame and stamps it with this board's ``(epoch, version)``;
    ``latest`` returns ``((epoch, version), frame)``. Thread-safe.

    Example::

        >>> import numpy as np
        >>> board = DenseBoard()
        >>> ident = board.put_state({"kind": "dlrm"}, {"w": np.ones(2, np.float32)})
        >>> board.latest()[0] == ident
        True
    """

    def __init__(self) -> None:
        self._mu = threading.Lock()
        self._epoch = new_epoch_id()
        self._version = 0
        self._frame: bytes | None = None
        self._m_puts = counter("monolith_sync_dense_puts_total", "Dense states published.")

    def put(self, frame: bytes) -> tuple[int, int]:
        """Publish an encoded dense frame (:func:`~monolith_py.sync.codec.encode_dense`);
        raises :class:`~monolith_py.errors.DecodeError` when it is malformed."""
        dense = decode_dense(frame)
        return self.put_state(dense.spec, dense.tensors)

    def put_state(self, spec: Mapping[str, Any], tensors: Mapping[str, Any]) -> tuple[int, int]:
        """Publish a spec dict and tensors (torch or numpy) directly (in-process mode)."""
        with self._mu:
            version = self._version + 1
            frame = encode_dense(spec, tensors, epoch=self._epoch, version=version)
            self._version, self._frame = version, frame
        self._m_puts.inc()
        return (self._epoch, version)

    def latest(self) -> tuple[tuple[int, int], bytes] | None:
        with self._mu:
            if self._frame is None:
                return None
            return (self._epoch, self._version), self._frame
