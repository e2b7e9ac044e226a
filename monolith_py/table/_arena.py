"""Row arena (private): rows, optimizer slots and per-row metadata in parallel arrays.

Rows are addressed by index; freed rows go on a free stack and are reused first. The
arrays grow (by doubling) when the free stack runs dry. Row ``r``'s metadata is one
32-byte record ``meta[r] = (key, last_update, update_count, version)`` so an update
touches one cache line of metadata.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from monolith_py.table._arrays import aligned_array, prefaulted_zeros
from monolith_py.table._kernels import EMPTY, prefetch_row

__all__: list[str] = []  # private module

KEY, LAST, COUNT, VERSION = 0, 1, 2, 3
_PF = 8


def aligned_zeros(shape: tuple[int, ...], dtype: type, fill: float | int = 0) -> np.ndarray:
    """A 64-byte aligned array filled with ``fill`` (huge pages when large)."""
    return aligned_array(shape, dtype, fill)


@njit(cache=True)
def gather_rows(weights, rows, out):  # type: ignore[no-untyped-def]
    """out[i] = weights[rows[i]], zeros where rows[i] < 0."""
    dim = weights.shape[1]
    n = rows.shape[0]
    for i in range(n):
        if i + _PF < n and rows[i + _PF] >= 0:
            prefetch_row(weights, rows[i + _PF])
        r = rows[i]
        if r >= 0:
            for j in range(dim):
                out[i, j] = weights[r, j]
        else:
            for j in range(dim):
                out[i, j] = 0.0


@njit(cache=True)
def sum_by_row(rows, grads, mark, urows, gsum):  # type: ignore[no-untyped-def]
    """Sum the gradients of repeated rows, skipping rows < 0.

    Writes the unique rows to ``urows[:u]`` (first-occurrence order) and their summed
    gradients to ``gsum[:u]``; returns ``u``. ``mark`` (int32, one per arena row, all -1)
    is restored to -1 before returning.
    """
    dim = grads.shape[1]
    u = 0
    n = rows.shape[0]
    for i in range(n):
        r = rows[i]
        if r < 0:
            continue
        p = mark[r]
        if p < 0:
            mark[r] = u
            urows[u] = r
            for j in range(dim):
                gsum[u, j] = grads[i, j]
            u += 1
        else:
            for j in range(dim):
                gsum[p, j] += grads[i, j]
    for i in range(u):
        mark[urows[i]] = -1
    return u


@njit(cache=True)
def rows_written_after(meta, high_water, version, out):  # type: ignore[no-untyped-def]
    """Live rows whose last write is after ``version`` into ``out``; returns the count."""
    c = 0
    for r in range(high_water):
        if meta[r, 0] != EMPTY and meta[r, 3] > version:
            out[c] = r
            c += 1
    return c


class RowArena:
    """Parallel per-row arrays: ``weights [cap, dim]`` float32, one array per optimizer slot
    (``[cap, width]`` float32) and ``meta [cap, 4]`` int64 (``key`` is ``EMPTY`` on free
    rows)."""

    def __init__(self, dim: int, slot_specs: dict[str, tuple[int, float]], capacity: int) -> None:
        self.dim = dim
        self.slot_specs = dict(slot_specs)
        self.capacity = 0
        self.weights = aligned_zeros((0, dim), np.float32)
        self.slots: dict[str, np.ndarray] = {
            name: aligned_zeros((0, width), np.float32) for name, (width, _) in slot_specs.items()
        }
        self.meta = aligned_zeros((0, 4), np.int64)
        self.mark = np.zeros(0, dtype=np.int32)
        self._free = np.zeros(0, dtype=np.int64)  # stack; top is the end
        self._nfree = 0
        self.high_water = 0  # rows [0, high_water) have ever been used
        self._grow_to(max(1, int(capacity)))

    @classmethod
    def for_load(cls, dim: int, slot_specs: dict[str, tuple[int, float]], n: int,
                 capacity: int) -> RowArena:
        """An arena of ``max(n, capacity)`` rows whose rows ``[0, n)`` are in use and
        still zero, for a caller to write whole (a state load: each array is written once,
        into pages mapped in one call); the rows above ``n`` are free room, as in a new
        arena (key ``EMPTY``, slots at their initial values)."""
        cap = max(1, int(n), int(capacity))
        a = cls.__new__(cls)
        a.dim = dim
        a.slot_specs = dict(slot_specs)
        a.capacity = cap
        a.weights = prefaulted_zeros((cap, dim), np.float32)
        a.slots = {}
        for name, (width, init) in a.slot_specs.items():
            arr = prefaulted_zeros((cap, width), np.float32)
            if init != 0:
                arr[n:] = init
            a.slots[name] = arr
        a.meta = prefaulted_zeros((cap, 4), np.int64)
        a.meta[n:, KEY] = EMPTY
        a.mark = np.full(cap, -1, dtype=np.int32)
        a._free = np.empty(cap, dtype=np.int64)
        a._nfree = 0
        a.high_water = int(n)
        return a

    def reuse_for_load(self, n: int) -> bool:
        """Turn a never-used arena with room for ``n`` rows into what :meth:`for_load`
        returns (its pages are already mapped); False (unchanged) when it does not fit."""
        if self.high_water or self._nfree or n > self.capacity:
            return False
        self.high_water = int(n)
        return True

    # column views of meta
    @property
    def key(self) -> np.ndarray:
        return self.meta[:, KEY]

    @property
    def last_update(self) -> np.ndarray:
        return self.meta[:, LAST]

    @property
    def update_count(self) -> np.ndarray:
        return self.meta[:, COUNT]

    @property
    def version(self) -> np.ndarray:
        return self.meta[:, VERSION]

    @property
    def live(self) -> int:
        return self.high_water - self._nfree

    @property
    def memory_bytes(self) -> int:
        arrays = [self.weights, self.meta, self.mark, self._free, *self.slots.values()]
        return int(sum(a.nbytes for a in arrays))

    def _grow_to(self, cap: int) -> None:
        old = self.capacity

        def extend(a: np.ndarray, fill: float | int) -> np.ndarray:
            out = aligned_zeros((cap, *a.shape[1:]), a.dtype.type, fill)
            out[:old] = a[:old]
            return out

        self.weights = extend(self.weights, 0.0)
        self.slots = {n: extend(a, self.slot_specs[n][1]) for n, a in self.slots.items()}
        meta = extend(self.meta, 0)
        meta[old:, KEY] = EMPTY
        self.meta = meta
        mark = np.full(cap, -1, dtype=np.int32)
        mark[:old] = self.mark[:old]
        self.mark = mark
        free = np.empty(cap, dtype=np.int64)
        free[: self._nfree] = self._free[: self._nfree]
        self._free = free
        self.capacity = cap

    def alloc(self, n: int) -> np.ndarray:
        """``n`` rows with slots reset to their initial values (weights untouched)."""
        take = min(n, self._nfree)
        rows = np.empty(n, dtype=np.int64)
        if take:
            rows[:take] = self._free[self._nfree - take : self._nfree][::-1]
            self._nfree -= take
        rest = n - take
        if rest:
            if self.high_water + rest > self.capacity:
                self._grow_to(max(2 * self.capacity, self.high_water + rest))
            rows[take:] = np.arange(self.high_water, self.high_water + rest, dtype=np.int64)
            self.high_water += rest
        for name, (_, init) in self.slot_specs.items():
            self.slots[name][rows] = init
        return rows

    def free(self, rows: np.ndarray) -> None:
        """Return rows to the free stack (their key becomes EMPTY)."""
        self.meta[rows, KEY] = EMPTY
        self._free[self._nfree : self._nfree + rows.shape[0]] = rows
        self._nfree += rows.shape[0]

    def rows_written_after(self, version: int) -> np.ndarray:
        """Indices of live rows written after ``version`` (ascending)."""
        out = np.empty(self.live, dtype=np.int64)
        c = rows_written_after(self.meta, self.high_water, np.int64(version), out)
        return out[:c]

    def live_rows(self) -> np.ndarray:
        """Indices of rows in use."""
        return np.flatnonzero(self.meta[: self.high_water, KEY] != EMPTY)
