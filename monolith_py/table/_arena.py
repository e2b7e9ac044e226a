"""Row arena (private): rows, optimizer slots and per-row metadata in parallel arrays.

Rows are addressed by index; freed rows go on a free stack and are reused first. The
arrays grow (by doubling) when the free stack runs dry.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from monolith_py.table._kernels import EMPTY

__all__: list[str] = []  # private module


@njit(cache=True)
def gather_rows(weights, rows, out):  # type: ignore[no-untyped-def]
    """out[i] = weights[rows[i]], zeros where rows[i] < 0."""
    dim = weights.shape[1]
    for i in range(rows.shape[0]):
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
    gradients to ``gsum[:u]``; returns ``u``. ``mark`` (one int64 per arena row, all -1)
    is restored to -1 before returning.
    """
    dim = grads.shape[1]
    u = 0
    for i in range(rows.shape[0]):
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


class RowArena:
    """Parallel per-row arrays: ``weights [cap, dim]``, one array per optimizer slot, and
    metadata ``key``, ``last_update``, ``update_count``, ``version`` (int64 ``[cap]``).
    ``key[r] == EMPTY`` marks a free row."""

    def __init__(self, dim: int, slot_specs: dict[str, tuple[int, float]], capacity: int) -> None:
        self.dim = dim
        self.slot_specs = dict(slot_specs)
        self.capacity = 0
        self.weights = np.zeros((0, dim), dtype=np.float32)
        self.slots: dict[str, np.ndarray] = {
            name: np.zeros((0, width), dtype=np.float32) for name, (width, _) in slot_specs.items()
        }
        self.key = np.zeros(0, dtype=np.int64)
        self.last_update = np.zeros(0, dtype=np.int64)
        self.update_count = np.zeros(0, dtype=np.int64)
        self.version = np.zeros(0, dtype=np.int64)
        self.mark = np.zeros(0, dtype=np.int64)
        self._free = np.zeros(0, dtype=np.int64)  # stack; top is the end
        self._nfree = 0
        self.high_water = 0  # rows [0, high_water) have ever been used
        self._grow_to(max(1, int(capacity)))

    @property
    def live(self) -> int:
        return self.high_water - self._nfree

    @property
    def memory_bytes(self) -> int:
        arrays = [self.weights, self.key, self.last_update, self.update_count, self.version,
                  self.mark, self._free, *self.slots.values()]
        return int(sum(a.nbytes for a in arrays))

    def _grow_to(self, cap: int) -> None:
        old = self.capacity

        def extend(a: np.ndarray, fill: float | int) -> np.ndarray:
            out = np.empty((cap, *a.shape[1:]), dtype=a.dtype)
            out[:old] = a[:old]
            out[old:] = fill
            return out

        self.weights = extend(self.weights, 0.0)
        self.slots = {n: extend(a, self.slot_specs[n][1]) for n, a in self.slots.items()}
        self.key = extend(self.key, EMPTY)
        self.last_update = extend(self.last_update, 0)
        self.update_count = extend(self.update_count, 0)
        self.version = extend(self.version, 0)
        self.mark = extend(self.mark, -1)
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
        self.key[rows] = EMPTY
        self._free[self._nfree : self._nfree + rows.shape[0]] = rows
        self._nfree += rows.shape[0]

    def live_rows(self) -> np.ndarray:
        """Indices of rows in use."""
        return np.flatnonzero(self.key[: self.high_water] != EMPTY)
