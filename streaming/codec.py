"""The example codec: one Kafka message = one columnar batch of examples.

The byte format is specified in ``docs/example-format.md`` (version 1). In short: a
40-byte little-endian header (magic ``b"MLEX"``, version, flags, counts, total size,
CRC-32C), then the feature-name table and seven arrays, each starting at an 8-byte
aligned offset: example ids, timestamps, labels, dense ``[B, D]``, lengths ``[F, B]``
(int32, key-major), ids ``[N]`` (int64), optional weights ``[N]``.

Decoding never trusts the header: every count is checked against an absolute cap and
the exact size the counts imply is compared with the real buffer size *before* anything
is sliced, so a hostile header cannot make the decoder allocate more than a small
multiple of the message itself. The decoder then takes one private copy of the message
and builds numpy views over it (no per-example Python loop) and validates the values
with vectorized checks. Any failure raises :class:`~monolith_py.errors.DecodeError`
(:class:`~monolith_py.errors.CorruptDataError` for a checksum mismatch).

Example::

    >>> import numpy as np
    >>> from streaming.columns import ExampleColumns
    >>> cols = ExampleColumns(
    ...     names=("user",), lengths=np.array([[1, 2]], dtype=np.int32),
    ...     values=np.array([7, 8, 9]), weights=None,
    ...     dense=np.ones((2, 1), np.float32), labels=np.array([1, 0], np.float32),
    ...     timestamps=np.array([5, 6]), example_ids=np.array([10, 11]))
    >>> batch = decode_batch(encode_columns(cols))
    >>> batch.sparse.values().tolist(), batch.labels.tolist()
    ([7, 8, 9], [1.0, 0.0])
"""

from __future__ import annotations

import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import crc32c
import numpy as np

from monolith_py.errors import ConfigError, CorruptDataError, DecodeError, InvalidInputError
from streaming.columns import ExampleColumns, check_columns, from_batch, to_batch

if TYPE_CHECKING:
    from monolith_py.batch import Batch

__all__ = [
    "MAGIC",
    "VERSION",
    "HEADER_SIZE",
    "CodecLimits",
    "DEFAULT_LIMITS",
    "encode_batch",
    "encode_columns",
    "decode_batch",
    "decode_columns",
    "peek_header",
    "Header",
]

MAGIC = b"MLEX"
VERSION = 1
FLAG_WEIGHTS = 1
FLAG_CHECKSUM = 2
_KNOWN_FLAGS = FLAG_WEIGHTS | FLAG_CHECKSUM
_HEADER = struct.Struct("<4sHHIIIIQII")
HEADER_SIZE = _HEADER.size  # 40
_CRC_AT = 36
_NAME_LEN = struct.Struct("<H")
_ALIGN = 8


