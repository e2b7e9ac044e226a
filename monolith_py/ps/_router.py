"""Splitting a step's keys by shard and putting the answers back in order (private).

Shared by the in-process :class:`~monolith_py.ps.ShardedBackend` and the gRPC
:class:`~monolith_py.ps.PSClient`, so both route exactly alike.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numba import njit

from monolith_py.errors import InvalidInputError, InvalidTypeError
from monolith_py.ps.routing import route
from monolith_py.table._arena import gather_rows as _gather_kernel

__all__: list[str] = []  # private module


@dataclass(frozen=True)
class Part:
    """Keys of one table bound for one shard, with their positions in the caller's array."""

    table: str
    keys: np.ndarray  # int64 [m], contiguous
    pos: np.ndarray  # int64 [m]: where these keys sit in the caller's keys of `table`


def _np(name: str, what: str, t: Any) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        return t.numpy()
    if isinstance(t, np.ndarray):
        return t
    raise InvalidTypeError(
        f"table {name!r}: {what} must be a torch.Tensor or numpy array, got {type(t).__name__}")


def check_keys(keys: Mapping[str, Any], dims: Mapping[str, int]) -> dict[str, np.ndarray]:
    """Validate ``{table: int64 keys [n]}`` against the known tables; numpy views."""
    out: dict[str, np.ndarray] = {}
    for name, k in keys.items():
        if name not in dims:
            raise InvalidInputError(f"unknown table {name!r}; the shards hold {sorted(dims)}")
        arr = _np(name, "keys", k)
        if arr.dtype != np.int64:
            raise InvalidTypeError(f"table {name!r}: keys must be int64, got {arr.dtype}")
        if arr.ndim != 1:
            raise InvalidInputError(f"table {name!r}: keys must be 1-D [n], got {arr.shape}")
        out[name] = np.ascontiguousarray(arr)
    return out


