"""Hosts on one machine: each "host" is a process group with its own SMP.

A :class:`LocalHost` starts a keeper process (``sleep``) as the leader of a new process
group; every process of the host (its SMP, PS shards, trainers) joins that group, so
:meth:`LocalHost.kill` (``os.killpg(pgid, SIGKILL)``) kills the whole host at once, like a
machine losing power — and removes the host's shared-memory directory, because the
memory of a dead machine is gone too. Processes are started with ``subprocess.Popen``
(never ``fork`` next to gRPC) and every one is stopped by :meth:`LocalCluster.stop`.

Example::

    >>> with LocalCluster(3, job="demo", k=2, m=3) as cluster:       # doctest: +SKIP
    ...     cluster.smp_addresses
    ...     cluster.hosts[1].kill(); cluster.start_smp(1)
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence

from monolith_py.errors import UnavailableError

__all__ = ["free_port", "LocalHost", "LocalCluster", "wait_file"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_file(path: str, proc: subprocess.Popen[bytes] | None, timeout_s: float,
              log_path: str | None = None) -> str:
    """Wait for ``path`` to exist (a ready file); fail early if ``proc`` exits."""
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(path):
        if proc is not None and proc.poll() is not None:
            raise UnavailableError(f"process exited with {proc.returncode} before {path} "
                                   f"appeared:\n{_tail(log_path)}")
        if time.monotonic() > deadline:
            raise UnavailableError(f"{path} did not appear within {timeout_s:.0f} s:\n"
                                   f"{_tail(log_path)}")
        time.sleep(0.05)
    with open(path) as f:
        return f.read().strip()


def _tail(path: str | None, chars: int = 3000) -> str:
    if not path:
        return ""
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace")[-chars:]
    except OSError:
        return ""


class LocalHost:
    """One simulated host: a process group led by a keeper process."""

    def __init__(self, host_id: int, workdir: str, shm_dir: str) -> None:
        self.host_id = host_id
        self.workdir = workdir
        self.shm_dir = shm_dir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.keeper: subprocess.Popen[bytes] | None = None
        self._start_keeper()

    def _start_keeper(self) -> None:
        self.keeper = subprocess.Popen(["sleep", "100000"], process_group=0,
                                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)

    @property
    def pgid(self) -> int:
        assert self.keeper is not None
        return self.keeper.pid

    def log_path(self, name: str) -> str:
        return os.path.join(self.workdir, f"h{self.host_id}-{name}.log")

    def spawn(self, name: str, cmd: Sequence[str], env: Mapping[str, str] | None = None
              ) -> subprocess.Popen[bytes]:
        """Start ``cmd`` as process ``name`` of this host (in its process group)."""
        if self.keeper is None or self.keeper.poll() is not None:
            self._start_keeper()
        old = self.procs.get(name)
        if old is not None and old.poll() is None:
            raise UnavailableError(f"host {self.host_id}: {name} is still running")
        with open(self.log_path(name), "ab") as log:
            proc = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})},
                                    process_group=self.pgid)
        self.procs[name] = proc
        return proc

    def kill_process(self, name: str, sig: int = signal.SIGKILL) -> None:
        """``kill -9`` one process of the host (and reap it)."""
        proc = self.procs.get(name)
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)
            proc.wait(timeout=60)

    def kill(self) -> None:
        """The host dies: SIGKILL to its whole process group, its memory is gone."""
        try:
            os.killpg(self.pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for proc in [*self.procs.values(), self.keeper]:
            if proc is not None:
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:  # pragma: no cover
                    proc.kill()
        self.keeper = None
        shutil.rmtree(self.shm_dir, ignore_errors=True)

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM every process of the host, SIGKILL what is left after ``grace_s``."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
        if self.keeper is not None and self.keeper.poll() is None:
            self.keeper.kill()
            self.keeper.wait(timeout=30)
        self.keeper = None
        shutil.rmtree(self.shm_dir, ignore_errors=True)


class LocalCluster:
    """``num_hosts`` hosts, each with an SMP (``monolith smp``) on a fixed free port.

    Args:
        num_hosts, k, m, keep, full_every: the SMP group's settings.
        job: job name.
        workdir: logs and ready files (default: a temporary directory, removed on stop).
        smp_env: extra environment of every SMP (e.g. a fault plan), or a function of the
            host index returning it.
    """

    def __init__(self, num_hosts: int, *, job: str = "test", k: int = 2, m: int = 3,
                 keep: int = 2, full_every: int = 0, workdir: str | None = None,
                 smp_env: Mapping[str, str] | Callable[[int], Mapping[str, str]] | None = None,
                 start_timeout_s: float = 120.0,
                 place_timeout_s: float = 10.0, nice: int = 0, keep_free_mb: int = 1024
                 ) -> None:
        self.job = job
        self.k, self.m, self.keep, self.full_every = k, m, keep, full_every
        self._own = workdir is None
        self.workdir = workdir or tempfile.mkdtemp(prefix="monolith-cluster-")
        os.makedirs(self.workdir, exist_ok=True)
        self.shm_root = tempfile.mkdtemp(prefix=f"monolith-{job}-", dir="/dev/shm"
                                         if os.path.isdir("/dev/shm") else None)
        self.smp_env = smp_env if callable(smp_env) else dict(smp_env or {})
        self.start_timeout_s = start_timeout_s
        self.place_timeout_s = place_timeout_s
        self.nice = int(nice)
        self.keep_free_mb = int(keep_free_mb)
        self.smp_ports = [free_port() for _ in range(num_hosts)]
        self.hosts = [LocalHost(h, self.workdir, os.path.join(self.shm_root, f"h{h}"))
                      for h in range(num_hosts)]

    @property
    def smp_addresses(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.smp_ports]

    def _ready(self, name: str, host: int) -> str:
        return os.path.join(self.workdir, f"h{host}-{name}.ready")

    def smp_command(self, host: int) -> list[str]:
        return [sys.executable, "-m", "monolith_py.cli", "smp", "--job", self.job,
                "--host-id", str(host), "--port", str(self.smp_ports[host]),
                "--peers", ",".join(self.smp_addresses), "--k", str(self.k), "--m", str(self.m),
                "--keep", str(self.keep), "--full-every", str(self.full_every),
                "--shm-dir", self.hosts[host].shm_dir, "--nice", str(self.nice), "--keep-free-mb", str(self.keep_free_mb),
                "--place-timeout-s", str(self.place_timeout_s),
                "--ready-file", self._ready("smp", host)]

    def start_smp(self, host: int, env: Mapping[str, str] | None = None, wait: bool = True,
                  extra: Sequence[str] = ()) -> subprocess.Popen[bytes]:
        ready = self._ready("smp", host)
        if os.path.exists(ready):
            os.remove(ready)
        base = self.smp_env(host) if callable(self.smp_env) else self.smp_env
        proc = self.hosts[host].spawn("smp", [*self.smp_command(host), *extra],
                                      {**base, **(env or {})})
        if wait:
            wait_file(ready, proc, self.start_timeout_s, self.hosts[host].log_path("smp"))
        return proc

    def start(self) -> LocalCluster:
        try:
            for h in range(len(self.hosts)):
                self.start_smp(h, wait=False)
            for h in range(len(self.hosts)):
                wait_file(self._ready("smp", h), self.hosts[h].procs["smp"],
                          self.start_timeout_s, self.hosts[h].log_path("smp"))
        except BaseException:
            self.stop()
            raise
        return self

    def spawn(self, host: int, name: str, cmd: Sequence[str], *, ready: bool = False,
              env: Mapping[str, str] | None = None) -> tuple[subprocess.Popen[bytes], str | None]:
        """Start a process on ``host``; with ``ready`` append ``--ready-file`` and wait for
        it (returns its content)."""
        cmd = list(cmd)
        path = self._ready(name, host)
        if ready:
            if os.path.exists(path):
                os.remove(path)
            cmd += ["--ready-file", path]
        proc = self.hosts[host].spawn(name, cmd, env)
        if not ready:
            return proc, None
        return proc, wait_file(path, proc, self.start_timeout_s, self.hosts[host].log_path(name))

    def stop(self) -> None:
        for h in self.hosts:
            h.stop()
        shutil.rmtree(self.shm_root, ignore_errors=True)
        if self._own:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
