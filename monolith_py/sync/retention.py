"""How long a shard keeps deletions for sync readers (a pure policy; time is passed in).

A table logs deletions until ``trim_changes(v)``; a reader at version ``v`` can follow
incrementally only while the log still covers ``v``. The publisher samples
``(time, version)`` of each table and trims to the newest version that is at least
``keep_s`` old: readers less than ``keep_s`` behind catch up incrementally, readers further
behind get a full resync (which is what they would need anyway after such a gap).

Example::

    >>> import numpy as np
    >>> trim_version(np.array([0.0, 5.0, 9.0]), np.array([3, 8, 12]), now=10.0, keep_s=4.0)
    8
    >>> trim_version(np.array([9.0]), np.array([12]), now=10.0, keep_s=4.0)
    -1
"""

from __future__ import annotations

import numpy as np

__all__ = ["trim_version"]


def trim_version(times: np.ndarray, versions: np.ndarray, now: float, keep_s: float) -> int:
    """The newest sampled version taken at least ``keep_s`` before ``now`` (``-1``: none).

    Args:
        times: sample times (seconds, any monotonic clock), ascending.
        versions: the table version at each sample (non-decreasing).
        now: current time on the same clock.
        keep_s: how long deletions are kept.
    """
    if times.shape[0] == 0:
        return -1
    i = int(np.searchsorted(times, now - keep_s, side="right"))
    return int(versions[i - 1]) if i > 0 else -1
