"""``CuckooHashMap``: a growing int64 -> int64 map with batch operations in compiled kernels.

Bucketized cuckoo hashing: every key has two candidate buckets of 4 slots; a bucket is one
64-byte cache line (4 keys, then their 4 values), so a lookup reads at most two cache lines,
and both are prefetched a few keys ahead. Inserts displace keys along the shortest path
found by a bounded breadth-first search. When an insert would push the load factor past
``max_load_factor`` (or no displacement path exists) the map grows by ``growth_factor`` and
rehashes. See ``docs/design/0002-embedding-table.md`` for the memory/speed trade-offs.

Keys cover the whole int64 range except ``INT64_MIN``, the empty-slot marker, which is
rejected with :class:`~monolith_py.errors.InvalidInputError`.
"""

from __future__ import annotations

import math
import secrets
from typing import Any

import numba
import numpy as np

from monolith_py.errors import ConfigError, InvalidInputError
from monolith_py.table import _kernels as K
from monolith_py.table._arrays import aligned_empty, as_keys, as_values, check_reserved

__all__ = ["CuckooHashMap"]

_PARALLEL_MIN = 1 << 16  # batches at least this long use every core for find()
_MIN_BUCKETS = 2
_MAX_BUCKETS = 1 << 32  # the multiply-shift bucket reduction works on 32-bit halves
_STREAM_MIN = 1 << 15  # maps at least this big rehash with the parallel streaming kernel
_STREAM_PARTS = 16


