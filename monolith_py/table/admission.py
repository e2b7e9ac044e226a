"""Frequency admission: a bounded-memory count-min sketch and the ``admit`` policy.

An id enters the table only once it has been *sighted* ``threshold`` times. Sightings of
ids not yet in the table are counted in a count-min sketch of ``depth`` rows of uint8
counters (saturating at 255) with conservative update: a sighting raises only the
counters that equal the key's current estimate. The estimate never under-counts; hash
collisions can only over-count, and more memory makes that rarer.

Merge rule (for N -> M resharding): sketches with the same ``depth`` and ``width`` (the
hashes are fixed, not seeded) merge by element-wise saturating addition. Every key's true
count lives in exactly one source shard, so the merged estimate is still an upper bound
of its count.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from numba import njit

from monolith_py.errors import InvalidInputError
from monolith_py.table._kernels import mix64

__all__ = ["CountMinSketch", "admit", "merge_counters"]

_LO32 = np.uint64(0xFFFFFFFF)
_S32 = np.uint64(32)
# One fixed salt per sketch row (so every shard hashes the same way and sketches merge).
_SALTS = np.array(
    [0x243F6A8885A308D3, 0x13198A2E03707344, 0x29F31D0082EFA98E, 0x082EFA98EC4E6C89,
     0x452821E638D01377, 0x3E5466CF34E90C6C, 0x40AC29B7C97C50DD, 0x3F84D5B5B5470917],
    dtype=np.uint64,
)


def admit(counts: np.ndarray, threshold: int) -> np.ndarray:
    """The admission policy: bool mask of ids sighted at least ``threshold`` times.

    Example::

        >>> admit(np.array([0, 1, 3]), threshold=2).tolist()
        [False, False, True]
    """
    return np.asarray(counts) >= threshold


def merge_counters(*counters: np.ndarray) -> np.ndarray:
    """Merge sketch counter arrays (e.g. the ``filter.counters`` of several shards' table
    states) by saturating addition; all must have the same shape.

    Example::

        >>> merge_counters(np.array([[1, 200]], np.uint8), np.array([[2, 100]], np.uint8))
        array([[  3, 255]], dtype=uint8)
    """
    if not counters:
        raise InvalidInputError("merge_counters needs at least one counter array")
    shape = np.asarray(counters[0]).shape
    total = np.zeros(shape, dtype=np.uint16)
    for c in counters:
        arr = np.asarray(c)
        if arr.dtype != np.uint8 or arr.shape != shape:
            raise InvalidInputError(
                f"sketch counters must all be uint8 {shape}, got {arr.dtype} {arr.shape}"
            )
        total += arr
        np.minimum(total, 255, out=total)
    return total.astype(np.uint8)


@njit(cache=True)
def _sketch_add(table, salts, keys, out):  # type: ignore[no-untyped-def]
    """Count one sighting of each key (conservative update); out[i] = new estimate."""
    depth = table.shape[0]
    width = np.uint64(table.shape[1])
    idx = np.empty(depth, dtype=np.int64)
    for i in range(keys.shape[0]):
        k = np.uint64(keys[i])
        est = 255
        for d in range(depth):
            h = mix64(k ^ salts[d])
            j = np.int64(((h & _LO32) * width) >> _S32)
            idx[d] = j
            c = np.int64(table[d, j])
            if c < est:
                est = c
        if est < 255:
            est += 1
            for d in range(depth):
                if table[d, idx[d]] < est:
                    table[d, idx[d]] = est
        out[i] = est


@njit(cache=True)
def _sketch_estimate(table, salts, keys, out):  # type: ignore[no-untyped-def]
    depth = table.shape[0]
    width = np.uint64(table.shape[1])
    for i in range(keys.shape[0]):
        k = np.uint64(keys[i])
        est = 255
        for d in range(depth):
            h = mix64(k ^ salts[d])
            c = np.int64(table[d, np.int64(((h & _LO32) * width) >> _S32)])
            if c < est:
                est = c
        out[i] = est


class CountMinSketch:
    """Approximate per-key sighting counts in ``memory_bytes`` bytes.

    Args:
        memory_bytes: total counter memory (``depth * width`` bytes).
        depth: hash rows (1..8).

    Example::

        >>> s = CountMinSketch(4096)
        >>> s.add(np.array([7, 7, 8])).tolist()
        [1, 2, 1]
        >>> s.estimate(np.array([7, 9])).tolist()
        [2, 0]
    """

    def __init__(self, memory_bytes: int, depth: int = 4) -> None:
        if not 1 <= depth <= len(_SALTS):
            raise InvalidInputError(f"depth must be in [1, {len(_SALTS)}], got {depth}")
        width = int(memory_bytes) // depth
        if width < 1:
            raise InvalidInputError(f"memory_bytes={memory_bytes} is too small for depth {depth}")
        self._table = np.zeros((depth, width), dtype=np.uint8)

    @property
    def depth(self) -> int:
        return int(self._table.shape[0])

    @property
    def width(self) -> int:
        return int(self._table.shape[1])

    @property
    def memory_bytes(self) -> int:
        return int(self._table.nbytes)

    def add(self, keys: np.ndarray) -> np.ndarray:
        """Count one sighting per entry of ``keys`` (int64 ``[n]``, in order); returns the
        estimates after counting (int64 ``[n]``)."""
        out = np.empty(keys.shape[0], dtype=np.int64)
        _sketch_add(self._table, _SALTS, keys, out)
        return out

    def estimate(self, keys: np.ndarray) -> np.ndarray:
        """Estimated sightings (an upper bound of the true count, capped at 255)."""
        out = np.empty(keys.shape[0], dtype=np.int64)
        _sketch_estimate(self._table, _SALTS, keys, out)
        return out

    def merge(self, other: CountMinSketch) -> None:
        """Add ``other``'s counts into this sketch (saturating); shapes must match."""
        if other._table.shape != self._table.shape:
            raise InvalidInputError(
                f"cannot merge sketches of shape {other._table.shape} into {self._table.shape}"
            )
        self._table[...] = merge_counters(self._table, other._table)

    def clear(self) -> None:
        self._table[...] = 0

    def state_dict(self) -> dict[str, Any]:
        return {"counters": self._table.copy()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        c = np.asarray(state.get("counters") if isinstance(state, Mapping) else None)
        if c.dtype != np.uint8 or c.shape != self._table.shape:
            raise InvalidInputError(
                f"sketch counters must be uint8 {self._table.shape}, got {c.dtype} {c.shape}"
            )
        self._table[...] = c
