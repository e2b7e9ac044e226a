"""The sync service over gRPC: a generic handler any gRPC server can host.

Methods of ``monolith.sync.v1.Sync`` (raw array frames, no protobuf; see
:mod:`monolith_py.sync.codec`):

* ``Subscribe`` (server streaming): the request says where the worker stands; the shard
  streams the delta that brings it to now, then every ``interval_s`` what changed since
  (or a heartbeat), plus the dense state whenever the board has a newer one. The stream
  runs until the worker cancels it or the service closes.
* ``PutDense`` (unary): the trainer publishes its dense state (a dense frame) on the
  shard holding the :class:`~monolith_py.sync.publisher.DenseBoard` (shard 0).
* ``Status`` (unary): the shard's position and dense ident, as a frame's meta.

The PS server registers :meth:`SyncService.handler` next to its own handlers, so sync
shares the PS port; :func:`serve_sync` runs it alone (tests, benchmarks).

Example::

    >>> from monolith_py.table import EmbeddingTable, TableConfig
    >>> svc = SyncService(ShardPublisher(0, {"t": EmbeddingTable(TableConfig("t", dim=2))}))
    >>> server, port = serve_sync(svc)
    >>> SyncClient(f"127.0.0.1:{port}").status()["shard"]
    0
    >>> svc.close(); _ = server.stop(None)
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from typing import Any

import grpc

from monolith_py.errors import DecodeError, UnavailableError
from monolith_py.observe.metrics import counter, gauge
from monolith_py.sync.codec import (
    DEFAULT_CHUNK_BYTES,
    decode_subscribe,
    encode_dense,
    encode_heartbeat,
)
from monolith_py.sync.publisher import DenseBoard, ShardPublisher
from monolith_py.wire import decode_arrays, encode_arrays

__all__ = ["SyncService", "SyncClient", "serve_sync", "SERVICE", "CHANNEL_OPTIONS"]

SERVICE = "monolith.sync.v1.Sync"
SUBSCRIBE = f"/{SERVICE}/Subscribe"
PUT_DENSE = f"/{SERVICE}/PutDense"
STATUS = f"/{SERVICE}/Status"
_MAX_MSG = 1 << 30
#: gRPC options for both ends (delta parts are small; a dense state may be large).
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", _MAX_MSG),
                   ("grpc.max_send_message_length", _MAX_MSG)]


class SyncService:
    """Serves one PS shard's deltas (and, on shard 0, the dense board).

    Args:
        publisher: the shard's :class:`ShardPublisher` (``None``: dense board only).
        board: the :class:`DenseBoard` (``None`` on shards other than 0).
        chunk_bytes: largest delta part sent in one message.
        max_subscribers: concurrent Subscribe streams accepted (each holds a server
            thread); more are refused with ``RESOURCE_EXHAUSTED``.
    """

    def __init__(self, publisher: ShardPublisher | None, board: DenseBoard | None = None, *,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, max_subscribers: int = 64) -> None:
        self.publisher = publisher
        self.board = board
        self._chunk = int(chunk_bytes)
        self._max_subs = int(max_subscribers)
        self._subs = 0
        self._mu = threading.Lock()
        self._closed = threading.Event()
        self._wakeups: set[threading.Event] = set()
        shard = str(publisher.shard) if publisher is not None else "dense"
        self._m_subs = gauge("monolith_sync_subscribers", "Open Subscribe streams.", ["shard"])
        self._m_bytes = counter("monolith_sync_sent_bytes_total", "Sync bytes sent.", ["shard"])
        self._m_bad = counter("monolith_sync_bad_requests_total",
                              "Malformed sync requests refused.", ["method"])
        self._label = shard

    def handler(self) -> grpc.GenericRpcHandler:
        """The generic handler to add to a ``grpc.Server``."""
        return grpc.method_handlers_generic_handler(SERVICE, {
            "Subscribe": grpc.unary_stream_rpc_method_handler(self._subscribe),
            "PutDense": grpc.unary_unary_rpc_method_handler(self._put_dense),
            "Status": grpc.unary_unary_rpc_method_handler(self._status),
        })

    def close(self) -> None:
        """End every open stream (they return at their next wake-up)."""
        self._closed.set()
        with self._mu:
            for ev in self._wakeups:
                ev.set()

    def notify(self) -> None:
        """Wake every stream now (e.g. right after a dense put) instead of at its next
        interval."""
        with self._mu:
            for ev in self._wakeups:
                ev.set()

    # -- methods --------------------------------------------------------------------------

    def _subscribe(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        try:
            req = decode_subscribe(request)
        except DecodeError as exc:
            self._m_bad.labels(method="Subscribe").inc()
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        pub = self.publisher
        if pub is None or req.shard != pub.shard:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"this service holds shard {None if pub is None else pub.shard}, "
                          f"the worker asked for shard {req.shard}; check the --ps order")
        with self._mu:
            if self._subs >= self._max_subs:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"{self._subs} subscribers already (max {self._max_subs})")
            self._subs += 1
            wake = threading.Event()
            self._wakeups.add(wake)
        self._m_subs.labels(shard=self._label).inc()
        context.add_callback(wake.set)
        try:
            yield from self._stream(req, context, wake)
        finally:
            with self._mu:
                self._subs -= 1
                self._wakeups.discard(wake)
            self._m_subs.labels(shard=self._label).dec()

    def _stream(self, req: Any, context: grpc.ServicerContext,
                wake: threading.Event) -> Iterator[bytes]:
        pub: ShardPublisher = self.publisher  # type: ignore[assignment]  # checked by caller
        pos = req.position
        dense_sent = req.dense
        sent = self._m_bytes.labels(shard=self._label)
        while context.is_active() and not self._closed.is_set():
            frames, pos = pub.frames_since(pos, fp16=req.fp16, chunk_bytes=self._chunk)
            for f in frames:
                sent.inc(len(f))
                yield f
            if self.board is not None:
                latest = self.board.latest()
                if latest is not None and latest[0] != dense_sent:
                    dense_sent = latest[0]
                    sent.inc(len(latest[1]))
                    yield latest[1]
            if not frames:
                yield encode_heartbeat(pub.shard, pos)
            wake.wait(req.interval_s)
            wake.clear()

    def _put_dense(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        if self.board is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          "this shard holds no dense board; PutDense goes to shard 0")
        try:
            epoch, version = self.board.put(request)  # type: ignore[union-attr]
        except DecodeError as exc:
            self._m_bad.labels(method="PutDense").inc()
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        self.notify()
        return encode_arrays({}, meta={"epoch": epoch, "version": version})

    def _status(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        meta: dict[str, Any] = {"shard": None, "position": None, "dense": None}
        if self.publisher is not None:
            meta["shard"] = self.publisher.shard
            meta["position"] = self.publisher.position().to_dict()
            meta["floors"] = self.publisher.floors
        if self.board is not None:
            latest = self.board.latest()
            meta["dense"] = None if latest is None else list(latest[0])
        return encode_arrays({}, meta=meta)


def serve_sync(service: SyncService, host: str = "127.0.0.1", port: int = 0,
               max_workers: int = 32) -> tuple[grpc.Server, int]:
    """Start a gRPC server hosting only ``service``; returns ``(server, port)``."""
    from concurrent.futures import ThreadPoolExecutor

    server = grpc.server(ThreadPoolExecutor(max_workers=max_workers,
                                            thread_name_prefix="sync"),
                         options=CHANNEL_OPTIONS)
    server.add_generic_rpc_handlers((service.handler(),))
    bound = server.add_insecure_port(f"{host}:{int(port)}")
    if bound == 0:
        raise UnavailableError(f"cannot bind the sync service to {host}:{port}")
    server.start()
    return server, bound


class SyncClient:
    """Unary calls of the sync service (the trainer's ``put_dense``, ``status``).

    Args:
        address: ``host:port`` of the shard's gRPC server.
        timeout_s: deadline of each call.
    """

    def __init__(self, address: str, timeout_s: float = 10.0) -> None:
        self.address = address
        self._timeout = float(timeout_s)
        self._channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        self._put = self._channel.unary_unary(PUT_DENSE)
        self._stat = self._channel.unary_unary(STATUS)

    def _call(self, fn: Any, payload: bytes, what: str) -> dict[str, Any]:
        try:
            reply = fn(payload, timeout=self._timeout)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            raise UnavailableError(f"{what} on {self.address} failed: {code}: "
                                   f"{exc.details() if hasattr(exc, 'details') else exc}") from exc
        return decode_arrays(reply)[1]

    def put_dense(self, spec: Mapping[str, Any], tensors: Mapping[str, Any]) -> tuple[int, int]:
        """Publish ``spec`` (a ``ModelSpec.to_dict()``) and dense tensors (e.g. the model's
        ``state_dict()``); returns the board's ``(epoch, version)``."""
        meta = self._call(self._put, encode_dense(spec, tensors, epoch=0, version=0),
                          "PutDense")
        return int(meta["epoch"]), int(meta["version"])

    def status(self) -> dict[str, Any]:
        return self._call(self._stat, b"", "Status")

    def close(self) -> None:
        self._channel.close()