class CuckooHashMap:
    """An int64 -> int64 hash map for batches of keys (numpy arrays or torch tensors).

    Args:
        initial_capacity: slots to start with (rounded up to whole buckets of 4).
        max_load_factor: the map grows before its load (keys / slots) would exceed this;
            in (0, 0.97].
        growth_factor: capacity multiplier on growth, > 1.
        hash_seed: salt of the bucket hash; ``None`` draws a random one per map, so keys
            cannot be crafted offline to collide (the layout never leaks into results or
            state; pass a seed only to reproduce a layout).

    Batch semantics: every operation takes a 1-D array of int64 keys (``[n]``) and applies
    them in order, so duplicates behave as if applied one after another (last value wins
    in :meth:`insert_or_assign`). Results are numpy arrays.

    Example::

        >>> import numpy as np
        >>> m = CuckooHashMap()
        >>> m.insert_or_assign(np.array([7, -3, 7]), np.array([1, 2, 3]))
        >>> m.find(np.array([7, -3, 5])).tolist()
        [3, 2, -1]
        >>> m.erase(np.array([-3, 42])).tolist()
        [True, False]
        >>> len(m)
        1
    """

    def __init__(
        self,
        initial_capacity: int = 1024,
        max_load_factor: float = 0.9,
        growth_factor: float = 2.0,
        hash_seed: int | None = None,
    ) -> None:
        if not isinstance(initial_capacity, (int, np.integer)) or not (
            1 <= initial_capacity <= _MAX_BUCKETS * K.SLOTS
        ):
            raise ConfigError(
                f"initial_capacity must be an int in [1, 2**34], got {initial_capacity!r}"
            )
        if not isinstance(max_load_factor, (int, float)) or not isinstance(
            growth_factor, (int, float)
        ):
            raise ConfigError(
                f"max_load_factor and growth_factor must be numbers, got {max_load_factor!r}, "
                f"{growth_factor!r}"
            )
        if not (0.0 < float(max_load_factor) <= 0.97):
            raise ConfigError(
                f"max_load_factor must be in (0, 0.97], got {max_load_factor!r} "
                "(bucketized cuckoo hashing with 4 slots stops finding room near 0.98)"
            )
        if not (float(growth_factor) > 1.0):
            raise ConfigError(f"growth_factor must be > 1, got {growth_factor!r}")
        self._initial_buckets = max(_MIN_BUCKETS, -(-int(initial_capacity) // K.SLOTS))
        self._max_load = float(max_load_factor)
        self._growth = float(growth_factor)
        if hash_seed is None:
            hash_seed = secrets.randbits(64)
        self._salt = np.uint64(int(hash_seed) & 0xFFFFFFFFFFFFFFFF)
        self._queue = np.empty((4, K._QMAX), dtype=np.int64)
        self._size = 0
        self._tab = self._new_table(self._initial_buckets)
        self.grow_count = 0

    # -- properties -------------------------------------------------------------------------

    @staticmethod
    def _new_table(buckets: int) -> np.ndarray:
        tab = aligned_empty(buckets * K.WIDTH)
        view = tab.reshape(buckets, K.WIDTH)
        view[:, : K.SLOTS] = K.EMPTY
        view[:, K.SLOTS :] = 0
        return tab

    @property
    def num_buckets(self) -> int:
        return self._tab.shape[0] // K.WIDTH

    @property
    def capacity(self) -> int:
        """Number of slots (keys the map could hold at load factor 1)."""
        return self.num_buckets * K.SLOTS

    @property
    def load_factor(self) -> float:
        """Keys / slots."""
        return self._size / self.capacity

    @property
    def max_load_factor(self) -> float:
        return self._max_load

    @property
    def memory_bytes(self) -> int:
        """Bytes held by the index (16 per slot)."""
        return int(self._tab.nbytes)

    def __len__(self) -> int:
        return self._size

    def __repr__(self) -> str:
        return (
            f"CuckooHashMap(size={self._size}, capacity={self.capacity}, "
            f"load_factor={self.load_factor:.3f})"
        )

    # -- growth ---------------------------------------------------------------------------

    def _limit(self) -> int:
        return int(self._max_load * self.capacity)

    def _buckets_for(self, keys: int) -> int:
        return max(_MIN_BUCKETS, math.ceil(keys / (self._max_load * K.SLOTS)))

    def _resize(self, buckets: int) -> None:
        buckets = min(buckets, _MAX_BUCKETS)
        if buckets <= self.num_buckets:
            raise InvalidInputError(
                f"CuckooHashMap is full: {self._size} keys in {self.capacity} slots, the "
                "most one map can address; shard the keys over more maps"
            )
        while True:
            new = self._rehashed(buckets)
            if new is not None:
                self._tab = new
                self.grow_count += 1
                return
            buckets = min(int(buckets * 1.1) + 1, _MAX_BUCKETS)  # pragma: no cover

    def _rehashed(self, buckets: int) -> np.ndarray | None:
        """A new table of ``buckets`` holding every key, or None if one did not fit."""
        old_buckets = self.num_buckets
        if self._size < _STREAM_MIN:
            new = self._new_table(buckets)
            return new if K.rehash(self._tab, new, self._salt, self._queue) else None
        parts = _STREAM_PARTS
        obounds = np.array([old_buckets * p // parts for p in range(parts + 1)], dtype=np.int64)
        nbounds = np.array([buckets * p // parts for p in range(parts + 1)], dtype=np.int64)
        room = max(1024, self._size // (4 * parts))
        dkeys = np.empty((parts, room), dtype=np.int64)
        dvals = np.empty((parts, room), dtype=np.int64)
        dcount = np.empty(parts, dtype=np.int64)
        new = aligned_empty(buckets * K.WIDTH)  # rehash_stream marks it empty
        with numba.parallel_chunksize(1):
            K.rehash_stream(self._tab, new, self._salt, obounds, nbounds, dkeys, dvals, dcount)
        if (dcount < 0).any():  # pragma: no cover - needs a pathological key set
            new = self._new_table(buckets)
            return new if K.rehash(self._tab, new, self._salt, self._queue) else None
        return new if K.place_deferred(new, self._salt, dkeys, dvals, dcount, self._queue) else None

    def _grow(self, need: int) -> None:
        target = max(int(self.num_buckets * self._growth) + 1, self._buckets_for(need))
        self._resize(target)

    def reserve(self, n: int) -> None:
        """Make room for ``n`` keys in total without further growth (never shrinks)."""
        want = self._buckets_for(int(n))
        if want > self.num_buckets:
            self._resize(want)

    # -- batch operations -------------------------------------------------------------------

    def find(self, keys: Any, default: int = -1) -> np.ndarray:
        """Values of ``keys`` (``[n]`` int64), ``default`` where a key is absent."""
        k = as_keys(keys)
        out = np.empty(k.shape[0], dtype=np.int64)
        if k.shape[0] >= _PARALLEL_MIN:
            # chunks handed out one at a time: on a shared machine one core is often busier
            with numba.parallel_chunksize(1):
                bad = K.find_parallel(self._tab, self._salt, k, out, np.int64(default))
        else:
            bad = K.find_serial(self._tab, self._salt, k, out, np.int64(default))
        if bad:
            check_reserved(k)
        return out

    def _upsert(self, k: np.ndarray, v: np.ndarray, mode: int) -> tuple[np.ndarray, np.ndarray]:
        n = k.shape[0]
        if mode == 1:
            out = np.empty(n, dtype=np.int64)
            inserted = np.empty(n, dtype=np.bool_)
        else:
            out = np.empty(0, dtype=np.int64)
            inserted = np.empty(0, dtype=np.bool_)
        start = 0
        while True:
            start, self._size = K.upsert(
                self._tab, self._salt, k, v, start, self._size, self._limit(), mode, out, inserted,
                self._queue,
            )
            if start >= n:
                return out, inserted
            self._grow(self._size + 1)

    def insert_or_assign(self, keys: Any, values: Any) -> None:
        """Set ``map[keys[i]] = values[i]`` in order (``values``: ``[n]`` int64 or a scalar)."""
        k = as_keys(keys)
        v = as_values(values, k.shape[0])
        check_reserved(k)
        self._upsert(k, v, 0)

    def find_or_insert(
        self, keys: Any, new_values: Any, *, return_inserted: bool = False
    ) -> Any:
        """Values of ``keys``; absent keys are inserted first with ``new_values[i]``.

        Returns ``values`` (``[n]`` int64), or ``(values, inserted)`` with
        ``return_inserted=True`` (``inserted[i]`` is True where ``keys[i]`` was added by
        this call; for a key repeated in the batch only its first occurrence inserts).
        """
        k = as_keys(keys)
        v = as_values(new_values, k.shape[0], "new_values")
        check_reserved(k)
        out, inserted = self._upsert(k, v, 1)
        return (out, inserted) if return_inserted else out

    def erase(self, keys: Any) -> np.ndarray:
        """Remove ``keys``; returns a bool mask ``[n]`` of those that were present."""
        k = as_keys(keys)
        check_reserved(k)
        mask = np.empty(k.shape[0], dtype=np.bool_)
        self._size -= int(K.erase(self._tab, self._salt, k, mask))
        return mask

    def contains(self, keys: Any) -> np.ndarray:
        """Bool mask ``[n]``: which keys are present (two lookups with different
        defaults, since any int64 may be a stored value)."""
        k = as_keys(keys)
        return ~((self.find(k, 0) == 0) & (self.find(k, 1) == 1))

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """All ``(keys, values)`` as two ``[len]`` int64 arrays (in no particular order)."""
        keys = np.empty(self._size, dtype=np.int64)
        values = np.empty(self._size, dtype=np.int64)
        K.export(self._tab, keys, values)
        return keys, values

    def bucket_pairs(self, keys: Any, num_buckets: int | None = None) -> np.ndarray:
        """The two candidate buckets ``[n, 2]`` of ``keys`` at ``num_buckets`` (default:
        the current size). For tests and diagnostics."""
        k = as_keys(keys)
        out = np.empty((k.shape[0], 2), dtype=np.int64)
        K.bucket_pairs(k, int(num_buckets or self.num_buckets), self._salt, out)
        return out

    @property
    def hash_seed(self) -> int:
        return int(self._salt)

    def clear(self) -> None:
        """Remove every key and shrink back to the initial capacity."""
        self._tab = self._new_table(self._initial_buckets)
        self._size = 0
