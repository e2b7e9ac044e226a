"""PS messages: round trips, and every malformed request is a DecodeError (the server
answers INVALID_ARGUMENT)."""

from __future__ import annotations

import numpy as np
import pytest

from monolith_py.errors import CorruptDataError, DecodeError
from monolith_py.ps import _protocol as proto
from monolith_py.wire import encode_arrays

LIM = proto.limits_for(1 << 20)


def test_pull_and_push_round_trip() -> None:
    k1, k2 = np.arange(5, dtype=np.int64), np.array([9], dtype=np.int64)
    buf = proto.encode_pull([("a", k1), ("b", k2)], True, checksum=True)
    keys, train = proto.decode_pull(buf, LIM, True)
    assert train is True and keys["a"].tolist() == k1.tolist() and keys["b"].tolist() == [9]
    g = np.ones((5, 3), np.float32)
    buf = proto.encode_push([("a", k1, g)], now=77, client="c1", seq=4, checksum=True)
    grads, now, client, seq = proto.decode_push(buf, LIM, True)
    assert (now, client, seq) == (77, "c1", 4) and grads["a"][1].shape == (5, 3)
    assert proto.decode_now(proto.encode_meta({"now": 5}), LIM, True) == 5
    proto.decode_empty(proto.encode_meta({}), LIM, True)


@pytest.mark.parametrize("arrays, meta, match", [
    ({"keys.0": np.zeros(1, np.int64)}, {"tables": "a", "train": True}, "list of table names"),
    ({"keys.0": np.zeros(1, np.int64)}, {"tables": ["a"], "train": 1}, "bool"),
    ({"keys.0": np.zeros(1, np.int64)}, {"tables": ["a", "a"], "train": True}, "twice"),
    ({"keys.0": np.zeros(1, np.int64)}, {"tables": ["a", "b"], "train": True}, "missing"),
    ({"keys.0": np.zeros(1, np.int64), "x": np.zeros(1)}, {"tables": ["a"], "train": True},
     "unexpected"),
    ({}, {"tables": [f"t{i}" for i in range(2000)], "train": True}, "at most"),
])
def test_malformed_pull(arrays: dict, meta: dict, match: str) -> None:
    with pytest.raises(DecodeError, match=match):
        proto.decode_pull(encode_arrays(arrays, meta), LIM, True)


@pytest.mark.parametrize("meta, match", [
    ({"tables": ["a"], "now": 1.5, "client": "c", "seq": 1}, "now"),
    ({"tables": ["a"], "now": True, "client": "c", "seq": 1}, "now"),
    ({"tables": ["a"], "now": 1, "client": "", "seq": 1}, "client"),
    ({"tables": ["a"], "now": 1, "client": "x" * 500, "seq": 1}, "client"),
    ({"tables": ["a"], "now": 1, "client": "c", "seq": 1 << 70}, "seq"),
])
def test_malformed_push(meta: dict, match: str) -> None:
    arrays = {"keys.0": np.zeros(1, np.int64), "grads.0": np.zeros((1, 2), np.float32)}
    with pytest.raises(DecodeError, match=match):
        proto.decode_push(encode_arrays(arrays, meta), LIM, True)


def test_garbage_corruption_and_limits() -> None:
    for junk in (b"", b"hello", b"MNF1" + b"\xff" * 40):
        with pytest.raises(DecodeError):
            proto.decode_pull(junk, LIM, True)
    buf = bytearray(proto.encode_pull([("a", np.arange(100, dtype=np.int64))], False, True))
    buf[-3] ^= 0xFF
    with pytest.raises(CorruptDataError):
        proto.decode_pull(bytes(buf), LIM, True)
    unsigned = proto.encode_pull([("a", np.arange(3, dtype=np.int64))], False, checksum=False)
    with pytest.raises(CorruptDataError, match="required"):
        proto.decode_pull(unsigned, LIM, True)
    assert proto.decode_pull(unsigned, LIM, False)[0]["a"].tolist() == [0, 1, 2]
    big = proto.encode_pull([("a", np.zeros(200_000, np.int64))], False, True)
    with pytest.raises(DecodeError, match="limit"):
        proto.decode_pull(big, LIM, True)
