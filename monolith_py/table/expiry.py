"""Expiry policy: a pure function of the last update time, the event time and the TTL."""

from __future__ import annotations

import numpy as np

__all__ = ["expired"]


def expired(last_update: np.ndarray, now: int, ttl: int | None) -> np.ndarray:
    """Bool mask: rows whose last update is more than ``ttl`` seconds before ``now``.

    Times are event-time seconds (never the wall clock), so a replay of old data expires
    exactly what the original run expired. ``ttl=None`` never expires anything.

    Example::

        >>> expired(np.array([100, 150, 200]), now=250, ttl=100).tolist()
        [True, False, False]
    """
    last = np.asarray(last_update, dtype=np.int64)
    if ttl is None:
        return np.zeros(last.shape, dtype=np.bool_)
    return (np.int64(now) - last) > np.int64(ttl)
