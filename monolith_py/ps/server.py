"""``PSServer``: one :class:`~monolith_py.ps.PSShard` served over gRPC.

Service ``monolith.ps.PSShard`` with unary methods ``Pull``, ``Push``, ``Evict``,
``Stats`` and ``Health`` (message layout in :mod:`monolith_py.ps._protocol`); bodies are
raw bytes holding array frames, registered with a generic handler (no protobuf code
generation, no protobuf decoding of arrays).

Every request is validated before it reaches the shard: frame limits and checksum
(:func:`monolith_py.wire.decode_arrays`), table names, dtypes, shapes, finiteness and key
ownership. A bad request is answered with ``INVALID_ARGUMENT``; a request over the message
size limit (rejected by gRPC itself) or one whose answer would exceed it with
``RESOURCE_EXHAUSTED``; the server counts it and keeps serving.

Other services on the same port (train -> serve sync, snapshots) are added with
``extra_handlers``: any ``grpc.GenericRpcHandler``, typically built with
``grpc.method_handlers_generic_handler("monolith.sync.Deltas", {...})``. Handlers run on
the server's thread pool; those touching ``shard.tables`` hold ``shard.lock``.

Example::

    >>> from monolith_py.table import TableConfig
    >>> shard = PSShard(0, 1, [TableConfig("item", dim=8)])        # doctest: +SKIP
    >>> with PSServer(shard, port=0) as server:                    # doctest: +SKIP
    ...     client = PSClient([server.address])
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent import futures
from typing import Any

import grpc

from monolith_py.errors import ConfigError, DecodeError, InvalidInputError
from monolith_py.observe.metrics import counter, histogram
from monolith_py.ps import _protocol as proto
from monolith_py.ps._memory import retain_freed_memory
from monolith_py.ps.shard import PSShard

__all__ = ["PSServer", "channel_options"]

log = logging.getLogger("monolith.ps.server")

_PUSH_MEMORY = 1 << 16  # (client, seq) pairs remembered for idempotent retries


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """gRPC options shared by the server and client: explicit message size limits and a
    short reconnect backoff (a restarted shard is found again within a second)."""
    return [
        ("grpc.max_send_message_length", int(max_message_bytes)),
        ("grpc.max_receive_message_length", int(max_message_bytes)),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
        ("grpc.so_reuseport", 0),
    ]


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class PSServer:
    """Serve ``shard`` on ``host:port`` (port 0: a free one, see :attr:`port`).

    Args:
        shard: the shard to serve.
        port, host: where to listen (loopback by default).
        max_message_bytes: largest request and response (both directions are set
            explicitly on the gRPC server; clients split their messages under it).
        max_workers: handler threads.
        extra_handlers: more ``grpc.GenericRpcHandler``s served on the same port.
        require_checksum: reject frames without a payload checksum.
    """

    def __init__(self, shard: PSShard, port: int = 0, host: str = "127.0.0.1", *,
                 max_message_bytes: int = proto.DEFAULT_MAX_MESSAGE_BYTES,
                 max_workers: int = 4,
                 extra_handlers: Sequence[grpc.GenericRpcHandler] = (),
                 require_checksum: bool = True) -> None:
        if not isinstance(shard, PSShard):
            raise ConfigError(f"shard must be a PSShard, got {type(shard).__name__}")
        if not 1 << 16 <= max_message_bytes <= 1 << 30:
            raise ConfigError(
                f"max_message_bytes must be in [64 KiB, 1 GiB], got {max_message_bytes}")
        if max_workers < 1:
            raise ConfigError(f"max_workers must be >= 1, got {max_workers}")
        retain_freed_memory()  # big per-request buffers: reuse, no page faults
        self.shard = shard
        self.host = host
        self.max_message_bytes = int(max_message_bytes)
        self._limits = proto.limits_for(self.max_message_bytes)
        self._checksum = bool(require_checksum)
        self._pushed: OrderedDict[tuple[str, int], int] = OrderedDict()
        self._push_lock = threading.Lock()
        self._label = str(shard.shard_id)
        self._latency = histogram("monolith_ps_server_rpc_seconds",
                                  "PS shard RPC handling time.", ["shard", "method"])
        self._errors = counter("monolith_ps_server_rejected_total",
                               "PS shard RPCs answered with an error.",
                               ["shard", "method", "code"])
        self._keys = counter("monolith_ps_server_keys_total",
                             "Keys pulled/pushed through a PS shard.", ["shard", "method"])
        handlers = {
            proto.PULL: self._pull, proto.PUSH: self._push, proto.EVICT: self._evict,
            proto.STATS: self._stats, proto.HEALTH: self._health,
        }
        generic = grpc.method_handlers_generic_handler(proto.SERVICE, {
            name: grpc.unary_unary_rpc_method_handler(self._wrap(name, fn))
            for name, fn in handlers.items()
        })
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers,
                                       thread_name_prefix=f"ps{shard.shard_id}"),
            handlers=[generic, *extra_handlers],
            options=channel_options(self.max_message_bytes),
        )
        self.port = self._server.add_insecure_port(f"{host}:{int(port)}")
        if self.port == 0:
            raise ConfigError(f"cannot listen on {host}:{port} (in use or not allowed)")
        self._started = False

    @property
    def address(self) -> str:
        """``host:port`` clients connect to."""
        return f"{self.host}:{self.port}"

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> PSServer:
        self._server.start()
        self._started = True
        log.info("PS shard %d/%d serving on %s (tables %s)", self.shard.shard_id,
                 self.shard.num_shards, self.address, sorted(self.shard.dims))
        return self

    def stop(self, grace: float | None = 1.0) -> None:
        """Stop serving; in-flight calls get ``grace`` seconds to finish."""
        if self._started:
            self._server.stop(grace).wait()
            self._started = False

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        """Block until stopped (or ``timeout``); True when stopped."""
        return bool(self._server.wait_for_termination(timeout))

    def __enter__(self) -> PSServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- handlers -----------------------------------------------------------------------------

    def _wrap(self, method: str, fn: Callable[[bytes], bytes]
              ) -> Callable[[bytes, grpc.ServicerContext], bytes]:
        latency = self._latency.labels(shard=self._label, method=method)

        def handle(request: bytes, context: grpc.ServicerContext) -> bytes:
            t0 = time.perf_counter()
            try:
                return fn(request)
            except (DecodeError, InvalidInputError) as exc:
                self._reject(context, method, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            except _Abort as exc:
                self._reject(context, method, exc.code, str(exc))
            except Exception as exc:  # a bug must not take the shard down
                log.exception("PS shard %s: %s failed", self._label, method)
                self._reject(context, method, grpc.StatusCode.INTERNAL,
                             f"{type(exc).__name__}: {exc}")
            finally:
                latency.observe(time.perf_counter() - t0)
            return b""  # pragma: no cover - _reject raises

        return handle

    def _reject(self, context: grpc.ServicerContext, method: str, code: grpc.StatusCode,
                message: str) -> None:
        self._errors.labels(shard=self._label, method=method, code=code.name).inc()
        log.warning("PS shard %s: %s rejected (%s): %s", self._label, method, code.name,
                    message[:500])
        context.abort(code, f"PS shard {self._label}: {message}"[:4000])

    def _pull(self, request: bytes) -> bytes:
        keys, train = proto.decode_pull(request, self._limits, self._checksum)
        dims = self.shard.dims
        need = proto.HEADER_ALLOWANCE
        for t, k in keys.items():
            if t not in dims:
                raise InvalidInputError(f"unknown table {t!r}; this shard holds {sorted(dims)}")
            need += int(k.shape[0]) * dims[t] * 4 if k.ndim == 1 else 0
        if need > self.max_message_bytes:
            raise _Abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                         f"the answer would take about {need} bytes, over the "
                         f"{self.max_message_bytes}-byte message limit; split the request")
        rows = self.shard.pull_many(keys, train)
        self._keys.labels(shard=self._label, method="pull").inc(
            sum(int(k.shape[0]) for k in keys.values()))
        return proto.encode_rows(list(keys), rows, self._checksum)

    def _push(self, request: bytes) -> bytes:
        grads, now, client, seq = proto.decode_push(request, self._limits, self._checksum)
        ident = (client, seq)
        with self._push_lock:  # one push at a time: check, apply and remember atomically
            done = self._pushed.get(ident)
            if done is not None:
                return proto.encode_meta({"applied": done, "duplicate": True})
            applied = self.shard.push_many(grads, now)
            self._pushed[ident] = applied
            while len(self._pushed) > _PUSH_MEMORY:
                self._pushed.popitem(last=False)
        self._keys.labels(shard=self._label, method="push").inc(applied)
        return proto.encode_meta({"applied": applied, "duplicate": False})

    def _evict(self, request: bytes) -> bytes:
        now = proto.decode_now(request, self._limits, self._checksum)
        return proto.encode_meta({"evicted": self.shard.evict_expired(now)})

    def _stats(self, request: bytes) -> bytes:
        proto.decode_empty(request, self._limits, self._checksum)
        return proto.encode_meta({"stats": _jsonable(self.shard.stats())})

    def _health(self, request: bytes) -> bytes:
        proto.decode_empty(request, self._limits, self._checksum)
        return proto.encode_meta({"status": "SERVING", "info": self.shard.info()})


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item"):
        return obj.item()
    return obj
