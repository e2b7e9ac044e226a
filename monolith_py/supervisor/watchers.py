"""Background watchers of the supervisor: the snapshot catalog and the roles' logs.

* :class:`SnapshotWatcher` polls the SMP group's catalog (through
  :class:`~monolith_py.snapshot.recovery.Recovery`, the same code restores use) and keeps
  the timeline of sealed snapshots: id, step, seal time, bytes, kinds of parts. Each new
  one is recorded as a ``snapshot`` event.
* :class:`LogWatcher` follows the roles' log files and turns the lines that matter
  (restores and where their parts came from, errors) into events.

Both run on daemon threads and are stopped by :meth:`close`.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from monolith_py.errors import MonolithError
from monolith_py.supervisor.events import EventLog

__all__ = ["SnapshotWatcher", "LogWatcher", "LOG_PATTERNS"]

log = logging.getLogger("monolith.supervisor")


class SnapshotWatcher:
    """Timeline of the sealed snapshots of ``job`` in the SMP group ``addresses``."""

    def __init__(self, addresses: Sequence[str], job: str, events: EventLog,
                 interval_s: float = 3.0, timeout_s: float = 3.0) -> None:
        self.addresses = tuple(addresses)
        self.job = job
        self.events = events
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._seen: dict[int, dict[str, Any]] = {}
        self.problems: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="snapshots", daemon=True)

    def start(self) -> SnapshotWatcher:
        if self.addresses:
            self._thread.start()
        return self

    def _run(self) -> None:
        from monolith_py.snapshot.recovery import Recovery
        from monolith_py.snapshot.smp import smp_clients

        clients = smp_clients(self.addresses, timeout_s=self.timeout_s)
        try:
            while not self._stop.wait(self.interval_s):
                try:
                    cat = Recovery(clients, job=self.job).catalog()
                except MonolithError as exc:  # pragma: no cover - catalog() catches per host
                    self.problems = [str(exc)]
                    continue
                self.problems = list(cat.problems)
                for man in sorted(cat.manifests.values(), key=lambda m: m.snapshot_id):
                    self._add(man)
        finally:
            for c in clients.values():
                c.close()

    def _add(self, man: Any) -> None:
        with self._lock:
            if man.snapshot_id in self._seen:
                return
            kinds = sorted({r.kind for r in man.parts.values()})
            entry = {"id": man.snapshot_id, "step": man.step,
                     "t": float(man.created_s) or time.time(),
                     "bytes": int(sum(r.size for r in man.parts.values())),
                     "parts": len(man.parts), "kinds": kinds}
            self._seen[man.snapshot_id] = entry
        self.events.record("snapshot", None,
                           f"snapshot {man.snapshot_id} sealed at step {man.step} "
                           f"({len(man.parts)} parts, {entry['bytes'] / 1e6:.1f} MB, "
                           f"{'+'.join(kinds)})", snapshot_id=man.snapshot_id, step=man.step)

    def timeline(self) -> list[dict[str, Any]]:
        with self._lock:
            return [self._seen[k] for k in sorted(self._seen)]

    def newest(self) -> dict[str, Any] | None:
        with self._lock:
            return self._seen[max(self._seen)] if self._seen else None

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)


LOG_PATTERNS: tuple[tuple[tuple[str, ...], str, re.Pattern[str]], ...] = (
    (("trainer",), "restore", re.compile(r"trainer \d+ restored snapshot \d+.*")),
    (("trainer",), "restore", re.compile(r"nothing to restore.*")),
    (("ps",), "restore", re.compile(r"restored snapshot \d+ \(step \d+\) from \w+")),
    (("ps", "trainer"), "restore", re.compile(r"[\w/]+ \w+ part of snapshot \d+: "
                                              r"(erasure-decoded|data blocks read|read from disk).*")),
    (("smp",), "restore", re.compile(r"SMP \d+ repaired after restart: \{'parts': [1-9].*")),
    ((), "error", re.compile(r"(Traceback \(most recent call last\)|monolith \w+: error: .*)")),
)
"""``(role kinds or () for all, event kind, pattern)``: log lines that become events (the
matched text is the message): restores and where their parts came from when that was not
the local copy, SMP repairs, errors."""


class LogWatcher:
    """Follow ``{role: log path}`` (paths may appear later) and record matching lines."""

    def __init__(self, paths: Callable[[], Mapping[str, str]], events: EventLog,
                 interval_s: float = 1.0, max_per_role: int = 100,
                 kinds: Callable[[str], str] = lambda role: role.partition("/")[0]) -> None:
        self._paths = paths
        self._kind = kinds
        self.events = events
        self.interval_s = interval_s
        self.max_per_role = max_per_role
        self._pos: dict[str, int] = {}
        self._count: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="logs", daemon=True)

    def start(self) -> LogWatcher:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll()

    def poll(self) -> None:
        """Read what was appended to every log since the last call."""
        for role, path in self._paths().items():
            try:
                size = os.path.getsize(path)
            except OSError:
                continue
            pos = self._pos.get(path)
            if pos is None:  # a log that existed before: read it from its start
                pos = 0
            if size <= pos:
                self._pos[path] = min(pos, size)
                continue
            with open(path, "rb") as f:
                f.seek(pos)
                chunk = f.read(min(size - pos, 4 << 20))
            end = chunk.rfind(b"\n")
            if end < 0:
                continue
            self._pos[path] = pos + end + 1
            for line in chunk[:end].decode("utf-8", "replace").splitlines():
                self._match(role, line)

    def _match(self, role: str, line: str) -> None:
        role_kind = self._kind(role)
        for kinds, kind, pat in LOG_PATTERNS:
            if kinds and role_kind not in kinds:
                continue
            m = pat.search(line)
            if m is None:
                continue
            n = self._count.get(role, 0)
            if n < self.max_per_role:
                self._count[role] = n + 1
                self.events.record(kind, role, m.group(0)[:300], source="log")
            return

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self.poll()
