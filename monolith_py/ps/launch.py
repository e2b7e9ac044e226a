"""Start PS shards as local processes (``monolith ps``) -- for benchmarks, tests and demos.

Each shard is ``python -m monolith_py.cli ps --shard i --num-shards n --port 0`` on
loopback; the shard writes its real address to a ready file once it serves, so there is no
race for free ports. Processes are started with ``subprocess.Popen`` (never ``fork`` next
to gRPC) and always stopped: SIGTERM, then SIGKILL after a grace period.

Example::

    >>> args = ["--features", "user,item", "--dim", "8"]
    >>> with ShardProcesses(2, args) as shards:        # doctest: +SKIP
    ...     client = PSClient(shards.addresses)
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence

from monolith_py.errors import ConfigError, UnavailableError

__all__ = ["ShardProcesses"]


class ShardProcesses:
    """``num_shards`` local ``monolith ps`` processes.

    Args:
        num_shards: how many shards.
        args: extra ``monolith ps`` arguments (``--config``, ``--features``, ``--set``...).
        start_timeout_s: how long to wait for every shard to serve.
        env: extra environment variables.
        log_dir: where each shard's output goes (default: a temporary directory, removed
            on :meth:`stop`).
    """

    def __init__(self, num_shards: int, args: Sequence[str] = (), *,
                 start_timeout_s: float = 120.0, env: Mapping[str, str] | None = None,
                 log_dir: str | None = None, host: str = "127.0.0.1") -> None:
        if num_shards < 1:
            raise ConfigError(f"num_shards must be >= 1, got {num_shards}")
        self.num_shards = int(num_shards)
        self.args = list(args)
        self.start_timeout_s = float(start_timeout_s)
        self.env = {**os.environ, **(env or {})}
        self._own_dir = log_dir is None
        self.log_dir = log_dir or tempfile.mkdtemp(prefix="monolith-ps-")
        self.host = host
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * self.num_shards
        self.addresses: list[str] = [""] * self.num_shards

    def _ready(self, i: int) -> str:
        return os.path.join(self.log_dir, f"shard{i}.addr")

    def log_path(self, i: int) -> str:
        return os.path.join(self.log_dir, f"shard{i}.log")

    def log_tail(self, i: int, chars: int = 3000) -> str:
        try:
            with open(self.log_path(i), "rb") as f:
                return f.read().decode("utf-8", "replace")[-chars:]
        except OSError:
            return ""

    def start_shard(self, i: int, port: int = 0) -> str:
        """(Re)start shard ``i`` on ``port`` (0: a free one) and wait until it serves;
        returns its address."""
        self._spawn(i, port)
        self._wait(i)
        return self.addresses[i]

    def start(self) -> ShardProcesses:
        """Start every shard (concurrently) and wait until all serve."""
        try:
            for i in range(self.num_shards):  # launch all, then wait: imports overlap
                self._spawn(i, 0)
            for i in range(self.num_shards):
                self._wait(i)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, i: int, port: int) -> None:
        ready = self._ready(i)
        if os.path.exists(ready):
            os.remove(ready)
        cmd = [sys.executable, "-m", "monolith_py.cli", "ps", "--shard", str(i),
               "--num-shards", str(self.num_shards), "--port", str(port), "--host", self.host,
               "--ready-file", ready, *self.args]
        with open(self.log_path(i), "ab") as log:
            self.procs[i] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                             env=self.env, stdin=subprocess.DEVNULL)

    def _wait(self, i: int) -> None:
        ready, proc = self._ready(i), self.procs[i]
        assert proc is not None
        deadline = time.monotonic() + self.start_timeout_s
        while not os.path.exists(ready):
            if proc.poll() is not None:
                raise UnavailableError(f"PS shard {i} exited with {proc.returncode} before "
                                       f"serving:\n{self.log_tail(i)}")
            if time.monotonic() > deadline:
                raise UnavailableError(f"PS shard {i} did not serve within "
                                       f"{self.start_timeout_s:.0f} s:\n{self.log_tail(i)}")
            time.sleep(0.05)
        with open(ready) as f:
            self.addresses[i] = f.read().strip()

    def kill(self, i: int, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to shard ``i`` (fault injection) and, for SIGKILL, reap it."""
        proc = self.procs[i]
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)
            if sig == signal.SIGKILL:
                proc.wait(timeout=30)

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM every shard, SIGKILL those still running after ``grace_s``."""
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in self.procs:
            if proc is None:
                continue
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
        if self._own_dir:
            shutil.rmtree(self.log_dir, ignore_errors=True)

    def __enter__(self) -> ShardProcesses:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
