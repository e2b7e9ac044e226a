"""Sync frames: round trips, chunking, and hostile bytes."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from monolith_py.errors import DecodeError
from monolith_py.sync import (
    DeltaAssembler,
    ShardDelta,
    ShardPosition,
    SubscribeRequest,
    TablePatch,
    decode_dense,
    decode_message,
    encode_delta,
    encode_dense,
)
from monolith_py.sync.codec import decode_subscribe, encode_heartbeat, encode_subscribe
from monolith_py.sync.protocol import Heartbeat
from monolith_py.wire import encode_arrays


def _delta(n: int = 50, m: int = 7, dim: int = 4, full: bool = False) -> ShardDelta:
    rng = np.random.default_rng(n)
    keys = np.sort(rng.choice(1 << 40, n, replace=False)).astype(np.int64)
    return ShardDelta(shard=1, epoch=99, full=full, tables={
        "user": TablePatch("user", dim, -1 if full else 3, 9, keys,
                           rng.standard_normal((n, dim)).astype(np.float32),
                           np.zeros(0, np.int64) if full else np.arange(m, dtype=np.int64)),
        "item": TablePatch("item", 2, -1 if full else 5, 5),
    })


def _decode_all(frames: list[bytes]) -> ShardDelta:
    asm = DeltaAssembler()
    out = [decode_message(f, asm) for f in frames]
    assert all(o is None for o in out[:-1])
    assert isinstance(out[-1], ShardDelta)
    return out[-1]


def _same(a: ShardDelta, b: ShardDelta, atol: float = 0.0) -> None:
    assert (a.shard, a.epoch, a.full) == (b.shard, b.epoch, b.full)
    assert list(a.tables) == list(b.tables)
    for name, p in a.tables.items():
        q = b.tables[name]
        assert (p.dim, p.since, p.version) == (q.dim, q.since, q.version)
        np.testing.assert_array_equal(p.keys, q.keys)
        np.testing.assert_array_equal(p.deleted, q.deleted)
        np.testing.assert_allclose(q.rows.astype(np.float32), p.rows, atol=atol)


@pytest.mark.parametrize("full", [False, True])
def test_delta_round_trip(full: bool) -> None:
    d = _delta(full=full)
    frames = encode_delta(d)
    assert len(frames) == 1
    _same(d, _decode_all(frames))


@given(n=st.integers(0, 400), m=st.integers(0, 300), dim=st.integers(1, 40),
       chunk=st.integers(1024, 8192))
def test_chunked_delta_reassembles(n: int, m: int, dim: int, chunk: int) -> None:
    d = _delta(n, m, dim)
    frames = encode_delta(d, chunk_bytes=chunk)
    assert all(len(f) < chunk + 4096 for f in frames)  # bounded parts (+ header)
    _same(d, _decode_all(frames))


def test_fp16_rows_on_the_wire() -> None:
    d = _delta(200)
    f32 = sum(len(f) for f in encode_delta(d))
    frames = encode_delta(d, fp16=True)
    assert sum(len(f) for f in frames) < 0.75 * f32
    got = _decode_all(frames)
    assert got.tables["user"].rows.dtype == np.float16
    _same(d, got, atol=5e-3)


def test_parts_out_of_order_or_mixed_are_refused() -> None:
    frames = encode_delta(_delta(300), chunk_bytes=1024)
    assert len(frames) > 2
    asm = DeltaAssembler()
    decode_message(frames[0], asm)
    with pytest.raises(DecodeError, match="does not continue"):
        decode_message(frames[2], asm)
    other = encode_delta(_delta(301), chunk_bytes=1024, seq=5)
    asm = DeltaAssembler()
    decode_message(frames[0], asm)
    with pytest.raises(DecodeError):
        decode_message(other[1], asm)


def _frame(meta: dict, arrays: dict | None = None) -> bytes:
    return encode_arrays(arrays or {}, meta=meta)


GOOD_HEAD = {"type": "delta", "shard": 0, "epoch": 1, "seq": 0, "parts": 1, "part": 0,
             "full": False, "tables": {"t": {"dim": 2, "since": 0, "version": 1}}}


@pytest.mark.parametrize("meta,arrays,match", [
    ({**GOOD_HEAD, "tables": {"t": {"dim": 0, "since": 0, "version": 1}}}, {}, "dim"),
    ({**GOOD_HEAD, "tables": {"t": {"dim": 2, "since": 5, "version": 1}}}, {}, "version"),
    ({**GOOD_HEAD, "tables": {"a/b": {"dim": 2, "since": 0, "version": 1}}}, {}, "name"),
    ({**GOOD_HEAD, "full": "yes"}, {}, "full"),
    ({**GOOD_HEAD, "part": 3}, {}, "part"),
    (GOOD_HEAD, {"k/t": np.arange(3), "r/t": np.zeros((2, 2), np.float32)}, "rows"),
    (GOOD_HEAD, {"k/t": np.arange(1), "r/t": np.full((1, 2), np.nan, np.float32)}, "NaN"),
    (GOOD_HEAD, {"k/t": np.arange(1), "r/t": np.zeros((1, 2), np.int32)}, "float"),
    (GOOD_HEAD, {"x/t": np.arange(1)}, "unexpected"),
    (GOOD_HEAD, {"k/zz": np.arange(1)}, "unexpected"),
    ({**GOOD_HEAD, "full": True}, {"d/t": np.arange(2)}, "deletions"),
    ({"type": "nope"}, {}, "unknown message"),
    ({**GOOD_HEAD, "epoch": 2**70}, {}, "epoch"),
])
def test_bad_delta_frames(meta: dict, arrays: dict, match: str) -> None:
    with pytest.raises(DecodeError, match=match):
        decode_message(_frame(meta, arrays), DeltaAssembler())


@given(st.binary(max_size=300))
def test_random_bytes_never_crash(buf: bytes) -> None:
    for fn in (lambda b: decode_message(b, DeltaAssembler()), decode_subscribe, decode_dense):
        with pytest.raises(DecodeError):
            fn(buf)


@given(st.integers(16, 400), st.integers(0, 255))
def test_flipped_byte_is_detected_or_harmless(pos: int, val: int) -> None:
    frame = bytearray(encode_delta(_delta(20))[0])
    pos = pos % len(frame)
    frame[pos] = val
    try:
        msg = decode_message(bytes(frame), DeltaAssembler())
    except DecodeError:
        return
    assert isinstance(msg, ShardDelta)  # header bytes that still parse to a valid delta


def test_subscribe_round_trip_and_validation() -> None:
    req = SubscribeRequest(2, ShardPosition(7, {"a": 3}), (1, 4), True, 0.5, "w1")
    assert decode_subscribe(encode_subscribe(req)) == req
    fresh = SubscribeRequest(0, None)
    assert decode_subscribe(encode_subscribe(fresh)).position is None
    for bad in ({"interval_s": 0}, {"interval_s": float("inf")}, {"shard": -1},
                {"versions": {"a": "x"}}, {"dense": [1]}, {"worker": 5}):
        meta = {"type": "subscribe", "shard": 0, "epoch": None, "versions": {},
                "dense": None, "fp16": False, "interval_s": 1.0, "worker": "", **bad}
        with pytest.raises(DecodeError):
            decode_subscribe(_frame(meta))


def test_dense_and_heartbeat_round_trip() -> None:
    tensors = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(2, np.float32)}
    d = decode_dense(encode_dense({"kind": "dlrm"}, tensors, epoch=3, version=8))
    assert d.ident == (3, 8) and d.spec == {"kind": "dlrm"}
    np.testing.assert_array_equal(d.tensors["w"], tensors["w"])
    with pytest.raises(DecodeError, match="NaN"):
        decode_dense(encode_dense({}, {"w": np.array([np.inf], np.float32)}, epoch=1,
                                  version=1))
    with pytest.raises(DecodeError, match="spec"):
        decode_dense(_frame({"type": "dense", "epoch": 1, "version": 1}))
    hb = decode_message(encode_heartbeat(3, ShardPosition(5, {"t": 2})), DeltaAssembler())
    assert hb == Heartbeat(3, ShardPosition(5, {"t": 2}))


def test_header_length_field_is_checked() -> None:
    frame = bytearray(encode_delta(_delta(5))[0])
    struct.pack_into("<I", frame, 8, 1 << 30)
    with pytest.raises(DecodeError):
        decode_message(bytes(frame), DeltaAssembler())
    # a JSON header that is valid JSON but lies about array sizes
    head = json.dumps({"meta": GOOD_HEAD, "arrays": [
        {"name": "k/t", "dtype": "<i8", "shape": [10], "offset": 0, "nbytes": 80}]}).encode()
    buf = struct.pack("<4sIII", b"MNF1", 0, len(head), 0) + head
    with pytest.raises(DecodeError):
        decode_message(buf, DeltaAssembler())
