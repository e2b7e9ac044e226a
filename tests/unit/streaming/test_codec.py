"""The example codec: round trips, strict validation, and fuzzing that never crashes."""

from __future__ import annotations

import struct
import tracemalloc

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from monolith_py.batch import Batch
from monolith_py.errors import CorruptDataError, DecodeError, InvalidInputError
from streaming.codec import (
    HEADER_SIZE,
    MAGIC,
    CodecLimits,
    decode_batch,
    decode_columns,
    encode_batch,
    encode_columns,
    peek_header,
)
from streaming.columns import ExampleColumns, concat_columns, from_batch, take_rows


def make_cols(b: int = 5, f: int = 3, d: int = 2, seed: int = 0, weights: bool = False,
              max_len: int = 3) -> ExampleColumns:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, max_len + 1, size=(f, b)).astype(np.int32)
    n = int(lengths.sum())
    return ExampleColumns(
        names=tuple(f"feat_{i}" for i in range(f)),
        lengths=lengths,
        values=rng.integers(-(1 << 62), 1 << 62, size=n),
        weights=rng.random(n, dtype=np.float32) if weights else None,
        dense=rng.standard_normal((b, d)).astype(np.float32),
        labels=(rng.random(b) < 0.5).astype(np.float32),
        timestamps=rng.integers(0, 2_000_000_000, size=b),
        example_ids=rng.integers(0, 1 << 62, size=b),
    )


