"""The PS RPC messages (private): array frames (:mod:`monolith_py.wire`) in raw bytes.

Service ``monolith.ps.PSShard``, unary methods, request and response bodies are frames:

=========  ==============================================  ================================
method     request                                         response
=========  ==============================================  ================================
Pull       ``keys.<i>`` int64 [n_i]; meta ``tables``,      ``rows.<i>`` float32 [n_i, dim]
           ``train``
Push       ``keys.<i>``, ``grads.<i>`` float32 [n_i, dim]; meta ``applied``, ``duplicate``
           meta ``tables``, ``now``, ``client``, ``seq``
Evict      meta ``now``                                    meta ``evicted`` {table: n}
Stats      (empty frame)                                   meta ``stats`` {table: {...}}
Health     (empty frame)                                   meta ``status``, ``info``
=========  ==============================================  ================================

``<i>`` indexes ``meta["tables"]`` (a table may appear once per message). ``client`` and
``seq`` make a retried Push idempotent: the shard remembers the recent ``(client, seq)``
pairs it applied.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from monolith_py.errors import DecodeError
from monolith_py.wire import WireLimits, decode_arrays, encode_arrays

__all__: list[str] = []  # private module

SERVICE = "monolith.ps.PSShard"
PULL, PUSH, EVICT, STATS, HEALTH = "Pull", "Push", "Evict", "Stats", "Health"
METHODS = (PULL, PUSH, EVICT, STATS, HEALTH)

DEFAULT_MAX_MESSAGE_BYTES = 4 << 20
HEADER_ALLOWANCE = 64 << 10  # JSON header + alignment kept free inside every message
MAX_TABLES_PER_MESSAGE = 1024
MAX_ID_LENGTH = 128


def path(method: str) -> str:
    return f"/{SERVICE}/{method}"


def limits_for(max_message_bytes: int) -> WireLimits:
    return WireLimits(max_header_bytes=HEADER_ALLOWANCE,
                      max_arrays=2 * MAX_TABLES_PER_MESSAGE,
                      max_total_bytes=max_message_bytes, max_ndim=2)


def _bad(msg: str) -> DecodeError:
    return DecodeError(f"bad PS request: {msg}")


def decode(buf: bytes, limits: WireLimits, checksum: bool = True
           ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    return decode_arrays(buf, limits=limits, require_checksum=checksum)


def _tables(meta: Mapping[str, Any]) -> list[str]:
    tables = meta.get("tables")
    if not isinstance(tables, list) or not all(isinstance(t, str) for t in tables):
        raise _bad("meta 'tables' must be a list of table names")
    if len(tables) > MAX_TABLES_PER_MESSAGE:
        raise _bad(f"{len(tables)} tables in one message (at most {MAX_TABLES_PER_MESSAGE})")
    if len(set(tables)) != len(tables):
        raise _bad("a table appears twice in one message")
    return tables


def _int(meta: Mapping[str, Any], name: str) -> int:
    v = meta.get(name)
    if isinstance(v, bool) or not isinstance(v, int) or not -(1 << 63) <= v < (1 << 63):
        raise _bad(f"meta {name!r} must be an int64, got {v!r}")
    return v


def _exact(arrays: Mapping[str, np.ndarray], names: set[str]) -> None:
    extra = sorted(set(arrays) - names)
    missing = sorted(names - set(arrays))
    if extra or missing:
        raise _bad(f"unexpected arrays {extra[:4]} / missing arrays {missing[:4]}")


# -- Pull ------------------------------------------------------------------------------------

def encode_pull(parts: Sequence[tuple[str, np.ndarray]], train: bool, checksum: bool) -> bytes:
    arrays = {f"keys.{i}": k for i, (_, k) in enumerate(parts)}
    return encode_arrays(arrays, {"tables": [t for t, _ in parts], "train": bool(train)},
                         checksum=checksum)


def decode_pull(buf: bytes, limits: WireLimits, checksum: bool
                ) -> tuple[dict[str, np.ndarray], bool]:
    arrays, meta = decode(buf, limits, checksum)
    tables = _tables(meta)
    train = meta.get("train")
    if not isinstance(train, bool):
        raise _bad("meta 'train' must be a bool")
    _exact(arrays, {f"keys.{i}" for i in range(len(tables))})
    return {t: arrays[f"keys.{i}"] for i, t in enumerate(tables)}, train


def encode_rows(tables: Sequence[str], rows: Mapping[str, np.ndarray], checksum: bool) -> bytes:
    return encode_arrays({f"rows.{i}": rows[t] for i, t in enumerate(tables)}, {},
                         checksum=checksum)


# -- Push ------------------------------------------------------------------------------------

def encode_push(parts: Sequence[tuple[str, np.ndarray, np.ndarray]], now: int, client: str,
                seq: int, checksum: bool) -> bytes:
    arrays: dict[str, np.ndarray] = {}
    for i, (_, k, g) in enumerate(parts):
        arrays[f"keys.{i}"] = k
        arrays[f"grads.{i}"] = g
    meta = {"tables": [p[0] for p in parts], "now": int(now), "client": client, "seq": int(seq)}
    return encode_arrays(arrays, meta, checksum=checksum)


def decode_push(buf: bytes, limits: WireLimits, checksum: bool
                ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], int, str, int]:
    arrays, meta = decode(buf, limits, checksum)
    tables = _tables(meta)
    now, seq = _int(meta, "now"), _int(meta, "seq")
    client = meta.get("client")
    if not isinstance(client, str) or not 0 < len(client) <= MAX_ID_LENGTH:
        raise _bad(f"meta 'client' must be a string of 1..{MAX_ID_LENGTH} characters")
    n = len(tables)
    _exact(arrays, {f"keys.{i}" for i in range(n)} | {f"grads.{i}" for i in range(n)})
    grads = {t: (arrays[f"keys.{i}"], arrays[f"grads.{i}"]) for i, t in enumerate(tables)}
    return grads, now, client, seq


# -- small messages ----------------------------------------------------------------------------

def encode_meta(meta: Mapping[str, Any], checksum: bool = True) -> bytes:
    return encode_arrays({}, meta, checksum=checksum)


def decode_now(buf: bytes, limits: WireLimits, checksum: bool) -> int:
    arrays, meta = decode(buf, limits, checksum)
    _exact(arrays, set())
    return _int(meta, "now")


def decode_empty(buf: bytes, limits: WireLimits, checksum: bool) -> None:
    arrays, _ = decode(buf, limits, checksum)
    _exact(arrays, set())
