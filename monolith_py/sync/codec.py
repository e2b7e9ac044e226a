"""Sync messages as array frames (:mod:`monolith_py.wire`), and their validation.

Every message on a sync stream is one frame whose ``meta["type"]`` says what it is:

* ``"subscribe"`` (worker -> shard): ``shard``, ``epoch`` (or null), ``versions``,
  ``dense`` (``[epoch, version]`` held, or null), ``fp16``, ``interval_s``.
* ``"delta"``: one *part* of a :class:`~monolith_py.sync.protocol.ShardDelta`. A delta is
  cut into parts of at most ``chunk_bytes`` so a full resync of a big table never needs
  one huge message; every part repeats the header (``shard``, ``epoch``, ``full``,
  ``seq``, ``part``, ``parts``, ``tables: {name: {dim, since, version}}``) and carries
  arrays ``k/<table>`` (int64 keys), ``r/<table>`` (float32 or float16 rows ``[n, dim]``)
  and ``d/<table>`` (int64 deleted keys) for its slice. :class:`DeltaAssembler` joins the
  parts and hands out the delta only when the last one arrived.
* ``"dense"``: a :class:`~monolith_py.sync.protocol.DenseUpdate` (``spec``, ``epoch``,
  ``version``; one array per tensor).
* ``"heartbeat"``: ``shard``, ``epoch``, ``versions``.

Decoding is for hostile bytes: it raises :class:`~monolith_py.errors.DecodeError` for any
frame that is malformed, inconsistent with its header, or carries non-finite rows.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from monolith_py.errors import DecodeError
from monolith_py.sync.protocol import (
    DenseUpdate,
    Heartbeat,
    ShardDelta,
    ShardPosition,
    TablePatch,
)
from monolith_py.wire import WireLimits, decode_arrays, encode_arrays

__all__ = [
    "SubscribeRequest",
    "encode_subscribe",
    "decode_subscribe",
    "encode_delta",
    "encode_dense",
    "decode_dense",
    "encode_heartbeat",
    "DeltaAssembler",
    "decode_message",
    "SYNC_LIMITS",
    "DEFAULT_CHUNK_BYTES",
]

DEFAULT_CHUNK_BYTES = 4 << 20
MAX_NAME = 256
MAX_TABLES = 1024
MAX_DIM = 65536
MAX_PARTS = 1 << 20
MAX_SHARDS = 1 << 16
#: One frame: generous for dense states, bounded for a hostile peer.
SYNC_LIMITS = WireLimits(max_header_bytes=4 << 20, max_arrays=1 << 14,
                         max_total_bytes=1 << 30, max_ndim=8)


def _bad(msg: str) -> DecodeError:
    return DecodeError(f"bad sync message: {msg}")


def _int(meta: Mapping[str, Any], key: str, lo: int, hi: int, nullable: bool = False) -> Any:
    v = meta.get(key)
    if v is None and nullable:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise _bad(f"{key!r} must be an int in [{lo}, {hi}], got {v!r}")
    return v


_I64 = (-(1 << 63), (1 << 63) - 1)


def _versions(meta: Mapping[str, Any], key: str = "versions") -> dict[str, int]:
    v = meta.get(key)
    if not isinstance(v, dict) or len(v) > MAX_TABLES:
        raise _bad(f"{key!r} must be an object of at most {MAX_TABLES} tables")
    out = {}
    for name, ver in v.items():
        _name(name)
        if isinstance(ver, bool) or not isinstance(ver, int) or not -1 <= ver < (1 << 62):
            raise _bad(f"version of table {name!r} must be an int >= -1, got {ver!r}")
        out[name] = ver
    return out


def _name(name: Any) -> str:
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME or "/" in name:
        raise _bad(f"table name must be a string of 1..{MAX_NAME} chars without '/', "
                   f"got {name!r}")
    return name


def _decode(buf: bytes, expect: str | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    arrays, meta = decode_arrays(buf, limits=SYNC_LIMITS)
    t = meta.get("type")
    if expect is not None and t != expect:
        raise _bad(f"expected a {expect!r} frame, got {t!r}")
    return arrays, meta


# -- subscribe ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SubscribeRequest:
    """A worker's "I have shard ``shard`` at ``position``; send me what came after"."""

    shard: int
    position: ShardPosition | None
    dense: tuple[int, int] | None = None
    fp16: bool = False
    interval_s: float = 1.0
    worker: str = ""


def encode_subscribe(req: SubscribeRequest) -> bytes:
    pos = req.position
    return encode_arrays({}, meta={
        "type": "subscribe", "shard": req.shard,
        "epoch": None if pos is None else int(pos.epoch),
        "versions": {} if pos is None else {k: int(v) for k, v in pos.versions.items()},
        "dense": None if req.dense is None else [int(req.dense[0]), int(req.dense[1])],
        "fp16": bool(req.fp16), "interval_s": float(req.interval_s),
        "worker": str(req.worker)[:MAX_NAME]})


