"""Block chunks on the wire: one chunk of one erasure-coded block as a wire frame.

A block travels from its part's home SMP to the SMP that keeps it in chunks (messages stay
under the gRPC limit); each chunk is a wire frame whose payload crc32c covers the chunk, and
the last chunk carries the crc32c of the whole block, checked by the receiver before it
keeps the block.

Example::

    >>> frame = block_frame(("ps/0", 3, "inc", 1), 0, b"abc", block_bytes=3, part_size=5,
    ...                     final=True, block_crc=7)
    >>> decode_block_frame(frame)[0]
    ('ps/0', 3, 'inc', 1)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from monolith_py.errors import DecodeError, InvalidInputError
from monolith_py.snapshot.manifest import check_participant
from monolith_py.wire import decode_arrays, encode_arrays

__all__ = ["BlockKey", "block_frame", "decode_block_frame"]

BlockKey = tuple[str, int, str, int]
"""``(participant, snapshot_id, kind, block index)``."""


def block_frame(key: BlockKey, offset: int, data: Any, *, block_bytes: int, part_size: int,
                final: bool, block_crc: int) -> bytes:
    """One chunk of a block as a wire frame (the payload crc covers the chunk)."""
    p, sid, kind, idx = key
    return encode_arrays({"data": np.frombuffer(data, dtype=np.uint8)},
                         {"participant": p, "snapshot_id": sid, "kind": kind, "index": idx,
                          "offset": offset, "block_bytes": block_bytes, "part_size": part_size,
                          "final": final, "block_crc": block_crc})


def decode_block_frame(buf: Any) -> tuple[BlockKey, dict[str, Any], np.ndarray]:
    """Validate a chunk frame: ``(key, meta, data)``; raises :class:`DecodeError`."""
    arrays, meta = decode_arrays(buf, require_checksum=True)
    data = arrays.get("data")
    if set(arrays) != {"data"} or data is None or data.dtype != np.uint8 or data.ndim != 1:
        raise DecodeError("bad block chunk: expected one uint8 array 'data'")
    try:
        key = (check_participant(meta["participant"]), int(meta["snapshot_id"]),
               str(meta["kind"]), int(meta["index"]))
        ints = [int(meta[f]) for f in ("offset", "block_bytes", "part_size", "block_crc")]
    except (KeyError, TypeError, ValueError, InvalidInputError) as exc:
        raise DecodeError(f"bad block chunk metadata: {exc}") from exc
    if key[2] not in ("full", "inc") or key[1] < 0 or not 0 <= key[3] < 256:
        raise DecodeError(f"bad block chunk key {key}")
    off, bb, _, _ = ints
    if off < 0 or bb < 1 or off + data.shape[0] > bb:
        raise DecodeError(f"chunk [{off}, +{data.shape[0]}) outside a {bb}-byte block")
    return key, meta, data