def assert_same(a: ExampleColumns, b: ExampleColumns) -> None:
    assert a.names == b.names
    for name in ("lengths", "values", "dense", "labels", "timestamps", "example_ids"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    if a.weights is None:
        assert b.weights is None
    else:
        assert b.weights is not None
        np.testing.assert_array_equal(a.weights, b.weights)


@pytest.mark.parametrize("weights", [False, True])
@pytest.mark.parametrize("shape", [(5, 3, 2), (1, 1, 0), (0, 2, 3), (7, 0, 4), (0, 0, 0)])
def test_round_trip(shape: tuple[int, int, int], weights: bool) -> None:
    cols = make_cols(*shape, weights=weights)
    buf = encode_columns(cols)
    assert len(buf) % 8 == 0 and buf[:4] == MAGIC
    assert_same(cols, decode_columns(buf))
    batch = decode_batch(buf)
    batch.validate()
    assert len(batch) == shape[0]
    assert batch.sparse.keys() == list(cols.names)
    assert batch.sparse.stride() == shape[0]
    # the KJT is the TorchRec layout: per-key lengths and values line up
    if shape[0] and shape[1]:  # (torchrec's to_dict cannot split an empty batch)
        jt = batch.sparse.to_dict()["feat_0"]
        np.testing.assert_array_equal(jt.lengths().numpy(), cols.lengths[0])


def test_batch_round_trip_and_writable_views() -> None:
    kjt = KeyedJaggedTensor(keys=["user", "item"], values=torch.tensor([1, 2, 3, 4]),
                            lengths=torch.tensor([1, 0, 2, 1]))
    batch = Batch(kjt, torch.ones(2, 3), torch.tensor([1.0, 0.0]),
                  torch.tensor([100, 101]), torch.tensor([7, 8]))
    buf = encode_batch(batch)
    out = decode_batch(buf)
    assert out.sparse.values().tolist() == [1, 2, 3, 4]
    assert out.sparse.lengths().tolist() == [1, 0, 2, 1]
    assert out.sparse.length_per_key() == [1, 3]
    assert out.dense.dtype == torch.float32 and out.dense.shape == (2, 3)
    assert out.timestamps.tolist() == [100, 101] and out.example_ids.tolist() == [7, 8]
    out.dense.add_(1)  # the decoder owns its copy: in-place ops are safe
    assert decode_batch(buf).dense[0, 0].item() == 1.0


def test_encode_rejects_invalid_input() -> None:
    cols = make_cols()
    bad_labels = ExampleColumns(**{**cols.__dict__, "labels": cols.labels + 2})
    with pytest.raises(InvalidInputError, match="labels"):
        encode_columns(bad_labels)
    dup = ExampleColumns(**{**cols.__dict__, "names": ("a", "a", "b")})
    with pytest.raises(InvalidInputError, match="unique"):
        encode_columns(dup)
    with pytest.raises(InvalidInputError, match="too many examples"):
        encode_columns(make_cols(b=20), limits=CodecLimits(max_examples=10))


def test_checksum_detects_a_flipped_bit() -> None:
    buf = bytearray(encode_columns(make_cols()))
    buf[-1] ^= 1
    with pytest.raises(CorruptDataError, match="CRC"):
        decode_columns(bytes(buf))
    # without the checksum the same message decodes (the flip hit an id)
    plain = bytearray(encode_columns(make_cols(), checksum=False))
    plain[-1] ^= 1
    decode_columns(bytes(plain))


def _header(buf: bytes, **fields: int) -> bytes:
    names = ("magic", "version", "flags", "b", "f", "d", "names_size", "n", "total", "crc")
    vals = dict(zip(names, struct.unpack_from("<4sHHIIIIQII", buf)))
    vals.update(fields)
    return struct.pack("<4sHHIIIIQII", *vals.values()) + buf[HEADER_SIZE:]


@pytest.mark.parametrize("fields, match", [
    ({"magic": b"XXXX"}, "magic"),
    ({"version": 9}, "version"),
    ({"flags": 0x80}, "flag"),
    ({"b": 1 << 30}, "cap"),
    ({"n": 1 << 40}, "cap"),
    ({"b": 6}, "imply|declares"),
    ({"total": 1 << 20}, "declares"),
])
def test_hostile_headers_are_rejected_before_allocation(fields: dict, match: str) -> None:
    buf = encode_columns(make_cols(), checksum=False)
    with pytest.raises(DecodeError, match=match):
        decode_columns(_header(buf, **fields))


def test_lengths_that_do_not_sum_are_rejected() -> None:
    cols = make_cols(b=4, f=2, max_len=2)
    buf = bytearray(encode_columns(cols, checksum=False))
    lay_lengths = buf.find(cols.lengths.tobytes())
    assert lay_lengths > 0
    struct.pack_into("<i", buf, lay_lengths, -1)
    with pytest.raises(DecodeError, match="lengths"):
        decode_columns(bytes(buf))


def test_short_and_empty_buffers() -> None:
    for raw in (b"", b"MLEX", bytes(HEADER_SIZE - 1)):
        with pytest.raises(DecodeError):
            decode_columns(raw)
    h = peek_header(encode_columns(make_cols(b=3)))
    assert h.num_examples == 3


def test_take_and_concat_match_a_direct_gather() -> None:
    a, b = make_cols(b=6, seed=1, weights=True), make_cols(b=4, seed=2, weights=True)
    both = concat_columns([a, b])
    assert len(both) == 10
    assert_same(take_rows(both, np.arange(6)), a)
    assert_same(take_rows(both, np.arange(6, 10)), b)
    rows = np.array([3, 0, 3])
    got = take_rows(a, rows)
    for f in range(3):
        starts = np.concatenate(([0], np.cumsum(a.lengths[f])))
        base = int(a.lengths[:f].sum())
        want = np.concatenate([a.values[base + starts[r]: base + starts[r + 1]] for r in rows])
        got_start = int(got.lengths[:f].sum())
        np.testing.assert_array_equal(
            got.values[got_start: got_start + int(got.lengths[f].sum())], want)
    with pytest.raises(InvalidInputError, match="schemas"):
        concat_columns([a, make_cols(b=2, d=5)])


def test_from_batch_rejects_variable_stride() -> None:
    kjt = KeyedJaggedTensor(keys=["a"], values=torch.tensor([1, 2]),
                            lengths=torch.tensor([1, 1, 0]))
    batch = Batch(kjt, torch.zeros(2, 0), torch.zeros(2), torch.zeros(2, dtype=torch.int64),
                  torch.arange(2))
    with pytest.raises(InvalidInputError):
        from_batch(batch)


# ---- fuzzing: any bytes either decode into a valid batch or raise DecodeError ----------

_SEED_MESSAGES = [encode_columns(make_cols(b, f, d, seed=s, weights=w), checksum=c)
                  for (b, f, d, s, w, c) in [(5, 3, 2, 0, False, False), (3, 2, 1, 1, True, False),
                                             (0, 1, 0, 2, False, True), (2, 0, 3, 3, False, False)]]


def _decode_bounded(raw: bytes) -> None:
    """Decode under tracemalloc: on success the batch validates; on failure only
    DecodeError; numpy never allocates more than a small multiple of the input."""
    tracemalloc.start()
    try:
        try:
            batch = decode_batch(raw)
        except DecodeError:
            batch = None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= 4 * len(raw) + (64 << 10), f"peak {peak} for {len(raw)} input bytes"
    if batch is not None:
        batch.validate()


@settings(max_examples=300)
@given(st.binary(max_size=512))
def test_fuzz_random_bytes(raw: bytes) -> None:
    _decode_bounded(MAGIC + struct.pack("<H", 1) + raw if raw[:1] == b"\x01" else raw)


@settings(max_examples=400)
@given(
    which=st.integers(0, len(_SEED_MESSAGES) - 1),
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=6),
    cut=st.one_of(st.none(), st.integers(0, 10_000)),
    header_field=st.one_of(st.none(), st.tuples(st.sampled_from([8, 12, 16, 20, 24, 32]),
                                                 st.integers(0, 2**32 - 1))),
)
def test_fuzz_mutated_messages(which: int, edits: list[tuple[int, int]], cut: int | None,
                               header_field: tuple[int, int] | None) -> None:
    buf = bytearray(_SEED_MESSAGES[which])
    for pos, value in edits:
        buf[pos % len(buf)] = value
    if header_field is not None:
        at, value = header_field
        struct.pack_into("<I", buf, at, value)
    if cut is not None:
        del buf[cut % (len(buf) + 1):]
    _decode_bounded(bytes(buf))


def test_the_example_in_the_format_spec() -> None:
    """docs/example-format.md ends with this message; keep the two in step."""
    spec = bytes.fromhex(
        "4d4c45580100000001000000010000000000000003000000010000000000000058000000"
        "00000000" "0100750000000000" "0900000000000000" "0500000000000000"
        "0000803f00000000" "0100000000000000" "0700000000000000")
    cols = decode_columns(spec)
    assert cols.names == ("u",) and cols.values.tolist() == [7]
    assert cols.labels.tolist() == [1.0] and cols.timestamps.tolist() == [5]
    assert cols.example_ids.tolist() == [9] and cols.dense.shape == (1, 0)
    assert encode_columns(cols, checksum=False) == spec