@dataclass(frozen=True)
class CodecLimits:
    """Absolute caps the decoder enforces before it slices anything.

    Defaults allow a million examples, 4096 sparse and 16384 dense features and 256 M ids
    per message, and messages up to 1 GiB; lower them to what your topics carry.
    """

    max_examples: int = 1 << 20
    max_sparse_features: int = 4096
    max_dense_features: int = 1 << 14
    max_ids: int = 1 << 28
    max_message_bytes: int = 1 << 30
    max_name_bytes: int = 255

    def __post_init__(self) -> None:
        for name in ("max_examples", "max_sparse_features", "max_dense_features", "max_ids",
                     "max_message_bytes", "max_name_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"CodecLimits.{name} must be a positive int, got {value!r}")
        if self.max_message_bytes > (1 << 32) - 1:
            raise ConfigError(
                f"CodecLimits.max_message_bytes must be < 4 GiB (the size field is u32), "
                f"got {self.max_message_bytes}"
            )
        if self.max_name_bytes > 0xFFFF:
            raise ConfigError(f"CodecLimits.max_name_bytes must be <= 65535, "
                              f"got {self.max_name_bytes}")


DEFAULT_LIMITS = CodecLimits()


def _pad(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


@dataclass(frozen=True)
class _Layout:
    """Byte offsets of each section for given counts (all 8-byte aligned)."""

    names: int
    example_ids: int
    timestamps: int
    labels: int
    dense: int
    lengths: int
    values: int
    weights: int
    total: int


def _layout(b: int, f: int, d: int, n: int, names_size: int, weights: bool) -> _Layout:
    off = HEADER_SIZE
    names = off
    off = _pad(off + names_size)
    example_ids = off
    off = _pad(off + 8 * b)
    timestamps = off
    off = _pad(off + 8 * b)
    labels = off
    off = _pad(off + 4 * b)
    dense = off
    off = _pad(off + 4 * b * d)
    lengths = off
    off = _pad(off + 4 * f * b)
    values = off
    off = _pad(off + 8 * n)
    weights_at = off
    if weights:
        off = _pad(off + 4 * n)
    return _Layout(names, example_ids, timestamps, labels, dense, lengths, values,
                   weights_at, off)


def _encode_names(names: tuple[str, ...], limits: CodecLimits) -> bytes:
    parts = []
    for name in names:
        raw = name.encode("utf-8")
        if not raw or len(raw) > limits.max_name_bytes:
            raise InvalidInputError(
                f"feature name {name!r} must be 1..{limits.max_name_bytes} UTF-8 bytes"
            )
        parts.append(_NAME_LEN.pack(len(raw)) + raw)
    return b"".join(parts)


def encode_columns(
    cols: ExampleColumns, *, checksum: bool = True, limits: CodecLimits = DEFAULT_LIMITS
) -> bytes:
    """Encode validated columns as one message (see ``docs/example-format.md``).

    Raises :class:`InvalidInputError` for columns the decoder would reject.
    """
    check_columns(cols)
    b, f, d = len(cols), len(cols.names), int(cols.dense.shape[1])
    n = int(cols.values.shape[0])
    for what, value, cap in (("examples", b, limits.max_examples),
                             ("sparse features", f, limits.max_sparse_features),
                             ("dense features", d, limits.max_dense_features),
                             ("ids", n, limits.max_ids)):
        if value > cap:
            raise InvalidInputError(f"too many {what} for one message: {value} > {cap}; "
                                    "split the batch")
    names = _encode_names(cols.names, limits)
    lay = _layout(b, f, d, n, len(names), cols.weights is not None)
    if lay.total > limits.max_message_bytes:
        raise InvalidInputError(f"message would be {lay.total} bytes > "
                                f"{limits.max_message_bytes}; split the batch")
    out = bytearray(lay.total)
    flags = (FLAG_WEIGHTS if cols.weights is not None else 0) | \
        (FLAG_CHECKSUM if checksum else 0)
    out[lay.names:lay.names + len(names)] = names
    for at, arr, dtype in (
        (lay.example_ids, cols.example_ids, "<i8"), (lay.timestamps, cols.timestamps, "<i8"),
        (lay.labels, cols.labels, "<f4"), (lay.dense, cols.dense, "<f4"),
        (lay.lengths, cols.lengths, "<i4"), (lay.values, cols.values, "<i8"),
    ):
        raw = np.ascontiguousarray(arr, dtype=dtype).tobytes()
        out[at:at + len(raw)] = raw
    if cols.weights is not None:
        raw = np.ascontiguousarray(cols.weights, dtype="<f4").tobytes()
        out[lay.weights:lay.weights + len(raw)] = raw
    _HEADER.pack_into(out, 0, MAGIC, VERSION, flags, b, f, d, len(names), n, lay.total, 0)
    if checksum:
        crc = crc32c.crc32c(memoryview(out)[HEADER_SIZE:],
                            crc32c.crc32c(memoryview(out)[:_CRC_AT]))
        struct.pack_into("<I", out, _CRC_AT, crc)
    return bytes(out)


def encode_batch(batch: Batch, *, checksum: bool = True,
                 limits: CodecLimits = DEFAULT_LIMITS) -> bytes:
    """Encode a :class:`Batch` (CPU tensors) as one message."""
    return encode_columns(from_batch(batch), checksum=checksum, limits=limits)


@dataclass(frozen=True)
class Header:
    """The decoded fixed header of a message."""

    version: int
    flags: int
    num_examples: int
    num_sparse: int
    num_dense: int
    names_size: int
    num_ids: int
    total_size: int
    checksum: int


def peek_header(buf: bytes | bytearray | memoryview,
                limits: CodecLimits = DEFAULT_LIMITS) -> Header:
    """Parse and bound-check the header only (cheap: no copy, no array)."""
    size = len(buf)
    if size < HEADER_SIZE:
        raise DecodeError(f"message of {size} bytes is shorter than the {HEADER_SIZE}-byte "
                          "header")
    magic, version, flags, b, f, d, names_size, n, total, crc = _HEADER.unpack_from(buf, 0)
    if magic != MAGIC:
        raise DecodeError(f"bad magic {bytes(magic)!r}, expected {MAGIC!r} (not an example "
                          "message)")
    if version != VERSION:
        raise DecodeError(f"unsupported example-format version {version} (this reader "
                          f"knows {VERSION})")
    if flags & ~_KNOWN_FLAGS:
        raise DecodeError(f"unknown flag bits 0x{flags & ~_KNOWN_FLAGS:x}")
    for what, value, cap in (("examples", b, limits.max_examples),
                             ("sparse features", f, limits.max_sparse_features),
                             ("dense features", d, limits.max_dense_features),
                             ("ids", n, limits.max_ids),
                             ("name-table bytes", names_size,
                              f * (2 + limits.max_name_bytes)),
                             ("message bytes", total, limits.max_message_bytes)):
        if value > cap:
            raise DecodeError(f"header declares {value} {what}, above the cap of {cap}")
    if total != size:
        raise DecodeError(f"header declares {total} bytes but the message has {size}")
    return Header(version, flags, b, f, d, names_size, n, total, crc)


class _NameCache:
    """Parsed name tables by their raw bytes (messages of a topic share a few)."""

    def __init__(self, capacity: int = 64) -> None:
        self._lock = threading.Lock()
        self._items: OrderedDict[bytes, tuple[str, ...]] = OrderedDict()
        self._capacity = capacity

    def get(self, raw: bytes, count: int, limits: CodecLimits) -> tuple[str, ...]:
        with self._lock:
            found = self._items.get(raw)
            if found is not None and len(found) == count:
                self._items.move_to_end(raw)
                return found
        names = _parse_names(raw, count, limits)
        with self._lock:
            self._items[raw] = names
            while len(self._items) > self._capacity:
                self._items.popitem(last=False)
        return names


def _parse_names(raw: bytes, count: int, limits: CodecLimits) -> tuple[str, ...]:
    names: list[str] = []
    pos = 0
    for _ in range(count):  # per feature, bounded by max_sparse_features
        if pos + 2 > len(raw):
            raise DecodeError("feature-name table is truncated")
        (length,) = _NAME_LEN.unpack_from(raw, pos)
        pos += 2
        if length == 0 or length > limits.max_name_bytes or pos + length > len(raw):
            raise DecodeError(f"feature name length {length} is invalid or runs past the "
                              "name table")
        try:
            names.append(raw[pos:pos + length].decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise DecodeError(f"feature name is not valid UTF-8: {exc}") from None
        pos += length
    if pos != len(raw):
        raise DecodeError(f"feature-name table has {len(raw) - pos} trailing bytes")
    if len(set(names)) != len(names):
        raise DecodeError("feature names repeat in the name table")
    return tuple(names)


_names = _NameCache()


def decode_columns(buf: bytes | bytearray | memoryview, *, verify_checksum: bool = True,
                   limits: CodecLimits = DEFAULT_LIMITS) -> ExampleColumns:
    """Decode one message into validated numpy columns (views over one private copy).

    Raises :class:`DecodeError` (never anything else for bad bytes).
    """
    h = peek_header(buf, limits)
    b, f, d, n = h.num_examples, h.num_sparse, h.num_dense, h.num_ids
    lay = _layout(b, f, d, n, h.names_size, bool(h.flags & FLAG_WEIGHTS))
    if lay.total != h.total_size:
        raise DecodeError(f"counts imply {lay.total} bytes but the header declares "
                          f"{h.total_size}")
    if verify_checksum and h.flags & FLAG_CHECKSUM:
        view = memoryview(buf)
        got = crc32c.crc32c(view[HEADER_SIZE:], crc32c.crc32c(view[:_CRC_AT]))
        if got != h.checksum:
            raise CorruptDataError(f"CRC-32C mismatch: stored 0x{h.checksum:08x}, "
                                   f"computed 0x{got:08x}")
    names = _names.get(bytes(buf[lay.names:lay.names + h.names_size]), f, limits)
    own = bytearray(buf)  # one copy: the views below are writable and outlive `buf`

    def view(dtype: str, at: int, count: int) -> np.ndarray:
        return np.frombuffer(own, dtype=dtype, count=count, offset=at)

    weights = view("<f4", lay.weights, n) if h.flags & FLAG_WEIGHTS else None
    cols = ExampleColumns(
        names=names,
        lengths=view("<i4", lay.lengths, f * b).reshape(f, b),
        values=view("<i8", lay.values, n),
        weights=weights,
        dense=view("<f4", lay.dense, b * d).reshape(b, d),
        labels=view("<f4", lay.labels, b),
        timestamps=view("<i8", lay.timestamps, b),
        example_ids=view("<i8", lay.example_ids, b),
    )
    check_columns(cols, DecodeError)
    return cols


def decode_batch(buf: bytes | bytearray | memoryview, *, verify_checksum: bool = True,
                 limits: CodecLimits = DEFAULT_LIMITS) -> Batch:
    """Decode one message into a :class:`Batch`. Raises :class:`DecodeError`."""
    return to_batch(decode_columns(buf, verify_checksum=verify_checksum, limits=limits))
