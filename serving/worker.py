"""``ServingWorker``: store + shard subscribers + micro-batcher + HTTP server, assembled.

Used by ``monolith serve`` (HTTP server in the main thread) and in-process by tests and
``monolith up`` (HTTP server in a background thread, port picked at start)::

    worker = ServingWorker(ServeConfig(ps=("127.0.0.1:50051",), port=0)).start()
    worker.wait_ready(60)
    ... POST http://127.0.0.1:{worker.port}/v1/predict ...
    worker.stop()
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from monolith_py.errors import ConfigError, DeadlineExceededError
from serving.schema import ApiLimits

__all__ = ["ServeConfig", "ServingWorker"]

log = logging.getLogger("monolith.serving")


@dataclass(frozen=True)
class ServeConfig:
    """Settings of a serving worker.

    Args:
        ps: ``host:port`` of each PS shard's gRPC server, in shard order (shard 0 also
            serves the dense model).
        host, port: where the HTTP API listens (127.0.0.1 unless told otherwise; port 0
            picks a free one).
        sync_interval_s: how often shards send news.
        fp16: float16 rows on the wire and in memory.
        limits: request limits (:class:`~serving.schema.ApiLimits`).
        max_batch_examples: most examples in one model call.
        max_wait_ms: extra wait for more requests before a model call (0: none).
        torch_threads: intra-op threads of the model (small: many small calls).
        batching: ``"thread"`` (the model runs on a batcher thread; the event loop keeps
            parsing requests meanwhile) or ``"inline"`` (on the event loop: no thread
            handoffs).
        request_timeout_s: a predict waits at most this long for the model.
        name: worker name in the shards' logs.
    """

    ps: tuple[str, ...]
    host: str = "127.0.0.1"
    port: int = 8080
    sync_interval_s: float = 1.0
    fp16: bool = False
    limits: ApiLimits = field(default_factory=ApiLimits)
    max_batch_examples: int = 2048
    max_wait_ms: float = 0.0
    torch_threads: int = 1
    batching: str = "thread"
    request_timeout_s: float = 10.0
    name: str = ""

    def __post_init__(self) -> None:
        ps = tuple(self.ps)
        if not ps or not all(isinstance(a, str) and ":" in a for a in ps):
            raise ConfigError(f"ps must list host:port of every shard, got {self.ps!r} "
                              "(e.g. --ps 127.0.0.1:50051,127.0.0.1:50052)")
        object.__setattr__(self, "ps", ps)
        if not 0 <= int(self.port) <= 65535:
            raise ConfigError(f"port must be in [0, 65535], got {self.port}")
        if not 0.01 <= self.sync_interval_s <= 600:
            raise ConfigError(f"sync_interval_s must be in [0.01, 600], got "
                              f"{self.sync_interval_s}")
        if self.max_batch_examples < 1 or self.max_wait_ms < 0 or self.torch_threads < 1:
            raise ConfigError("max_batch_examples and torch_threads must be >= 1 and "
                              "max_wait_ms >= 0")
        if self.batching not in ("thread", "inline"):
            raise ConfigError(f"batching must be 'thread' or 'inline', got {self.batching!r}")
        if not self.request_timeout_s > 0:
            raise ConfigError(f"request_timeout_s must be > 0, got {self.request_timeout_s}")


class ServingWorker:
    """See the module doc. ``cold_start`` (a
    :class:`~monolith_py.sync.protocol.ColdStartSource`) loads a snapshot before the
    subscribers start; shards it does not cover are fully resynced from the PS."""

    def __init__(self, config: ServeConfig, cold_start: Any = None) -> None:
        import torch

        from monolith_py.sync.subscriber import ShardSubscriber
        from serving.app import create_app
        from serving.batcher import MicroBatcher
        from serving.store import ServingStore

        torch.set_num_threads(config.torch_threads)
        self.config = config
        self.store = ServingStore(len(config.ps), fp16=config.fp16,
                                  torch_threads=config.torch_threads)
        self.batcher: MicroBatcher[Any, Any] = MicroBatcher(
            self.store.predict, size=lambda p: p.n, max_examples=config.max_batch_examples,
            max_wait_s=config.max_wait_ms / 1000.0, inline=config.batching == "inline",
            thread_init=lambda: torch.set_num_threads(config.torch_threads))
        self.app = create_app(self.store, self.batcher, config.limits,
                              request_timeout_s=config.request_timeout_s)
        self._cold = cold_start
        self.subscribers = [
            ShardSubscriber(addr, i, self.store, interval_s=config.sync_interval_s,
                            fp16=config.fp16, worker=config.name or socket.gethostname())
            for i, addr in enumerate(config.ps)]
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self.port = int(config.port)

    def _bind(self) -> socket.socket:
        fam = socket.AF_INET6 if ":" in self.config.host else socket.AF_INET
        # proto IPPROTO_TCP matters: asyncio sets TCP_NODELAY on accepted sockets only
        # when the listening socket says TCP (else every response waits ~40 ms for the
        # client's delayed ACK, Nagle's algorithm holding back the body after the headers)
        sock = socket.socket(fam, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.config.host, int(self.config.port)))
        sock.listen(2048)
        sock.set_inheritable(True)
        self.port = int(sock.getsockname()[1])
        return sock

    def _uvicorn(self) -> Any:
        import uvicorn

        cfg = uvicorn.Config(self.app, log_level="warning", lifespan="off", access_log=False,
                             timeout_keep_alive=30, backlog=2048)
        return uvicorn.Server(cfg)

    def start_sync(self) -> None:
        """Cold start (if any), then follow every shard."""
        if self._cold is not None:
            loaded = self._cold.load(self.store, len(self.config.ps))
            log.info("cold start loaded shard(s) %s", sorted(loaded))
        for s in self.subscribers:
            s.start()

    def start(self) -> ServingWorker:
        """Start syncing and serve HTTP from a background thread (returns at once)."""
        self.start_sync()
        self._sock = self._bind()
        self._server = self._uvicorn()
        self._thread = threading.Thread(target=self._server.run,
                                        kwargs={"sockets": [self._sock]},
                                        name="serving-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started and self._thread.is_alive():
            if time.monotonic() > deadline:
                raise DeadlineExceededError("the HTTP server did not start within 30 s")
            time.sleep(0.01)
        return self

    def serve_forever(self) -> None:
        """Start, then serve until SIGINT/SIGTERM; stop cleanly (exit code 0)."""
        import signal

        done = threading.Event()
        previous = {sig: signal.signal(sig, lambda *_: done.set())
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.start()
            log.info("serving on http://%s:%d (shards: %s)", self.config.host, self.port,
                     ",".join(self.config.ps))
            while not done.wait(0.5):
                if self._thread is not None and not self._thread.is_alive():
                    break  # the HTTP server died: stop and let the exit code say so
        finally:
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def wait_ready(self, timeout: float) -> bool:
        """Poll until a model is loaded and every shard synced (or ``timeout``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.store.ready:
                return True
            time.sleep(0.02)
        return self.store.ready

    def stop(self) -> None:
        """Stop HTTP, the subscribers and the batcher (idempotent)."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(15)
            self._thread = None
        for s in self.subscribers:
            s.stop()
        self.batcher.close()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
