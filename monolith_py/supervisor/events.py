"""The event log: every failure, restart, restore, straggler and chaos action, as JSON lines.

Each event is one JSON object per line in ``events.jsonl`` of the run directory (written
and flushed as it happens, so it survives a crash of the supervisor) and is kept in memory
(the newest ``keep``) for the status page.

Fields: ``t`` (wall time, seconds), ``elapsed`` (seconds since the log opened), ``kind``
(one of :data:`EVENT_KINDS`), ``role`` (or ``None``), ``message`` and any extra fields.

Example::

    >>> log = EventLog(None)
    >>> e = log.record("died", "ps/1", "exit status -9", exit_code=-9)
    >>> e["kind"], e["role"], e["exit_code"], log.count("died")
    ('died', 'ps/1', -9, 1)
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, TextIO

from monolith_py.errors import ConfigError

__all__ = ["EventLog", "EVENT_KINDS"]

EVENT_KINDS = (
    "started",     # a role (re)started
    "ready",       # it answered / wrote its ready file
    "exited",      # it finished (exit status 0 where that is expected)
    "died",        # it exited unexpectedly
    "hung",        # no heartbeat progress for 2 intervals: killed and restarted
    "restart",     # the recovery policy restarts it
    "recovered",   # a recovery finished
    "restore",     # a snapshot restore was requested / reported by a role
    "snapshot",    # a snapshot was sealed
    "straggler",   # step time > factor x median for k intervals
    "chaos",       # chaos killed a role or a host
    "phase",       # the pipeline moved on (draining, finishing, stopping)
    "error",       # something the supervisor could not fix
    "info",
)


class EventLog:
    """Append-only event log (thread-safe). ``path=None`` keeps events in memory only."""

    def __init__(self, path: str | None, keep: int = 2000,
                 clock: Callable[[], float] = time.time,
                 echo: Callable[[dict[str, Any]], None] | None = None) -> None:
        self._lock = threading.Lock()
        self._events: deque[dict[str, Any]] = deque(maxlen=keep)
        self._counts: dict[str, int] = {}
        self._clock = clock
        self._t0 = clock()
        self._seq = 0
        self._echo = echo
        self._file: TextIO | None = None
        if path:
            self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def record(self, kind: str, role: str | None, message: str, **extra: Any) -> dict[str, Any]:
        """Record one event and return it."""
        if kind not in EVENT_KINDS:
            raise ConfigError(f"event kind must be one of {EVENT_KINDS}, got {kind!r}")
        now = self._clock()
        with self._lock:
            self._seq += 1
            ev = {"seq": self._seq, "t": round(now, 3), "elapsed": round(now - self._t0, 2),
                  "kind": kind, "role": role, "message": message, **extra}
            self._events.append(ev)
            self._counts[kind] = self._counts.get(kind, 0) + 1
            if self._file is not None:
                self._file.write(json.dumps(ev, default=str) + "\n")
                self._file.flush()
        if self._echo is not None:
            self._echo(ev)
        return ev

    def events(self, since_seq: int = 0) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self._events if e["seq"] > since_seq]

    def count(self, kind: str) -> int:
        with self._lock:
            return self._counts.get(kind, 0)

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
