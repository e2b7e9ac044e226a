"""A fake monotonic clock for tests of policies and loops that take time as an argument.

Example::

    >>> clock = FakeClock(100.0)
    >>> clock(); clock.advance(2.5); clock()
    100.0
    102.5
"""

from __future__ import annotations

import threading

__all__ = ["FakeClock"]


class FakeClock:
    """Callable returning the current fake time (seconds); thread-safe."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = float(start)
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += float(seconds)

    def sleep(self, seconds: float) -> None:
        """Advance instead of sleeping."""
        self.advance(seconds)
