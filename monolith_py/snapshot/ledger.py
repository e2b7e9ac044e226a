"""Exactly-once accounting: count, sum (mod 2^64) and xor of the ids of trained examples.

The ledger lives in the trainer's snapshot part, in the same cut as the Kafka offsets.
After any number of crash/restore cycles it must equal :meth:`ExactlyOnceLedger.of` the ids
in the log up to the offsets: an example trained twice changes the count and the sum, an
example lost changes all three (the xor alone would miss a double).

Example::

    >>> led = ExactlyOnceLedger()
    >>> led.update([5, 7]); led.update([-1])
    >>> led == ExactlyOnceLedger.of([7, -1, 5])
    True
    >>> led.state_dict()["count"]
    3
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from monolith_py.errors import InvalidInputError

__all__ = ["ExactlyOnceLedger"]

_MASK = (1 << 64) - 1


def _as_u64(ids: Any) -> np.ndarray:
    if hasattr(ids, "detach"):
        ids = ids.detach().cpu().numpy()
    arr = np.asarray(ids)
    if arr.size == 0:
        return np.zeros(0, dtype=np.uint64)
    if arr.dtype.kind not in "iu":
        raise InvalidInputError(f"example ids must be integers, got {arr.dtype}")
    return np.ascontiguousarray(arr.reshape(-1).astype(np.int64, copy=False)).view(np.uint64)


@dataclass
class ExactlyOnceLedger:
    """``count``, ``sum`` (mod 2^64) and ``xor`` of the trained example ids (as uint64)."""

    count: int = 0
    sum: int = 0
    xor: int = 0

    def update(self, ids: Any) -> None:
        """Account for the examples ``ids`` (int64 ``[B]``; numpy, torch or a list)."""
        u = _as_u64(ids)
        if not u.shape[0]:
            return
        self.count += int(u.shape[0])
        self.sum = (self.sum + int(np.add.reduce(u, dtype=np.uint64))) & _MASK
        self.xor ^= int(np.bitwise_xor.reduce(u))

    @classmethod
    def of(cls, ids: Any) -> ExactlyOnceLedger:
        led = cls()
        led.update(ids)
        return led

    def state_dict(self) -> dict[str, int]:
        return {"count": self.count, "sum": self.sum, "xor": self.xor}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        vals = {}
        for k in ("count", "sum", "xor"):
            v = state.get(k)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= int(v) <= _MASK:
                raise InvalidInputError(f"ledger {k!r} must be an int in [0, 2^64), got {v!r}")
            vals[k] = int(v)
        self.count, self.sum, self.xor = vals["count"], vals["sum"], vals["xor"]