def decode_subscribe(buf: bytes) -> SubscribeRequest:
    _, meta = _decode(buf, "subscribe")
    shard = _int(meta, "shard", 0, MAX_SHARDS)
    epoch = _int(meta, "epoch", *_I64, nullable=True)
    versions = _versions(meta)
    dense = meta.get("dense")
    if dense is not None:
        if (not isinstance(dense, list) or len(dense) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in dense)):
            raise _bad(f"'dense' must be null or [epoch, version], got {dense!r}")
        dense = (int(dense[0]), int(dense[1]))
    interval = meta.get("interval_s", 1.0)
    if (isinstance(interval, bool) or not isinstance(interval, (int, float))
            or not math.isfinite(interval) or not 0.01 <= interval <= 600):
        raise _bad(f"'interval_s' must be a number in [0.01, 600], got {interval!r}")
    worker = meta.get("worker", "")
    if not isinstance(worker, str):
        raise _bad("'worker' must be a string")
    return SubscribeRequest(shard, None if epoch is None else ShardPosition(epoch, versions),
                            dense, bool(meta.get("fp16", False)), float(interval),
                            worker[:MAX_NAME])


# -- deltas ---------------------------------------------------------------------------------


def _pieces(delta: ShardDelta, fp16: bool) -> Iterator[tuple[str, np.ndarray, int]]:
    """``(array name, array, bytes per item)`` of the whole delta, in table order."""
    for name, p in delta.tables.items():
        rows = p.rows.astype(np.float16 if fp16 else np.float32, copy=False)
        yield f"k/{name}", p.keys, 8
        yield f"r/{name}", rows, max(1, rows.dtype.itemsize * p.dim)
        yield f"d/{name}", p.deleted, 8


def encode_delta(delta: ShardDelta, *, seq: int = 0, fp16: bool = False,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> list[bytes]:
    """The frames of ``delta``: one per part of at most about ``chunk_bytes`` of arrays
    (always at least one, so an empty delta still moves the reader's versions)."""
    header = {name: {"dim": int(p.dim), "since": int(p.since), "version": int(p.version)}
              for name, p in delta.tables.items()}
    chunk_bytes = max(1024, int(chunk_bytes))
    parts: list[dict[str, np.ndarray]] = [{}]
    used = 0
    for name, arr, item in _pieces(delta, fp16):
        n = int(arr.shape[0])
        start = 0
        while start < n:  # empty arrays are left out: the assembler reads them as empty
            room = (chunk_bytes - used) // item
            if room <= 0 and used:
                parts.append({})
                used = 0
                continue
            stop = min(n, start + max(room, 1))
            parts[-1][name] = arr[start:stop]
            used += (stop - start) * item
            start = stop
            if start < n:  # the rest of this array goes to the next part
                parts.append({})
                used = 0
    meta = {"type": "delta", "shard": int(delta.shard), "epoch": int(delta.epoch),
            "full": bool(delta.full), "seq": int(seq), "parts": len(parts), "tables": header}
    return [encode_arrays(arrays, meta={**meta, "part": i}) for i, arrays in enumerate(parts)]


def _delta_header(meta: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, int]]]:
    head = {
        "shard": _int(meta, "shard", 0, MAX_SHARDS),
        "epoch": _int(meta, "epoch", *_I64),
        "seq": _int(meta, "seq", 0, 1 << 62),
        "parts": _int(meta, "parts", 1, MAX_PARTS),
        "part": _int(meta, "part", 0, MAX_PARTS),
        "full": meta.get("full"),
    }
    if not isinstance(head["full"], bool):
        raise _bad("'full' must be a boolean")
    if head["part"] >= head["parts"]:
        raise _bad(f"part {head['part']} of {head['parts']}")
    tables = meta.get("tables")
    if not isinstance(tables, dict) or len(tables) > MAX_TABLES:
        raise _bad(f"'tables' must be an object of at most {MAX_TABLES} tables")
    out: dict[str, dict[str, int]] = {}
    for name, t in tables.items():
        _name(name)
        if not isinstance(t, dict):
            raise _bad(f"table {name!r} header must be an object")
        dim = _int(t, "dim", 1, MAX_DIM)
        since = _int(t, "since", -1, (1 << 62))
        version = _int(t, "version", -1, (1 << 62))
        if version < since:
            raise _bad(f"table {name!r}: version {version} < since {since}")
        out[name] = {"dim": dim, "since": since, "version": version}
    return head, out


