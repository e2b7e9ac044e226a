"""Processes of a supervised job: process groups per host, logs, start/stop/kill.

Every host (and the infrastructure, as one more group) is a **process group** led by a
small *keeper* process. The keeper watches the supervisor: if the supervisor disappears
(even by ``kill -9``) the keeper kills its whole group, so a job never leaves orphans.
Killing a host is ``killpg(SIGKILL)`` of its group plus removing its shared-memory
directory (the memory of a dead machine is gone). Processes are started with
``subprocess.Popen`` (never ``fork`` next to threads) with stdout and stderr appended to
``<run dir>/<role>.log``.

Example::

    >>> group = ProcessGroup("host0", shm_dir=None)          # doctest: +SKIP
    >>> proc = group.spawn(["sleep", "10"], "/tmp/sleep.log") # doctest: +SKIP
    >>> group.kill()                                          # doctest: +SKIP
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence

from monolith_py.errors import UnavailableError

__all__ = ["ProcessGroup", "terminate", "wait_file", "KEEPER_SOURCE"]

KEEPER_SOURCE = (
    "import os, signal, sys, time\n"
    "parent = int(sys.argv[1])\n"  # not getppid(): the parent may be gone before we run
    "signal.signal(signal.SIGTERM, signal.SIG_DFL)\n"
    "while os.getppid() == parent:\n"
    "    time.sleep(0.5)\n"
    "os.killpg(0, signal.SIGKILL)\n"
)
"""The keeper: leads the group; kills it when its parent (the supervisor) is gone."""


class ProcessGroup:
    """One simulated host (or the infrastructure): a process group led by a keeper.

    Args:
        name: for messages (``"host0"``, ``"infra"``).
        shm_dir: removed when the group is killed (the host's shared memory).
    """

    def __init__(self, name: str, shm_dir: str | None = None) -> None:
        self.name = name
        self.shm_dir = shm_dir
        self.keeper: subprocess.Popen[bytes] | None = None
        self.members: list[subprocess.Popen[bytes]] = []

    def _ensure_keeper(self) -> int:
        if self.keeper is None or self.keeper.poll() is not None:
            self.keeper = subprocess.Popen(
                [sys.executable, "-S", "-c", KEEPER_SOURCE, str(os.getpid())], process_group=0,
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return self.keeper.pid

    @property
    def pgid(self) -> int | None:
        return None if self.keeper is None else self.keeper.pid

    def spawn(self, argv: Sequence[str], log_path: str, env: Mapping[str, str] | None = None,
              cwd: str | None = None) -> subprocess.Popen[bytes]:
        """Start ``argv`` in this group, output appended to ``log_path``."""
        pgid = self._ensure_keeper()
        with open(log_path, "ab") as log:
            log.write(f"---- {time.strftime('%H:%M:%S')} start: {' '.join(argv)}\n".encode())
            log.flush()
            proc = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, cwd=cwd,
                                    env={**os.environ, **(env or {})}, process_group=pgid)
        self.members = [p for p in self.members if p.poll() is None] + [proc]
        return proc

    def kill(self) -> None:
        """The host dies: SIGKILL to the whole group; its shared memory is gone."""
        pgid = self.pgid
        if pgid is not None:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for p in [*self.members, self.keeper]:
            if p is not None:
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL is final
                    pass
        self.keeper = None
        self.members = []
        if self.shm_dir:
            shutil.rmtree(self.shm_dir, ignore_errors=True)

    def close(self) -> None:
        """Stop the keeper (call after every member has been stopped)."""
        if self.keeper is not None and self.keeper.poll() is None:
            self.keeper.kill()
            self.keeper.wait(timeout=30)
        self.keeper = None
        if self.shm_dir:
            shutil.rmtree(self.shm_dir, ignore_errors=True)


def terminate(procs: Sequence[subprocess.Popen[bytes]], grace_s: float) -> None:
    """SIGTERM each running process, SIGKILL what is left after ``grace_s``; reap all."""
    for p in procs:
        if p.poll() is None:
            try:
                p.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.05, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=30)


def wait_file(path: str, proc: subprocess.Popen[bytes] | None, timeout_s: float,
              stop: object | None = None) -> str:
    """Wait for ``path`` (a ready file) and return its stripped content; raise
    :class:`UnavailableError` when ``proc`` exits first or the time is up. ``stop``: a
    ``threading.Event`` that aborts the wait."""
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(path):
        if proc is not None and proc.poll() is not None:
            raise UnavailableError(f"process exited with {proc.returncode} before "
                                   f"writing {path}")
        if stop is not None and getattr(stop, "is_set")():
            raise UnavailableError(f"stopped while waiting for {path}")
        if time.monotonic() > deadline:
            raise UnavailableError(f"{path} did not appear within {timeout_s:.0f} s")
        time.sleep(0.1)
    with open(path) as f:
        return f.read().strip()
