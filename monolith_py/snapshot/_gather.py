"""Reading an :class:`~monolith_py.table.EmbeddingTable`'s row arena for snapshots (private).

This is the one place that knows the table's internal layout (``_arena`` with ``meta``
records ``(key, last_update, update_count, version)``, ``weights``, ``slots``;
``_log``, ``_filter``, ``_pending``, ``_version``, ``_clock``, ``_counters``). The public
``changes_since(v, include_state=True)`` returns the same rows but sorts them and allocates
fresh arrays while the shard lock is held; the kernels here scan the arena once and copy
the rows straight into a pre-faulted buffer. :func:`arena_of` returns ``None`` when the
layout is not the expected one, and the caller then falls back to ``state_dict()``
(correct, slower). ``tests/unit/snapshot/test_pspart.py`` checks these kernels against
``changes_since`` and ``state_dict``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numba import njit, prange

__all__: list[str] = []  # private module

_EMPTY = np.int64(np.iinfo(np.int64).min)


@dataclass
class ArenaView:
    """References (not copies) to one table's internals; valid while the lock is held."""

    meta: np.ndarray            # int64 [high_water, 4]
    weights: np.ndarray         # float32 [capacity, dim]
    slots: dict[str, np.ndarray]
    pending: np.ndarray
    deleted_keys: np.ndarray
    deleted_versions: np.ndarray
    filter_counters: np.ndarray | None
    version: int
    clock: int
    counters: dict[str, int]


def table_state_format() -> str:
    from monolith_py.table._state import STATE_FORMAT

    return STATE_FORMAT


def arena_of(table: Any) -> ArenaView | None:
    """The internals of ``table`` or ``None`` if its layout is not the one expected."""
    meta = meta_of(table)
    if meta is None:
        return None
    try:
        a = table._arena
        weights, slots = a.weights, dict(a.slots)
        dk, dv = table._log.arrays()
        flt = table._filter
        counters = {k: int(v) for k, v in table._counters.items()}
        view = ArenaView(meta=meta, weights=weights, slots=slots,
                         pending=np.asarray(table._pending, dtype=np.int64),
                         deleted_keys=dk, deleted_versions=dv,
                         filter_counters=None if flt is None else flt.state_dict()["counters"],
                         version=int(table._version), clock=int(table._clock),
                         counters=counters)
    except (AttributeError, KeyError, TypeError):
        return None
    ok = (weights.dtype == np.float32 and weights.ndim == 2
          and weights.shape[1] == table.dim and weights.shape[0] >= meta.shape[0]
          and all(s.dtype == np.float32 and s.ndim == 2 and s.shape[0] >= meta.shape[0]
                  for s in slots.values()))
    return view if ok else None


def meta_of(table: Any) -> np.ndarray | None:
    """The row records of ``table`` (a view: valid, if stale, after the lock is released,
    since a growing arena allocates new arrays) or ``None``."""
    try:
        a = table._arena
        meta = a.meta[: int(a.high_water)]
    except (AttributeError, TypeError):
        return None
    ok = isinstance(meta, np.ndarray) and meta.dtype == np.int64 and meta.ndim == 2
    return meta if ok and meta.shape[1] == 4 else None


@njit(cache=True)
def count_rows(meta, since):  # type: ignore[no-untyped-def]
    """``(live, dirty)`` counts of :func:`scan_rows`, without writing the indices."""
    nl = 0
    nd = 0
    for r in range(meta.shape[0]):
        if meta[r, 0] != _EMPTY:
            nl += 1
            if meta[r, 3] > since:
                nd += 1
    return nl, nd


@njit(cache=True)
def scan_rows(meta, since, live_out, dirty_out):  # type: ignore[no-untyped-def]
    """Live keys (arena order) into ``live_out``; rows with version > since into
    ``dirty_out``. Returns ``(live, dirty)`` counts."""
    nl = 0
    nd = 0
    for r in range(meta.shape[0]):
        k = meta[r, 0]
        if k != _EMPTY:
            live_out[nl] = k
            nl += 1
            if meta[r, 3] > since:
                dirty_out[nd] = r
                nd += 1
    return nl, nd


@njit(cache=True, parallel=True)
def _copy_rows(src, rows, dst):  # type: ignore[no-untyped-def]
    """dst[i] = src[rows[i]] (compiled once per dtype: float32 rows, int64 records)."""
    w = src.shape[1]
    for i in prange(rows.shape[0]):
        r = rows[i]
        for j in range(w):
            dst[i, j] = src[r, j]


def copy_rows(src: np.ndarray, rows: np.ndarray, dst: np.ndarray) -> None:
    """``dst[:n] = src[rows]`` for 2-D arrays, both threads (the capture's copy)."""
    if rows.shape[0]:
        _copy_rows(src, rows, dst)