class DeltaAssembler:
    """Joins the parts of a delta (see the module doc). Feed frames in stream order; a
    part out of sequence or with another header raises :class:`DecodeError` (the
    subscriber then resubscribes). Not thread-safe: one per stream."""

    def __init__(self) -> None:
        self._head: dict[str, Any] | None = None
        self._tables: dict[str, dict[str, int]] = {}
        self._arrays: dict[str, list[np.ndarray]] = {}

    def feed_delta(self, arrays: Mapping[str, np.ndarray],
                   meta: Mapping[str, Any]) -> ShardDelta | None:
        head, tables = _delta_header(meta)
        if head["part"] == 0:
            self._head, self._tables, self._arrays = head, tables, {}
        elif (self._head is None or head["part"] != self._head["part"] + 1
              or {k: v for k, v in head.items() if k != "part"}
              != {k: v for k, v in self._head.items() if k != "part"}
              or tables != self._tables):
            self._head = None
            raise _bad(f"delta part {head['part']} does not continue the previous part")
        else:
            self._head = head
        for key, arr in arrays.items():
            kind, _, name = key.partition("/")
            if kind not in ("k", "r", "d") or name not in tables:
                raise _bad(f"unexpected array {key!r}")
            self._arrays.setdefault(key, []).append(arr)
        if head["part"] + 1 < head["parts"]:
            return None
        out = self._finish(head, tables)
        self._head, self._arrays = None, {}
        return out

    def _finish(self, head: Mapping[str, Any], tables: Mapping[str, dict[str, int]]) -> ShardDelta:
        patches: dict[str, TablePatch] = {}
        for name, t in tables.items():
            dim = t["dim"]
            keys = _cat(self._arrays.get(f"k/{name}"), np.int64, (0,))
            deleted = _cat(self._arrays.get(f"d/{name}"), np.int64, (0,))
            rows_parts = self._arrays.get(f"r/{name}")
            if rows_parts and rows_parts[0].dtype not in (np.float16, np.float32):
                raise _bad(f"table {name!r}: rows must be float16 or float32, "
                           f"got {rows_parts[0].dtype}")
            rows = _cat(rows_parts, rows_parts[0].dtype if rows_parts else np.float32, (0, dim))
            if keys.ndim != 1 or deleted.ndim != 1:
                raise _bad(f"table {name!r}: keys must be 1-D")
            if rows.shape != (keys.shape[0], dim):
                raise _bad(f"table {name!r}: rows {rows.shape} do not match "
                           f"{keys.shape[0]} keys x dim {dim}")
            if rows.size and not np.isfinite(rows).all():
                raise _bad(f"table {name!r}: rows contain NaN/inf")
            if head["full"] and deleted.shape[0]:
                raise _bad(f"table {name!r}: a full delta carries no deletions")
            patches[name] = TablePatch(name, dim, t["since"], t["version"], keys, rows, deleted)
        return ShardDelta(head["shard"], head["epoch"], head["full"], patches)


def _cat(parts: list[np.ndarray] | None, dtype: Any, empty_shape: tuple[int, ...]) -> np.ndarray:
    if not parts:
        return np.zeros(empty_shape, dtype=dtype)
    if any(p.dtype != np.dtype(dtype) for p in parts):
        got = [str(p.dtype) for p in parts]
        raise _bad(f"array parts must all be {np.dtype(dtype)}, got {got}")
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


# -- dense, heartbeat -----------------------------------------------------------------------


def encode_dense(spec: Mapping[str, Any], tensors: Mapping[str, Any], *, epoch: int,
                 version: int) -> bytes:
    """A dense frame: the JSON model spec and tensors (torch or numpy; never pickled)."""
    return encode_arrays(dict(tensors), meta={"type": "dense", "spec": dict(spec),
                                              "epoch": int(epoch), "version": int(version)})


def decode_dense(buf: bytes) -> DenseUpdate:
    arrays, meta = _decode(buf, "dense")
    return _dense_from(arrays, meta)


def _dense_from(arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> DenseUpdate:
    spec = meta.get("spec")
    if not isinstance(spec, dict):
        raise _bad("a dense frame needs a 'spec' object")
    for name, arr in arrays.items():
        if arr.dtype.kind == "f" and arr.size and not np.isfinite(arr).all():
            raise _bad(f"dense tensor {name!r} contains NaN/inf")
    return DenseUpdate(spec, dict(arrays), _int(meta, "epoch", *_I64),
                       _int(meta, "version", 0, 1 << 62))


def encode_heartbeat(shard: int, position: ShardPosition) -> bytes:
    return encode_arrays({}, meta={"type": "heartbeat", "shard": int(shard),
                                   **position.to_dict()})


def decode_message(buf: bytes, assembler: DeltaAssembler
                   ) -> ShardDelta | DenseUpdate | Heartbeat | None:
    """Decode one stream frame: a complete delta, a dense update, a heartbeat, or None
    (a delta part that is not the last)."""
    arrays, meta = _decode(buf)
    t = meta.get("type")
    if t == "delta":
        return assembler.feed_delta(arrays, meta)
    if t == "dense":
        return _dense_from(arrays, meta)
    if t == "heartbeat":
        return Heartbeat(_int(meta, "shard", 0, MAX_SHARDS),
                         ShardPosition(_int(meta, "epoch", *_I64), _versions(meta)))
    raise _bad(f"unknown message type {t!r}")
