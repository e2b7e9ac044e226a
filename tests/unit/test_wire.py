"""Array frames: exact round trips, and hostile bytes rejected without crashing."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from monolith_py.errors import CorruptDataError, DecodeError, InvalidInputError
from monolith_py.wire import WireLimits, decode_arrays, encode_arrays


def test_round_trip_dtypes_shapes_and_meta() -> None:
    arrays = {
        "keys": np.array([-(2**63), 0, 2**63 - 1], dtype=np.int64),
        "rows": np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32),
        "half": np.arange(7, dtype=np.float16),
        "mask": np.array([True, False]),
        "empty": np.zeros((0, 16), dtype=np.float32),
        "scalar": np.array(3.5),
        "tensor": torch.arange(4, dtype=torch.int32),
    }
    buf = encode_arrays(arrays, meta={"table": "user", "version": 7})
    out, meta = decode_arrays(buf)
    assert meta == {"table": "user", "version": 7}
    for name, value in arrays.items():
        expected = value.numpy() if isinstance(value, torch.Tensor) else value
        assert out[name].dtype == expected.dtype
        assert out[name].shape == expected.shape
        np.testing.assert_array_equal(out[name], expected)
    assert not out["keys"].flags.writeable
    assert decode_arrays(buf, copy=True)[0]["keys"].flags.writeable


def test_big_endian_input_is_normalized() -> None:
    arr = np.arange(5, dtype=">i8")
    out, _ = decode_arrays(encode_arrays({"a": arr}))
    assert out["a"].dtype == np.dtype("<i8")
    np.testing.assert_array_equal(out["a"], np.arange(5))


def test_rejects_object_dtype_and_unserializable_meta() -> None:
    with pytest.raises(InvalidInputError, match="dtype"):
        encode_arrays({"x": np.array(["a", "b"], dtype=object)})
    with pytest.raises(InvalidInputError, match="JSON"):
        encode_arrays({}, meta={"x": object()})


def test_flipped_payload_bit_is_detected() -> None:
    buf = bytearray(encode_arrays({"rows": np.ones((64, 4), dtype=np.float32)}))
    buf[-3] ^= 0x10
    with pytest.raises(CorruptDataError):
        decode_arrays(bytes(buf))


def test_checksum_can_be_required() -> None:
    buf = encode_arrays({"a": np.arange(3)}, checksum=False)
    assert decode_arrays(buf)[0]["a"].tolist() == [0, 1, 2]
    with pytest.raises(CorruptDataError):
        decode_arrays(buf, require_checksum=True)


def test_verified_bytes_skip_the_second_checksum_pass_but_not_its_requirement() -> None:
    buf = bytearray(encode_arrays({"rows": np.ones((64, 4), dtype=np.float32)}))
    buf[-3] ^= 0x10  # as if the caller's own (e.g. manifest) crc had vouched for these bytes
    assert decode_arrays(bytes(buf), verified=True)[0]["rows"].shape == (64, 4)
    with pytest.raises(CorruptDataError):
        decode_arrays(bytes(buf))
    with pytest.raises(CorruptDataError, match="required"):
        decode_arrays(encode_arrays({"a": np.arange(3)}, checksum=False),
                      require_checksum=True, verified=True)


def _frame_with_header(header: bytes, payload: bytes = b"") -> bytes:
    return struct.pack("<4sIII", b"MNF1", 0, len(header), 0) + header + payload


@pytest.mark.parametrize(
    "header, reason",
    [
        (b"not json", "JSON"),
        (b"[]", "object"),
        (b'{"arrays": [{"name": "a", "dtype": "|O", "shape": [1], "offset": 0, "nbytes": 8}]}',
         "dtype"),
        (b'{"arrays": [{"name": "a", "dtype": "<i8", "shape": [1000000000000], "offset": 0,'
         b' "nbytes": 8}]}', "nbytes"),
        (b'{"arrays": [{"name": "a", "dtype": "<i8", "shape": [4], "offset": 0, "nbytes": 32}]}',
         "outside"),
        (b'{"arrays": [{"name": "a", "dtype": "<i8", "shape": [-1], "offset": 0, "nbytes": 8}]}',
         "shape"),
        (b'{"arrays": [{"name": "a", "dtype": "<i8", "shape": [1], "offset": 0, "nbytes": 8},'
         b' {"name": "a", "dtype": "<i8", "shape": [1], "offset": 0, "nbytes": 8}]}', "duplicate"),
    ],
)
def test_hostile_headers_are_rejected(header: bytes, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        decode_arrays(_frame_with_header(header, b"\x00" * 8))


def test_limits_are_enforced() -> None:
    buf = encode_arrays({f"a{i}": np.zeros(1) for i in range(10)})
    with pytest.raises(DecodeError, match="limit"):
        decode_arrays(buf, limits=WireLimits(max_arrays=5))
    with pytest.raises(DecodeError, match="limit"):
        decode_arrays(buf, limits=WireLimits(max_total_bytes=16))
    with pytest.raises(DecodeError, match="magic"):
        decode_arrays(b"XXXX" + bytes(buf[4:]))
    with pytest.raises(DecodeError, match="shorter"):
        decode_arrays(b"MN")


@settings(max_examples=300)
@given(st.binary(max_size=512))
def test_random_bytes_never_crash(data: bytes) -> None:
    try:
        decode_arrays(data)
    except DecodeError:
        pass


@settings(max_examples=300)
@given(st.data())
def test_mutated_frames_never_crash(data: st.DataObject) -> None:
    buf = bytearray(encode_arrays({"k": np.arange(6), "r": np.ones((2, 3), np.float32)},
                                  checksum=data.draw(st.booleans())))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(buf) - 1))
        buf[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(buf)))
    try:
        arrays, _ = decode_arrays(bytes(buf[:cut]))
    except DecodeError:
        return
    for arr in arrays.values():
        assert arr.nbytes <= len(buf)
