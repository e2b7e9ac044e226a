"""Erasure codec: any k of m blocks rebuild the part (property test, zfec's own claim)."""

from __future__ import annotations

import os

import pytest
import zfec
from hypothesis import given, settings
from hypothesis import strategies as st

from monolith_py.errors import ConfigError, CorruptDataError, InvalidInputError
from monolith_py.snapshot import codec
from monolith_py.snapshot.codec import CodecConfig, block_size, data_block, decode_part, encode_parity


@st.composite
def _case(draw: st.DrawFn) -> tuple[bytes, int, int, list[int]]:
    m = draw(st.integers(1, 8))
    k = draw(st.integers(1, m))
    data = draw(st.binary(min_size=0, max_size=3000))
    keep = draw(st.permutations(list(range(m))))[:k]
    return data, k, m, list(keep)


@settings(max_examples=150)
@given(_case())
def test_any_k_of_m_blocks_rebuild_the_data(case: tuple[bytes, int, int, list[int]]) -> None:
    data, k, m, keep = case
    blocks = {i: data_block(data, i, k) for i in range(k)}
    blocks.update({k + j: p for j, p in enumerate(encode_parity(data, k, m))})
    assert len(blocks) == m
    assert all(len(bytes(b)) == block_size(len(data), k) for b in blocks.values())
    out = decode_part({i: blocks[i] for i in keep}, k, m, len(data))
    assert bytes(out) == data


@settings(max_examples=150)
@given(st.integers(1, 12), st.integers(0, 6), st.binary(min_size=1, max_size=2000),
       st.integers(0, 7))
def test_parity_is_byte_for_byte_zfecs(k: int, extra: int, seed: bytes, offset: int) -> None:
    """``ParityEncoder`` writes exactly the parity ``zfec.Encoder`` makes, for any (k, m),
    any length (including a tail of fewer than eight bytes) and unaligned buffers."""
    m = k + extra
    n = len(seed)
    pool = bytearray(os.urandom(k * (n + 8)))
    data = [memoryview(pool)[offset + i * (n + 1): offset + i * (n + 1) + n] for i in range(k)]
    out = [bytearray(n + 3) for _ in range(m - k)]
    codec.ParityEncoder(k, m).encode_into(data, [memoryview(o)[3:] for o in out])
    want = zfec.Encoder(k, m).encode([bytes(d) for d in data], tuple(range(k, m))) if m > k else []
    assert [bytes(o[3:]) for o in out] == [bytes(w) for w in want]


@pytest.mark.parametrize("k,m", [(1, 2), (2, 3), (2, 4), (3, 5), (4, 6), (10, 14)])
def test_parity_over_many_tiles_is_zfecs(k: int, m: int) -> None:
    """Stripes longer than the kernel's 4 KiB tile (several whole tiles, a partial one and a
    tail under eight bytes) code exactly as zfec does, for rows of small and large
    coefficients."""
    n = 3 * 4096 + 1000 + 5
    data = [os.urandom(n) for _ in range(k)]
    out = [bytearray(n) for _ in range(m - k)]
    codec.ParityEncoder(k, m).encode_into(data, out)
    assert [bytes(o) for o in out] == [bytes(w) for w in zfec.Encoder(k, m).encode(
        data, tuple(range(k, m)))]


def test_parity_encoder_rejects_mismatched_buffers() -> None:
    enc = codec.ParityEncoder(2, 3)
    with pytest.raises(InvalidInputError):
        enc.encode_into([bytes(8)], [bytearray(8)])
    with pytest.raises(InvalidInputError):
        enc.encode_into([bytes(8), bytes(9)], [bytearray(8)])


def test_striped_and_threaded_paths_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(codec, "STRIPE_BYTES", 1000)
    data = os.urandom(10_007)
    p1 = encode_parity(data, 3, 6, threads=1)
    p2 = encode_parity(data, 3, 6, threads=2)
    assert p1 == p2
    blocks = {4: p1[1], 5: p1[2], 1: data_block(data, 1, 3)}
    assert bytes(decode_part(blocks, 3, 6, len(data), threads=2)) == data


def test_too_few_or_wrong_size_blocks_are_rejected() -> None:
    data = os.urandom(100)
    par = encode_parity(data, 2, 3)
    with pytest.raises(CorruptDataError, match="need 2 valid blocks"):
        decode_part({2: par[0]}, 2, 3, len(data))
    with pytest.raises(CorruptDataError, match="bytes, expected"):
        decode_part({0: data_block(data, 0, 2), 2: bytes(par[0])[:-1]}, 2, 3, len(data))
    with pytest.raises(CorruptDataError, match="outside"):
        decode_part({0: data_block(data, 0, 2), 7: par[0]}, 2, 3, len(data))


@pytest.mark.parametrize("k,m", [(0, 1), (3, 2), (2, 300)])
def test_config_validation(k: int, m: int) -> None:
    with pytest.raises(ConfigError):
        CodecConfig(k, m)


@given(st.integers(1, 6), st.integers(0, 6), st.integers(0, 9))
def test_block_placement_spreads_blocks_and_keeps_data_off_the_home(k: int, extra: int,
                                                                    more_hosts: int) -> None:
    m = k + extra
    n = m + more_hosts
    for home in range(n):
        placement = codec.block_placement(home, n, k, m)
        assert len(placement) == m and len(set(placement)) == m
        assert all(0 <= h < n for h in placement)
        if m > 1:  # losing the home host never costs a data block
            assert home not in placement[:k] or m == k == n
        if m > k:  # the home holds a block only when every host must hold one
            assert (home in placement) == (n == m)


def test_block_placement_rejects_impossible_groups() -> None:
    from monolith_py.errors import InvalidInputError

    for home, n, k, m in ((0, 2, 2, 3), (2, 2, 1, 2), (0, 3, 3, 2), (0, 3, 0, 1)):
        with pytest.raises(InvalidInputError):
            codec.block_placement(home, n, k, m)


def test_crc32c_combine_equals_the_crc_of_the_concatenation() -> None:
    import crc32c

    from monolith_py.snapshot.codec import crc32c_combine

    for n_a, n_b in [(0, 0), (0, 7), (9, 0), (1, 1), (4096, 4095), (100_003, 65_536)]:
        a, b = os.urandom(n_a), os.urandom(n_b)
        assert crc32c_combine(crc32c.crc32c(a), crc32c.crc32c(b), n_b) == crc32c.crc32c(a + b)
    with pytest.raises(InvalidInputError):
        crc32c_combine(0, 0, -1)
