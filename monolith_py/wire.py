"""Array frames: the byte encoding of named numpy arrays shared by every wire and store.

PS RPC payloads, train-to-serve deltas and snapshot parts all move "a few named arrays
plus a little metadata". They share this one format instead of each inventing its own,
and none of them ever pickles.

Layout (all integers little-endian)::

    offset 0   magic      4 bytes  b"MNF1"
    offset 4   flags      u32      bit 0: payload checksum present
    offset 8   header_len u32      length of the JSON header
    offset 12  checksum   u32      crc32c of the payload (0 when absent)
    offset 16  header     JSON     {"meta": {...}, "arrays": [{"name", "dtype", "shape",
                                    "offset", "nbytes"}, ...]}
    ...        payload             arrays at 8-byte aligned offsets (relative to payload start)

Decoding validates everything before it allocates or slices: the header length and
array count against limits, each dtype against a whitelist, ``prod(shape) * itemsize ==
nbytes``, every array inside the buffer, and the checksum. Decoded arrays are read-only
views over the input bytes (zero copy) unless ``copy=True``.

Example::

    >>> import numpy as np
    >>> buf = encode_arrays({"keys": np.arange(3)}, meta={"table": "user"})
    >>> arrays, meta = decode_arrays(buf)
    >>> arrays["keys"].tolist(), meta["table"]
    ([0, 1, 2], 'user')
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import crc32c
import numpy as np

from monolith_py.errors import CorruptDataError, DecodeError, InvalidInputError

__all__ = [
    "WireLimits", "DEFAULT_LIMITS", "encode_arrays", "decode_arrays", "MAGIC",
    "FramePlan", "plan_frame",
]

MAGIC = b"MNF1"
_PREFIX = struct.Struct("<4sIII")
_FLAG_CHECKSUM = 1
_ALIGN = 8

_ALLOWED_DTYPES = frozenset(
    np.dtype(t).str
    for t in (
        np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16,
        np.uint32, np.uint64, np.float16, np.float32, np.float64,
    )
)


@dataclass(frozen=True)
class WireLimits:
    """Upper bounds a decoder enforces before trusting a frame.

    Attributes:
        max_header_bytes: largest JSON header accepted.
        max_arrays: most arrays in one frame.
        max_total_bytes: largest frame accepted (header + payload).
        max_ndim: most dimensions of one array.
    """

    max_header_bytes: int = 1 << 20
    max_arrays: int = 4096
    max_total_bytes: int = 1 << 34
    max_ndim: int = 8


DEFAULT_LIMITS = WireLimits()


def _as_numpy(name: str, value: Any) -> np.ndarray:
    if hasattr(value, "detach") and hasattr(value, "numpy"):  # torch.Tensor without importing torch
        value = value.detach().cpu().numpy()
    arr = np.asarray(value)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    if arr.dtype.str not in _ALLOWED_DTYPES:
        raise InvalidInputError(
            f"array {name!r} has dtype {arr.dtype}, which frames do not carry; "
            "use a bool, integer or float dtype"
        )
    return arr if arr.flags.c_contiguous else arr.copy(order="C")


def encode_arrays(
    arrays: Mapping[str, Any],
    meta: Mapping[str, Any] | None = None,
    *,
    checksum: bool = True,
) -> bytes:
    """Encode named arrays (numpy or torch) and JSON-able ``meta`` into one frame.

    Args:
        arrays: name -> array; any shape, dtypes bool/int*/uint*/float16/32/64.
        meta: small JSON-serializable metadata (ids, versions, table names).
        checksum: store a crc32c of the payload (cheap: ~10 GB/s with hardware CRC).

    Returns:
        The frame as ``bytes``.
    """
    entries = []
    parts: list[np.ndarray] = []
    offset = 0
    for name, value in arrays.items():
        arr = _as_numpy(name, value)
        offset = (offset + _ALIGN - 1) // _ALIGN * _ALIGN
        entries.append(
            {"name": str(name), "dtype": arr.dtype.str, "shape": list(arr.shape),
             "offset": offset, "nbytes": arr.nbytes}
        )
        parts.append(arr)
        offset += arr.nbytes
    try:
        header = json.dumps(
            {"meta": dict(meta or {}), "arrays": entries}, separators=(",", ":")
        ).encode()
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"frame metadata is not JSON-serializable: {exc}") from exc
    payload_start = _PREFIX.size + len(header)
    payload_start = (payload_start + _ALIGN - 1) // _ALIGN * _ALIGN
    out = bytearray(payload_start + offset)
    out[_PREFIX.size : _PREFIX.size + len(header)] = header
    view = memoryview(out)
    for entry, arr in zip(entries, parts):
        start = payload_start + int(entry["offset"])  # type: ignore[call-overload]
        view[start : start + arr.nbytes] = arr.reshape(-1).view(np.uint8).data
    crc = crc32c.crc32c(view[payload_start:]) if checksum else 0
    padded_header_len = payload_start - _PREFIX.size
    _PREFIX.pack_into(
        out, 0, MAGIC, _FLAG_CHECKSUM if checksum else 0, padded_header_len, crc
    )
    return bytes(out)


@dataclass(frozen=True)
class FramePlan:
    """The layout of a frame whose arrays the caller writes in place (see :func:`plan_frame`).

    Attributes:
        nbytes: total frame size.
        payload_start: where the payload (the arrays) begins.
        offsets: ``{name: absolute byte offset}`` of each array in the frame.
        dtypes, shapes: of each array.
    """

    header: bytes
    payload_start: int
    nbytes: int
    offsets: dict[str, int]
    dtypes: dict[str, np.dtype]
    shapes: dict[str, tuple[int, ...]]
    checksum: bool

    def array(self, buf: Any, name: str) -> np.ndarray:
        """A writable view of array ``name`` inside ``buf`` (at least ``nbytes`` long)."""
        dtype, shape = self.dtypes[name], self.shapes[name]
        count = 1
        for d in shape:
            count *= d
        return np.frombuffer(buf, dtype=dtype, count=count,
                             offset=self.offsets[name]).reshape(shape)

    def head(self, payload_crc: int) -> bytes:
        """The prefix and header for a payload whose crc32c is ``payload_crc`` (for
        writers that stream the payload, e.g. to a file)."""
        out = bytearray(self.payload_start)
        _PREFIX.pack_into(out, 0, MAGIC, _FLAG_CHECKSUM if self.checksum else 0,
                          self.payload_start - _PREFIX.size, payload_crc if self.checksum else 0)
        out[_PREFIX.size:] = self.header
        return bytes(out)

    def finish(self, buf: Any) -> int:
        """Write the prefix and header into ``buf`` and, after the caller filled every
        array, the payload checksum; returns the frame size. ``buf[:nbytes]`` then
        decodes with :func:`decode_arrays`."""
        view = memoryview(buf).cast("B")
        if view.nbytes < self.nbytes:
            raise InvalidInputError(f"buffer of {view.nbytes} bytes is smaller than the "
                                    f"{self.nbytes}-byte frame")
        view[_PREFIX.size : self.payload_start] = self.header
        crc = crc32c.crc32c(view[self.payload_start : self.nbytes]) if self.checksum else 0
        _PREFIX.pack_into(view, 0, MAGIC, _FLAG_CHECKSUM if self.checksum else 0,
                          self.payload_start - _PREFIX.size, crc)
        return self.nbytes


def plan_frame(
    specs: Any,
    meta: Mapping[str, Any] | None = None,
    *,
    checksum: bool = True,
) -> FramePlan:
    """Lay out a frame for arrays the caller will write in place (no intermediate copy).

    Args:
        specs: ``(name, dtype, shape)`` for each array, in order.
        meta: JSON-serializable metadata.

    Example::

        >>> plan = plan_frame([("keys", np.int64, (3,))], {"t": 1})
        >>> buf = bytearray(plan.nbytes)
        >>> plan.array(buf, "keys")[:] = [4, 5, 6]
        >>> n = plan.finish(buf)
        >>> decode_arrays(buf)[0]["keys"].tolist()
        [4, 5, 6]
    """
    entries = []
    offset = 0
    dtypes: dict[str, np.dtype] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for name, dtype, shape in specs:
        dt = np.dtype(dtype).newbyteorder("<") if np.dtype(dtype).byteorder == ">" else np.dtype(dtype)
        if dt.str not in _ALLOWED_DTYPES:
            raise InvalidInputError(f"array {name!r} has dtype {dt}, which frames do not carry")
        shp = tuple(int(d) for d in shape)
        if name in dtypes:
            raise InvalidInputError(f"duplicate array name {name!r}")
        nbytes = dt.itemsize
        for d in shp:
            nbytes *= d
        offset = (offset + _ALIGN - 1) // _ALIGN * _ALIGN
        entries.append({"name": str(name), "dtype": dt.str, "shape": list(shp),
                        "offset": offset, "nbytes": nbytes})
        dtypes[name], shapes[name] = dt, shp
        offset += nbytes
    try:
        header = json.dumps({"meta": dict(meta or {}), "arrays": entries},
                            separators=(",", ":")).encode()
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"frame metadata is not JSON-serializable: {exc}") from exc
    payload_start = (_PREFIX.size + len(header) + _ALIGN - 1) // _ALIGN * _ALIGN
    header = header + b"\x00" * (payload_start - _PREFIX.size - len(header))
    offsets = {e["name"]: payload_start + e["offset"] for e in entries}
    return FramePlan(header, payload_start, payload_start + offset, offsets, dtypes, shapes,
                     bool(checksum))


def _fail(msg: str) -> DecodeError:
    return DecodeError(f"bad array frame: {msg}")


def decode_arrays(
    buf: bytes | bytearray | memoryview,
    *,
    limits: WireLimits = DEFAULT_LIMITS,
    copy: bool = False,
    require_checksum: bool = False,
    verified: bool = False,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Decode a frame made by :func:`encode_arrays`.

    ``verified``: the caller has already checked these exact bytes against a checksum it
    trusts (e.g. a sealed manifest's crc of the whole frame); the payload checksum is then
    not computed again (its presence is still required when ``require_checksum``).

    Returns:
        ``(arrays, meta)``; arrays are read-only views over ``buf`` unless ``copy``.

    Raises:
        DecodeError: malformed frame (bad magic, sizes, dtype, JSON, limits).
        CorruptDataError: the payload checksum does not match, or a checksum was required
            and is absent.
    """
    mv = memoryview(buf).cast("B")
    total = mv.nbytes
    if total > limits.max_total_bytes:
        raise _fail(f"{total} bytes exceeds the limit of {limits.max_total_bytes}")
    if total < _PREFIX.size:
        raise _fail(f"{total} bytes is shorter than the {_PREFIX.size}-byte prefix")
    magic, flags, header_len, crc = _PREFIX.unpack_from(mv, 0)
    if magic != MAGIC:
        raise _fail(f"magic {bytes(magic)!r}, expected {MAGIC!r}")
    if flags & ~_FLAG_CHECKSUM:
        raise _fail(f"unknown flags 0x{flags:x}")
    if header_len > limits.max_header_bytes or _PREFIX.size + header_len > total:
        raise _fail(f"header length {header_len} does not fit ({total} bytes in frame)")
    payload_start = _PREFIX.size + header_len
    try:
        header = json.loads(bytes(mv[_PREFIX.size:payload_start]).rstrip(b"\x00"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(f"header is not JSON ({exc})") from exc
    if not isinstance(header, dict) or not isinstance(header.get("arrays"), list):
        raise _fail("header must be an object with an 'arrays' list")
    meta = header.get("meta", {})
    if not isinstance(meta, dict):
        raise _fail("'meta' must be an object")
    entries = header["arrays"]
    if len(entries) > limits.max_arrays:
        raise _fail(f"{len(entries)} arrays exceeds the limit of {limits.max_arrays}")
    payload = mv[payload_start:]
    if flags & _FLAG_CHECKSUM:
        if not verified and crc32c.crc32c(payload) != crc:
            raise CorruptDataError("bad array frame: payload checksum mismatch")
    elif require_checksum:
        raise CorruptDataError("bad array frame: checksum required but absent")
    arrays: dict[str, np.ndarray] = {}
    for i, entry in enumerate(entries):
        arrays_name, arr = _decode_entry(i, entry, payload, limits, copy)
        if arrays_name in arrays:
            raise _fail(f"duplicate array name {arrays_name!r}")
        arrays[arrays_name] = arr
    return arrays, meta


def _count_like(value: Any) -> bool:
    """A non-negative int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _decode_entry(
    i: int, entry: Any, payload: memoryview, limits: WireLimits, copy: bool
) -> tuple[str, np.ndarray]:
    if not isinstance(entry, dict):
        raise _fail(f"array entry {i} is not an object")
    name, dtype_str = entry.get("name"), entry.get("dtype")
    shape, offset, nbytes = entry.get("shape"), entry.get("offset"), entry.get("nbytes")
    if not isinstance(name, str):
        raise _fail(f"array entry {i} has no string name")
    if dtype_str not in _ALLOWED_DTYPES:
        raise _fail(f"array {name!r} has dtype {dtype_str!r}, not an allowed dtype")
    if (
        not isinstance(shape, list)
        or len(shape) > limits.max_ndim
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise _fail(f"array {name!r} has an invalid shape {shape!r}")
    if not _count_like(offset) or not _count_like(nbytes):
        raise _fail(f"array {name!r} has an invalid offset {offset!r} or nbytes {nbytes!r}")
    offset, nbytes = cast(int, offset), cast(int, nbytes)
    dtype = np.dtype(dtype_str)
    count = 1
    for d in shape:
        count *= d
    if count * dtype.itemsize != nbytes:
        raise _fail(
            f"array {name!r}: shape {shape} x {dtype.itemsize} bytes != nbytes {nbytes}"
        )
    if offset % dtype.itemsize or offset + nbytes > payload.nbytes:
        raise _fail(
            f"array {name!r} at offset {offset} (+{nbytes}) lies outside the "
            f"{payload.nbytes}-byte payload or is misaligned"
        )
    arr = np.frombuffer(payload, dtype=dtype, count=count, offset=offset).reshape(tuple(shape))
    if copy:
        arr = arr.copy()
    else:
        arr.flags.writeable = False
    return name, arr
