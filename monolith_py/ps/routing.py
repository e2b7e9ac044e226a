"""Key routing: which parameter-server shard owns a key.

The routing hash is part of the on-disk and on-the-wire contract (a shard rejects keys it
does not own, snapshots are split by it), so it is fixed forever; a different hash would
need a new :data:`ROUTING_VERSION`. It is independent of the cuckoo index's hashes (a
different mixer and salt), so the keys one shard owns still spread evenly over its index
buckets.

The formula, on the key's 64-bit two's-complement pattern ``k`` (uint64 arithmetic,
wrapping)::

    h = k XOR 0x6D6F6E6F6C697468               # the ASCII bytes "monolith"
    h = h XOR (h >> 33);  h = h * 0xFF51AFD7ED558CCD
    h = h XOR (h >> 33);  h = h * 0xC4CEB9FE1A85EC53
    h = h XOR (h >> 33)                         # MurmurHash3's 64-bit finalizer
    shard = h mod num_shards

Example::

    >>> import numpy as np
    >>> shard_of(np.array([0, 1, 2, -1], dtype=np.int64), 4).tolist()
    [3, 1, 3, 2]
    >>> order, offsets = route(np.array([10, 11, 12, 13], dtype=np.int64), 2)
    >>> offsets.tolist()          # keys of shard s are keys[order[offsets[s]:offsets[s+1]]]
    [0, 1, 4]
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit

from monolith_py.errors import InvalidInputError, InvalidTypeError

__all__ = [
    "ROUTING_VERSION",
    "ROUTING_SALT",
    "MAX_SHARDS",
    "shard_of",
    "shard_of_int",
    "route",
    "first_foreign",
]

ROUTING_VERSION = 1
"""Version of the routing formula (stored with shard state)."""

ROUTING_SALT = 0x6D6F6E6F6C697468
"""XORed into every key before mixing (ASCII ``monolith``)."""

MAX_SHARDS = 1 << 16

_SALT = np.uint64(ROUTING_SALT)
_C1 = np.uint64(0xFF51AFD7ED558CCD)
_C2 = np.uint64(0xC4CEB9FE1A85EC53)
_S33 = np.uint64(33)
_MASK64 = (1 << 64) - 1


@njit(inline="always")
def _mix(k):  # type: ignore[no-untyped-def]
    h = np.uint64(k) ^ _SALT
    h ^= h >> _S33
    h *= _C1
    h ^= h >> _S33
    h *= _C2
    h ^= h >> _S33
    return h


@njit(cache=True)
def _shard_of_kernel(keys, n, out):  # type: ignore[no-untyped-def]
    un = np.uint64(n)
    for i in range(keys.shape[0]):
        out[i] = np.int64(_mix(keys[i]) % un)


@njit(cache=True)
def _route_kernel(keys, n, order, offsets):  # type: ignore[no-untyped-def]
    # a stable counting sort by shard: one hash per key, two passes
    m = keys.shape[0]
    un = np.uint64(n)
    sid = np.empty(m, dtype=np.int64)
    counts = np.zeros(n + 1, dtype=np.int64)
    for i in range(m):
        s = np.int64(_mix(keys[i]) % un)
        sid[i] = s
        counts[s + 1] += 1
    for s in range(n):
        counts[s + 1] += counts[s]
    for s in range(n + 1):
        offsets[s] = counts[s]
    for i in range(m):
        s = sid[i]
        order[counts[s]] = i
        counts[s] += 1


@njit(cache=True)
def _first_foreign_kernel(keys, shard, n):  # type: ignore[no-untyped-def]
    un = np.uint64(n)
    us = np.uint64(shard)
    for i in range(keys.shape[0]):
        if _mix(keys[i]) % un != us:
            return i
    return -1


def _check_n(num_shards: Any) -> int:
    if isinstance(num_shards, bool) or not isinstance(num_shards, (int, np.integer)):
        raise InvalidTypeError(f"num_shards must be an int, got {type(num_shards).__name__}")
    n = int(num_shards)
    if not 1 <= n <= MAX_SHARDS:
        raise InvalidInputError(f"num_shards must be in [1, {MAX_SHARDS}], got {n}")
    return n


def _keys(keys: Any) -> np.ndarray:
    arr = keys.detach().cpu().numpy() if hasattr(keys, "detach") else np.asarray(keys)
    if arr.dtype != np.int64:
        if arr.dtype.kind not in "iu":
            raise InvalidTypeError(f"keys must be int64, got {arr.dtype}")
        arr = arr.astype(np.int64)
    if arr.ndim != 1:
        raise InvalidInputError(f"keys must be 1-D [n], got shape {arr.shape}")
    return np.ascontiguousarray(arr)


def shard_of(keys: Any, num_shards: int) -> np.ndarray:
    """The owning shard of each key: int64 ``[n]`` in ``[0, num_shards)``.

    Args:
        keys: int64 ``[n]`` (numpy array or torch tensor).
        num_shards: number of shards, ``1 <= num_shards <= 65536``.
    """
    n = _check_n(num_shards)
    k = _keys(keys)
    out = np.empty(k.shape[0], dtype=np.int64)
    if n == 1:
        out.fill(0)
    elif k.shape[0]:
        _shard_of_kernel(k, n, out)
    return out


def shard_of_int(key: int, num_shards: int) -> int:
    """:func:`shard_of` for one Python int, in plain Python (the reference formula)."""
    n = _check_n(num_shards)
    h = (int(key) & _MASK64) ^ ROUTING_SALT
    for mult in (0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53):
        h ^= h >> 33
        h = (h * mult) & _MASK64
    h ^= h >> 33
    return h % n


def route(keys: Any, num_shards: int) -> tuple[np.ndarray, np.ndarray]:
    """Group keys by shard, keeping their relative order.

    Returns:
        ``(order, offsets)``: int64 ``[n]`` positions into ``keys`` and int64
        ``[num_shards + 1]``; shard ``s`` owns ``keys[order[offsets[s]:offsets[s + 1]]]``.
    """
    n = _check_n(num_shards)
    k = _keys(keys)
    m = k.shape[0]
    order = np.empty(m, dtype=np.int64)
    offsets = np.empty(n + 1, dtype=np.int64)
    if n == 1:
        order[:] = np.arange(m, dtype=np.int64)
        offsets[0], offsets[1] = 0, m
    else:
        _route_kernel(k, n, order, offsets)
    return order, offsets


def first_foreign(keys: np.ndarray, shard_id: int, num_shards: int) -> int:
    """Index of the first key of int64 ``keys`` not owned by ``shard_id``, or -1."""
    n = _check_n(num_shards)
    if n == 1 or not keys.shape[0]:
        return -1
    return int(_first_foreign_kernel(keys, int(shard_id), n))
