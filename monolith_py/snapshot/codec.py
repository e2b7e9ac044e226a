"""Erasure coding of snapshot parts with zfec: ``k`` data blocks plus ``m - k`` parity.

A part of ``size`` bytes is cut into ``k`` data blocks of ``block_size(size, k)`` bytes
(the last one zero padded); zfec (Reed-Solomon over GF(2^8)) adds ``m - k`` parity blocks.
Any ``k`` of the ``m`` blocks rebuild the part. The code works byte column by byte column,
so the part is processed in stripes: each stripe is independent (zfec releases the GIL,
so stripes run on several threads) and peak memory stays at one stripe per thread.

Every block is checksummed with crc32c by the caller that stores it (the crcs are in the
sealed manifest); this module only does the arithmetic and checks sizes.

Example::

    >>> data = bytes(range(250)) * 41
    >>> parity = encode_parity(data, k=3, m=5)
    >>> blocks = {i: data_block(data, i, 3) for i in range(3)}
    >>> blocks.update({3 + j: p for j, p in enumerate(parity)})
    >>> del blocks[0], blocks[2]                      # lose any m - k blocks
    >>> bytes(decode_part(blocks, k=3, m=5, size=len(data))) == data
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import zfec

from monolith_py.errors import ConfigError, CorruptDataError, InvalidInputError

__all__ = [
    "CodecConfig",
    "block_placement",
    "block_size",
    "data_block",
    "encode_parity",
    "decode_part",
    "STRIPE_BYTES",
]

STRIPE_BYTES = 1 << 20
"""Bytes of each block processed per zfec call."""

_MAX_M = 256


@dataclass(frozen=True)
class CodecConfig:
    """``k`` data blocks, ``m`` blocks in total (``1 <= k <= m <= 256``).

    Losing up to ``m - k`` blocks (hosts) is survivable; memory overhead is ``m / k``.

    Example::

        >>> CodecConfig(2, 3).tolerated
        1
    """

    k: int = 2
    m: int = 3

    def __post_init__(self) -> None:
        for name in ("k", "m"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ConfigError(f"CodecConfig.{name} must be an int, got {v!r}")
        if not 1 <= self.k <= self.m <= _MAX_M:
            raise ConfigError(
                f"CodecConfig needs 1 <= k <= m <= {_MAX_M}, got k={self.k}, m={self.m}; "
                "e.g. k=2, m=3 survives the loss of one host")

    @property
    def tolerated(self) -> int:
        """How many blocks (hosts) may be lost."""
        return self.m - self.k


def _bytes_view(data: Any) -> memoryview:
    view = memoryview(data)
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    return view


def block_size(size: int, k: int) -> int:
    """Bytes per block for a part of ``size`` bytes (at least 1)."""
    if size < 0 or k < 1:
        raise InvalidInputError(f"need size >= 0 and k >= 1, got size={size}, k={k}")
    return max(1, -(-size // k))


def block_placement(home: int, num_hosts: int, k: int, m: int) -> tuple[int, ...]:
    """The host of each of the ``m`` blocks of a part whose whole copy lives on ``home``.

    Blocks go to the hosts after the home, data blocks first: ``home + 1 + i``
    (mod ``num_hosts``). When the group has exactly ``m`` hosts the last block, a parity
    block when ``m > k``, wraps onto the home host. The home already holds the whole part,
    so its own block is the one least useful without it: losing the home host leaves
    every data block on the survivors, and the part is restored by plain transfers with
    nothing to decode. With ``m == 1`` (no coding) the only block is the home copy."""
    if not (1 <= k <= m <= num_hosts and 0 <= home < num_hosts):
        raise InvalidInputError(f"cannot place {m} blocks (k={k}) of host {home} on "
                                f"{num_hosts} hosts")
    if m == 1:
        return (home,)
    return tuple((home + 1 + i) % num_hosts for i in range(m))


def data_block(part: Any, index: int, k: int) -> memoryview | bytes:
    """Data block ``index`` (``< k``) of ``part``: a zero-copy view, or a padded copy for
    the last block when ``size`` is not a multiple of ``k``."""
    view = _bytes_view(part)
    bs = block_size(view.nbytes, k)
    if not 0 <= index < k:
        raise InvalidInputError(f"data block index must be in [0, {k}), got {index}")
    lo, hi = index * bs, (index + 1) * bs
    if hi <= view.nbytes:
        return view[lo:hi]
    out = bytearray(bs)
    if lo < view.nbytes:
        out[: view.nbytes - lo] = view[lo:]
    return bytes(out)


def _stripes(bs: int) -> list[tuple[int, int]]:
    return [(lo, min(lo + STRIPE_BYTES, bs)) for lo in range(0, bs, STRIPE_BYTES)]


def _run(jobs: list[Any], threads: int) -> None:
    if threads <= 1 or len(jobs) <= 1:
        for job in jobs:
            job()
        return
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for f in [pool.submit(job) for job in jobs]:
            f.result()


def encode_parity(part: Any, k: int, m: int, *, threads: int = 1) -> list[bytearray]:
    """The ``m - k`` parity blocks of ``part`` (each ``block_size(size, k)`` bytes)."""
    CodecConfig(k, m)
    view = _bytes_view(part)
    bs = block_size(view.nbytes, k)
    if m == k:
        return []
    data = [data_block(view, i, k) for i in range(k)]
    parity = [bytearray(bs) for _ in range(m - k)]
    enc = zfec.Encoder(k, m)
    wanted = tuple(range(k, m))

    def stripe(lo: int, hi: int) -> Any:
        def job() -> None:
            out = enc.encode(tuple(memoryview(d)[lo:hi] for d in data), wanted)
            for j, blk in enumerate(out):
                parity[j][lo:hi] = blk
        return job

    _run([stripe(lo, hi) for lo, hi in _stripes(bs)], threads)
    return parity


def decode_part(blocks: Mapping[int, Any], k: int, m: int, size: int, *,
                out: Any = None, threads: int = 1) -> memoryview:
    """Rebuild a part of ``size`` bytes from any ``k`` of its blocks ``{index: bytes}``.

    Primary (data) blocks are preferred. ``out`` (at least ``k * block_size`` bytes) may be
    given to avoid an allocation. Returns a view of the ``size`` bytes.

    Raises:
        CorruptDataError: fewer than ``k`` blocks, or blocks of the wrong size.
    """
    CodecConfig(k, m)
    bs = block_size(size, k)
    views: dict[int, memoryview] = {}
    for i, b in blocks.items():
        if not 0 <= int(i) < m:
            raise CorruptDataError(f"block index {i} outside [0, {m})")
        v = _bytes_view(b)
        if v.nbytes != bs:
            raise CorruptDataError(f"block {i} has {v.nbytes} bytes, expected {bs}")
        views[int(i)] = v
    if len(views) < k:
        raise CorruptDataError(
            f"need {k} valid blocks to rebuild the part, have {len(views)} ({sorted(views)})")
    chosen = sorted(views, key=lambda i: (i >= k, i))[:k]
    buf = bytearray(k * bs) if out is None else out
    dst = _bytes_view(buf)
    if dst.nbytes < k * bs:
        raise InvalidInputError(f"out has {dst.nbytes} bytes, need {k * bs}")
    if all(i < k for i in chosen):  # all data blocks present: a copy, no arithmetic
        for i in chosen:
            dst[i * bs:(i + 1) * bs] = views[i]
        return dst[:size]
    dec = zfec.Decoder(k, m)
    nums = tuple(chosen)

    def stripe(lo: int, hi: int) -> Any:
        def job() -> None:
            segs = dec.decode(tuple(views[i][lo:hi] for i in chosen), nums)
            for i, seg in enumerate(segs):
                dst[i * bs + lo:i * bs + hi] = seg
        return job

    _run([stripe(lo, hi) for lo, hi in _stripes(bs)], threads)
    return dst[:size]