def check_grads(grads: Mapping[str, tuple[Any, Any]], dims: Mapping[str, int]
                ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Validate ``{table: (unique int64 keys [n], float32 grads [n, dim])}``; repeated
    keys are merged (their gradients summed), so each key gets exactly one update."""
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, pair in grads.items():
        if not isinstance(pair, tuple) or len(pair) != 2:
            raise InvalidInputError(f"table {name!r}: expected (keys, grads)")
        k = check_keys({name: pair[0]}, dims)[name]
        g = _np(name, "grads", pair[1])
        d = dims[name]
        if g.shape != (k.shape[0], d):
            raise InvalidInputError(
                f"table {name!r}: gradients must have shape [{k.shape[0]}, {d}], got "
                f"{list(g.shape)}")
        if g.dtype != np.float32:
            g = g.astype(np.float32)
        if g.size and not np.isfinite(g).all():
            raise InvalidInputError(f"table {name!r}: gradients contain NaN/inf")
        if k.shape[0] > 1 and _has_duplicates(k):
            k, inv = np.unique(k, return_inverse=True)
            summed = np.zeros((k.shape[0], d), dtype=np.float32)
            np.add.at(summed, inv, g)
            g = summed
        out[name] = (k, np.ascontiguousarray(g))
    return out


@njit(cache=True)
def _has_duplicates_kernel(keys):  # type: ignore[no-untyped-def]
    n = keys.shape[0]
    cap = 16
    while cap < 2 * n:
        cap *= 2
    mask = cap - 1
    slots = np.empty(cap, dtype=np.int64)
    used = np.zeros(cap, dtype=np.bool_)
    for i in range(n):
        k = keys[i]
        h = np.uint64(k) * np.uint64(0x9E3779B97F4A7C15)
        j = np.int64(h >> np.uint64(40)) & mask
        while used[j]:
            if slots[j] == k:
                return True
            j = (j + 1) & mask
        used[j] = True
        slots[j] = k
    return False


def _has_duplicates(keys: np.ndarray) -> bool:
    return bool(_has_duplicates_kernel(keys))


@njit(cache=True)
def _scatter_kernel(dst, idx, src):  # type: ignore[no-untyped-def]
    d = src.shape[1]
    for i in range(idx.shape[0]):
        r = idx[i]
        for j in range(d):
            dst[r, j] = src[i, j]


def gather_rows(src: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``src[idx]`` for float32 ``[n, d]`` rows (compiled; numpy's fancy indexing of rows
    is several times slower)."""
    out = np.empty((idx.shape[0], src.shape[1]), dtype=src.dtype)
    if idx.shape[0]:
        _gather_kernel(src, idx, out)  # the table's row gather (idx all >= 0 here)
    return out


def scatter_rows(dst: np.ndarray, idx: np.ndarray, src: np.ndarray) -> None:
    """``dst[idx] = src`` for float32 rows."""
    if idx.shape[0]:
        _scatter_kernel(dst, idx, src)


def split(keys: Mapping[str, np.ndarray], num_shards: int) -> list[list[Part]]:
    """Per shard, the :class:`Part` of every table with keys there (tables in input order,
    keys in input order)."""
    per_shard: list[list[Part]] = [[] for _ in range(num_shards)]
    for name, k in keys.items():
        if not k.shape[0]:
            continue
        if num_shards == 1:
            per_shard[0].append(Part(name, k, np.arange(k.shape[0], dtype=np.int64)))
            continue
        order, offsets = route(k, num_shards)
        sorted_keys = k[order]
        for s in range(num_shards):
            lo, hi = int(offsets[s]), int(offsets[s + 1])
            if hi > lo:
                per_shard[s].append(Part(name, sorted_keys[lo:hi], order[lo:hi]))
    return per_shard


def pack(parts: Sequence[Part], bytes_per_key: Mapping[str, int], budget: int
         ) -> list[list[tuple[Part, int, int]]]:
    """Group parts into messages of at most ``budget`` payload bytes (a part larger than
    that is cut); each message is a list of ``(part, lo, hi)`` slices."""
    messages: list[list[tuple[Part, int, int]]] = []
    current: list[tuple[Part, int, int]] = []
    room = budget
    for p in parts:
        per = bytes_per_key[p.table] + 1  # + alignment slack
        lo, n = 0, int(p.keys.shape[0])
        while lo < n:
            fit = (room - 64) // per  # 64: this slice's share of header and alignment
            if fit <= 0 or len(current) >= 512:
                if not current:
                    raise InvalidInputError(
                        f"table {p.table!r}: one key needs {per} bytes, over the message "
                        f"budget of {budget}; raise max_message_bytes")
                messages.append(current)
                current, room = [], budget
                continue
            hi = min(n, lo + fit)
            current.append((p, lo, hi))
            room -= (hi - lo) * per + 64
            lo = hi
    if current:
        messages.append(current)
    return messages


def new_rows(keys: Mapping[str, np.ndarray], dims: Mapping[str, int]) -> dict[str, np.ndarray]:
    """Output buffers ``{table: float32 [n, dim]}`` (zeros for empty tables)."""
    return {t: np.empty((k.shape[0], dims[t]), dtype=np.float32) for t, k in keys.items()}


def to_torch(rows: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {t: torch.from_numpy(r) for t, r in rows.items()}


def merge_stats(per_shard: Sequence[Mapping[str, Mapping[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Sum the numeric per-table statistics of all shards (load factors: mean); keep each
    shard's own numbers under ``"shards"``."""
    merged: dict[str, dict[str, Any]] = {}
    for stats in per_shard:
        for table, st in stats.items():
            m = merged.setdefault(table, {"shards": []})
            m["shards"].append(dict(st))
            for k, v in st.items():
                if k in ("shard", "version"):
                    continue
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    m.setdefault(k, v)
                elif k.endswith("load_factor"):
                    m[k] = m.get(k, 0.0) + float(v) / len(per_shard)
                else:
                    m[k] = m.get(k, 0) + v
    return merged
