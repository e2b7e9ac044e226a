"""Erasure coding of snapshot parts with zfec: ``k`` data blocks plus ``m - k`` parity.

A part of ``size`` bytes is cut into ``k`` data blocks of ``block_size(size, k)`` bytes
(the last one zero padded); zfec's Reed-Solomon code over GF(2^8) adds ``m - k`` parity
blocks (computed by :class:`ParityEncoder`, byte for byte what ``zfec.Encoder`` makes, and
decoded by ``zfec.Decoder``). Any ``k`` of the ``m`` blocks rebuild the part. The code
works byte column by byte column, so the part is processed in stripes: each stripe is
independent (both coders release the GIL, so stripes run on several threads) and peak
memory stays at one stripe per thread.

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

import functools
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import zfec
from numba import njit

from monolith_py.errors import ConfigError, CorruptDataError, InvalidInputError

__all__ = [
    "CodecConfig",
    "block_placement",
    "block_size",
    "crc32c_combine",
    "data_block",
    "encode_parity",
    "ParityEncoder",
    "decode_part",
    "STRIPE_BYTES",
]

STRIPE_BYTES = 1 << 20
"""Bytes of each block processed per encode or decode call."""

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


_CASTAGNOLI = 0x82F63B78  # the crc32c polynomial, bit-reversed (bit 31 is x^0)


def _gf2_mulmod(a: int, b: int) -> int:
    """``a(x) * b(x) mod P(x)`` over GF(2), both bit-reversed 32-bit polynomials."""
    out, bit = 0, 1 << 31
    while a:
        if a & bit:
            out ^= b
            a ^= bit
        bit >>= 1
        b = (b >> 1) ^ (_CASTAGNOLI if b & 1 else 0)  # b * x
    return out


def _powers() -> tuple[int, ...]:
    """``x^(2^j) mod P`` for j = 0..63."""
    out, p = [], 1 << 30  # x^1
    for _ in range(64):
        out.append(p)
        p = _gf2_mulmod(p, p)
    return tuple(out)


_X_POW2 = _powers()


def crc32c_combine(crc_a: int, crc_b: int, len_b: int) -> int:
    """The crc32c of ``A + B`` from ``crc32c(A)``, ``crc32c(B)`` and ``len(B)``, without
    reading either: appending ``len_b`` bytes multiplies A's remainder by ``x^(8 len_b)``
    (the crc's pre- and post-inversion cancel out). A part's crc is combined from the
    crcs of its data blocks, which the coder computes anyway: one pass over the part
    instead of two."""
    if len_b < 0:
        raise InvalidInputError(f"length must be >= 0, got {len_b}")
    shift, bits, j = 1 << 31, 8 * int(len_b), 0  # x^0, then x^(8 len_b) by its bits
    while bits:
        if bits & 1:
            shift = _gf2_mulmod(_X_POW2[j], shift)
        bits >>= 1
        j += 1
    return _gf2_mulmod(shift, crc_a & 0xFFFFFFFF) ^ (crc_b & 0xFFFFFFFF)


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


# -- parity: zfec's code, eight bytes at a time ----------------------------------------------

_LOW7 = np.uint64(0x7F7F7F7F7F7F7F7F)
_HIGH = np.uint64(0x8080808080808080)
_POLY = np.uint64(0x1D1D1D1D1D1D1D1D)  # x^8 + x^4 + x^3 + x^2 + 1 (zfec's field), per lane
_ONE, _SEVEN = np.uint64(1), np.uint64(7)
_TILE = 512  # words per pass (4 KiB: the sources' tile and the products stay in L1)


@functools.lru_cache(maxsize=64)
def _coefficients(k: int, m: int) -> np.ndarray:
    """zfec's encoding matrix for ``(k, m)``: parity ``j`` of unit data blocks."""
    enc = zfec.Encoder(k, m)
    coef = np.zeros((m - k, k), dtype=np.uint8)
    for t in range(k):
        out = enc.encode([bytes([int(i == t)]) for i in range(k)], tuple(range(k, m)))
        coef[:, t] = [blk[0] for blk in out]
    coef.setflags(write=False)
    return coef


@njit(cache=True, nogil=True)
def _parity_words(srcs: Any, coef: np.ndarray, bits: np.ndarray,
                  dsts: Any) -> None:  # pragma: no cover
    """``dsts[j] = sum_t coef[j, t] * srcs[t]`` over GF(2^8), eight byte lanes per uint64
    word, one tile at a time. Each parity is evaluated by Horner's rule over the bits of
    its row of coefficients (``bits[j]``: the highest bit set in row ``j``, plus one):
    from the top bit down, the sum so far is doubled (each lane shifted left, its top bit
    folded back in with the polynomial, no multiplication) and every source whose
    coefficient has that bit is xored in. A row then costs one doubling per bit of its
    largest coefficient, shared by all sources, instead of one per bit of every
    coefficient. The loops run over tile-sized slices, which the compiler vectorizes."""
    n = srcs[0].shape[0]
    for lo in range(0, n, _TILE):
        hi = min(lo + _TILE, n)
        for j in range(len(dsts)):
            d = dsts[j][lo:hi]
            d[:] = 0
            for b in range(bits[j] - 1, -1, -1):
                if b < bits[j] - 1:
                    for i in range(hi - lo):
                        x = d[i]
                        h = x & _HIGH  # each lane's top bit; (h - (h >> 7)) | h: 0xFF lanes
                        d[i] = ((x & _LOW7) << _ONE) ^ (((h - (h >> _SEVEN)) | h) & _POLY)
                for t in range(len(srcs)):
                    if (coef[j, t] >> b) & 1:
                        s = srcs[t][lo:hi]
                        for i in range(hi - lo):
                            d[i] ^= s[i]


def _gf_mul(c: int, x: int) -> int:
    out = 0
    while c:
        if c & 1:
            out ^= x
        c >>= 1
        x = ((x << 1) & 0xFF) ^ (0x1D if x & 0x80 else 0)
    return out


class ParityEncoder:
    """The ``m - k`` parity blocks zfec makes for ``(k, m)``, computed without it.

    The coefficients are zfec's own (read from ``zfec.Encoder`` once per ``(k, m)``), so
    the parity is byte for byte zfec's and ``zfec.Decoder`` (and :func:`decode_part`)
    rebuild from it. zfec multiplies byte by byte through tables; this works on eight
    bytes at a time, by Horner's rule, and writes straight into the caller's buffers
    (nothing is allocated per stripe). On the 2-core VM of ``docs/benchmarks.md``, one
    thread, 1 MiB stripes of a 512 MiB part read from memory: 4.7-8.0 GB/s for (2, 3)
    against zfec's 1.1 (3.9 and 2.6-3.1 for (3, 5) and (4, 6), against 0.6-0.7).

    Example::

        >>> enc = ParityEncoder(2, 3)
        >>> d0, d1, out = bytes(range(16)), bytes(16), bytearray(16)
        >>> enc.encode_into([d0, d1], [out])
        >>> bytes(out) == zfec.Encoder(2, 3).encode([d0, d1], (2,))[0]
        True
    """

    def __init__(self, k: int, m: int) -> None:
        CodecConfig(k, m)
        self.k, self.m = k, m
        self.coef = _coefficients(k, m) if m > k else np.zeros((0, k), dtype=np.uint8)
        self._bits = np.array([max(int(c).bit_length() for c in row) for row in self.coef],
                              dtype=np.int64)

    def encode_into(self, data: Sequence[Any], out: Sequence[Any]) -> None:
        """Write the parity of the ``k`` equal-sized ``data`` stripes into the ``m - k``
        writable buffers ``out`` (same size)."""
        if len(data) != self.k or len(out) != self.m - self.k:
            raise InvalidInputError(f"need {self.k} data and {self.m - self.k} parity buffers, "
                                    f"got {len(data)} and {len(out)}")
        src = [np.frombuffer(_bytes_view(d), dtype=np.uint8) for d in data]
        dst = [np.frombuffer(_bytes_view(o), dtype=np.uint8) for o in out]
        n = src[0].shape[0] if src else 0
        if any(a.shape[0] != n for a in src + dst):
            raise InvalidInputError("data and parity buffers must have the same size")
        if not dst:
            return
        n8 = n - n % 8
        if n8:
            words = []
            for a in src:
                w = a[:n8].view(np.uint64)
                w.setflags(write=False)  # one array type for all (some come from bytes)
                words.append(w)
            _parity_words(tuple(words), self.coef, self._bits,
                          tuple(a[:n8].view(np.uint64) for a in dst))
        for r in range(n8, n):  # the last few bytes
            for j, a in enumerate(dst):
                v = 0
                for t in range(self.k):
                    v ^= _gf_mul(int(self.coef[j, t]), int(src[t][r]))
                a[r] = v


def encode_parity(part: Any, k: int, m: int, *, threads: int = 1) -> list[bytearray]:
    """The ``m - k`` parity blocks of ``part`` (each ``block_size(size, k)`` bytes)."""
    CodecConfig(k, m)
    view = _bytes_view(part)
    bs = block_size(view.nbytes, k)
    if m == k:
        return []
    data = [data_block(view, i, k) for i in range(k)]
    parity = [bytearray(bs) for _ in range(m - k)]
    enc = ParityEncoder(k, m)

    def stripe(lo: int, hi: int) -> Any:
        def job() -> None:
            enc.encode_into([memoryview(d)[lo:hi] for d in data],
                            [memoryview(p)[lo:hi] for p in parity])
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
