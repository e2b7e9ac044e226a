"""Rebuilding a part from the blocks of other hosts (``_fetch.fetch_decoded``): stripes
decoded while the blocks stream in, every data block checked against its sealed crc32c."""

from __future__ import annotations

import dataclasses
from typing import Any

import crc32c
import numpy as np
import pytest

from monolith_py.snapshot import _fetch
from monolith_py.snapshot.codec import block_size, data_block, encode_parity
from monolith_py.snapshot.manifest import PartRecord


class Host:
    """A source with only ``get_block`` (the fallback read path, streamed in chunks)."""

    def __init__(self) -> None:
        self.blocks: dict[Any, bytes] = {}

    def get_block(self, key: Any) -> bytes | None:
        return self.blocks.get(tuple(key))


def _place(data: bytes, k: int, m: int) -> tuple[PartRecord, dict[int, Host]]:
    parity = encode_parity(data, k, m)
    blocks = [bytes(data_block(data, i, k)) for i in range(k)] + [bytes(p) for p in parity]
    rec = PartRecord(participant="ps/0", snapshot_id=3, kind="full", base_id=-1,
                     size=len(data), crc=crc32c.crc32c(data), home=0, k=k, m=m,
                     block_crcs=tuple(crc32c.crc32c(b) for b in blocks),
                     placement=tuple(range(m)))
    hosts = {h: Host() for h in range(m)}
    for i, b in enumerate(blocks):
        hosts[i].blocks[(*rec.key, i)] = b
    return rec, hosts


@pytest.fixture(autouse=True)
def small_stripes(monkeypatch: pytest.MonkeyPatch) -> None:
    # several stripes and ring wrap-arounds on a part of a few hundred KiB
    monkeypatch.setattr(_fetch, "STREAM_CHUNK", 4096)
    monkeypatch.setattr(_fetch, "STRIPE", 3 * 4096)
    monkeypatch.setattr(_fetch, "RING_BYTES", 4 * 3 * 4096)


@pytest.mark.parametrize(("k", "m", "lost"), [(2, 3, [0]), (3, 5, [0, 2]), (3, 5, [1, 4])])
def test_part_rebuilt_from_any_k_blocks(k: int, m: int, lost: list[int]) -> None:
    data = np.random.default_rng(k + m).integers(0, 256, 300_001, dtype=np.uint8).tobytes()
    rec, hosts = _place(data, k, m)
    assert block_size(len(data), k) > _fetch.RING_BYTES  # the parity rings wrap
    sources = {h: s for h, s in hosts.items() if h not in lost}
    why: list[str] = []
    out = _fetch.fetch_decoded(sources, rec, why)
    assert out is not None and bytes(out) == data


def test_decoded_block_that_fails_its_sealed_crc_is_refused() -> None:
    data = np.random.default_rng(1).integers(0, 256, 100_000, dtype=np.uint8).tobytes()
    rec, hosts = _place(data, 2, 3)
    crcs = list(rec.block_crcs)
    crcs[0] ^= 1  # the manifest disagrees with what blocks 1 and 2 decode to
    bad = dataclasses.replace(rec, block_crcs=tuple(crcs))
    why: list[str] = []
    assert _fetch.fetch_decoded({1: hosts[1], 2: hosts[2]}, bad, why) is None
    assert any("decoded blocks [0] fail their sealed crc32c" in w for w in why)


def test_corrupt_block_is_excluded_and_the_part_rebuilt_from_the_others() -> None:
    data = np.random.default_rng(2).integers(0, 256, 90_000, dtype=np.uint8).tobytes()
    rec, hosts = _place(data, 2, 4)
    key = (*rec.key, 1)
    flipped = bytearray(hosts[1].blocks[key])
    flipped[5] ^= 0x40
    hosts[1].blocks[key] = bytes(flipped)
    why: list[str] = []
    out = _fetch.fetch_decoded({1: hosts[1], 2: hosts[2], 3: hosts[3]}, rec, why)
    assert out is not None and bytes(out) == data
    assert any("block 1 on host 1 corrupt" in w for w in why)


@pytest.mark.parametrize("seed", range(4))
def test_row_target_scatters_rows_split_across_any_chunking(seed: int) -> None:
    rng = np.random.default_rng(seed)
    rows, width = int(rng.integers(1, 400)), int(rng.integers(1, 9))
    src = rng.standard_normal((rows, width)).astype(np.float32)
    start = int(rng.integers(0, 64))
    blob = np.zeros(start + src.nbytes + int(rng.integers(0, 64)), dtype=np.uint8)
    blob[start: start + src.nbytes] = src.view(np.uint8).ravel()
    take = np.sort(rng.choice(rows, size=int(rng.integers(0, rows + 1)), replace=False))
    dest = rng.permutation(take.shape[0])
    out = np.full((take.shape[0], width), np.nan, dtype=np.float32)
    target = _fetch.RowTarget(start, rows, out, take, dest)
    pos = 0
    while pos < blob.shape[0]:  # chunks of any size, many splitting a row
        n = int(rng.integers(1, 3 * width * 4 + 2))
        target.feed(pos, blob[pos: pos + n])
        pos += n
    expected = np.empty_like(out)
    expected[dest] = src[take]
    assert np.array_equal(out, expected)
