"""Heartbeats: a role's main loop proves it is making progress; the supervisor checks.

**Role side.** :class:`Heartbeat` is called from the role's *main loop* (not from a
timer thread), at least once per ``interval`` even when the loop has nothing to do (a
trainer waiting for data beats from its wait loop). Every call increments
``monolith_heartbeat_beats_total{role}`` and sets
``monolith_heartbeat_timestamp_seconds{role}``; :meth:`Heartbeat.step` also accounts one
unit of work (``monolith_steps_total``, ``monolith_step_seconds_total`` and the last
step's ``monolith_step_last_seconds``), from which the supervisor derives the mean step
time per scrape interval (straggler detection). A loop that hangs stops the counter even
though the process -- and its ``/metrics`` thread -- live on.

**Supervisor side.** :func:`is_hung` is the pure rule: a role whose beat counter has not
moved for ``misses`` intervals is hung. Before its first beat a role is *starting* and is
judged against ``start_timeout_s`` instead (imports and restores take a while).

Example::

    >>> hb = Heartbeat("doc/0")
    >>> hb.step(0.25, examples=512)
    >>> is_hung(last_change=100.0, now=103.5, interval_s=2.0)
    False
    >>> is_hung(last_change=100.0, now=104.5, interval_s=2.0)
    True
"""

from __future__ import annotations

import time
from collections.abc import Callable

from monolith_py.errors import ConfigError
from monolith_py.observe.metrics import counter, gauge

__all__ = ["Heartbeat", "is_hung", "BEATS", "STEPS", "STEP_SECONDS", "HEARTBEAT_INTERVAL_S"]

BEATS = "monolith_heartbeat_beats_total"
"""Counter of main-loop iterations, label ``role`` (the supervisor watches it move)."""
STEPS = "monolith_steps_total"
"""Counter of units of work (training steps, RPC batches...), label ``role``."""
STEP_SECONDS = "monolith_step_seconds_total"
"""Counter of seconds spent in those steps, label ``role``."""
HEARTBEAT_INTERVAL_S = 1.0
"""How often roles beat at least (their wait loops time out at this period or less)."""


class Heartbeat:
    """The heartbeat and step-time metrics of one role (``role`` like ``"trainer/0"``).

    Thread-safe (prometheus_client metrics are); cheap enough for every loop iteration
    (a counter increment and a gauge set).
    """

    def __init__(self, role: str, clock: Callable[[], float] = time.time) -> None:
        if not role:
            raise ConfigError("Heartbeat needs a role name like 'trainer/0'")
        self.role = role
        self._clock = clock
        self._beats = counter(BEATS, "Main-loop iterations (heartbeats).", ["role"]).labels(
            role=role)
        self._at = gauge("monolith_heartbeat_timestamp_seconds",
                         "Wall time of the last heartbeat.", ["role"]).labels(role=role)
        self._steps = counter(STEPS, "Units of work done (steps).", ["role"]).labels(role=role)
        self._seconds = counter(STEP_SECONDS, "Seconds spent in steps.", ["role"]).labels(
            role=role)
        self._last = gauge("monolith_step_last_seconds", "Duration of the last step.",
                           ["role"]).labels(role=role)
        self._examples = counter("monolith_step_examples_total", "Examples processed in steps.",
                                 ["role"]).labels(role=role)

    def beat(self) -> None:
        """One main-loop iteration happened (call at least every interval)."""
        self._beats.inc()
        self._at.set(self._clock())

    def step(self, seconds: float, examples: int = 0) -> None:
        """One unit of work took ``seconds`` (also a beat)."""
        self.beat()
        self._steps.inc()
        self._seconds.inc(max(0.0, float(seconds)))
        self._last.set(float(seconds))
        if examples:
            self._examples.inc(int(examples))


def is_hung(last_change: float | None, now: float, interval_s: float, misses: int = 2, *,
            started: float | None = None, start_timeout_s: float = 300.0) -> bool:
    """Whether a role is hung.

    Args:
        last_change: when the supervisor last saw its beat counter change (``None``:
            never, the role is still starting).
        now: the current time (same clock).
        interval_s: the heartbeat interval the role promises.
        misses: intervals without progress that make it hung (the issue says 2).
        started: when the role was (re)started; with ``last_change=None`` the role is hung
            once ``start_timeout_s`` passed since then.
    """
    if interval_s <= 0 or misses < 1:
        raise ConfigError(f"need interval_s > 0 and misses >= 1, got {interval_s}, {misses}")
    if last_change is None:
        return started is not None and now - started > start_timeout_s
    return now - last_change > misses * interval_s
