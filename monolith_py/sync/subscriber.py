"""The serving-worker side of sync: one subscriber thread per PS shard.

A :class:`ShardSubscriber` opens a ``Subscribe`` stream to its shard from the sink's
current position, decodes every message (deltas are reassembled from their parts) and
hands it to the :class:`~monolith_py.sync.protocol.DeltaSink`. When the sink refuses a
delta (out of order, other epoch) or a heartbeat shows the two sides disagree, it
resubscribes from the sink's real position, so the shard answers with exactly what is
missing (or a full resync). Lost connections are retried with exponential backoff.
Malformed messages are counted and cause a resubscribe; they never crash the worker.

:func:`sync_once` runs the same exchange in-process, without gRPC (unit tests, and the
single-process mode).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import grpc

from monolith_py.errors import DecodeError
from monolith_py.observe.metrics import counter
from monolith_py.sync.codec import (
    DEFAULT_CHUNK_BYTES,
    DeltaAssembler,
    SubscribeRequest,
    decode_message,
    encode_subscribe,
)
from monolith_py.sync.protocol import DeltaSink, DenseUpdate, Heartbeat, ShardDelta
from monolith_py.sync.publisher import DenseBoard, ShardPublisher
from monolith_py.sync.service import CHANNEL_OPTIONS, SUBSCRIBE

__all__ = ["ShardSubscriber", "sync_once", "deliver"]

log = logging.getLogger("monolith.sync")


def deliver(msg: ShardDelta | DenseUpdate | Heartbeat | None, shard: int,
            sink: DeltaSink) -> bool:
    """Hand one decoded message to ``sink``; False when the subscriber must resubscribe."""
    if msg is None:
        return True
    if isinstance(msg, ShardDelta):
        if msg.shard != shard:
            raise DecodeError(f"bad sync message: delta of shard {msg.shard} on the stream "
                              f"of shard {shard}")
        return sink.apply_delta(msg) != "refuse"
    if isinstance(msg, DenseUpdate):
        sink.apply_dense(msg)
        return True
    if msg.shard != shard:
        raise DecodeError(f"bad sync message: heartbeat of shard {msg.shard} on shard {shard}")
    return sink.heartbeat(msg)


def sync_once(publisher: ShardPublisher, sink: DeltaSink, *, board: DenseBoard | None = None,
              fp16: bool = False, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> bool:
    """One in-process round: what ``publisher`` has for the sink's position (through the
    real encoder and decoder), plus the board's dense state if newer. Returns False when
    the sink refused something (call again to catch up)."""
    shard = publisher.shard
    frames, after = publisher.frames_since(sink.position(shard), fp16=fp16,
                                           chunk_bytes=chunk_bytes)
    asm = DeltaAssembler()
    ok = True
    for f in frames:
        ok = deliver(decode_message(f, asm), shard, sink) and ok
    if board is not None:
        latest = board.latest()
        if latest is not None and latest[0] != sink.dense_ident():
            ok = deliver(decode_message(latest[1], asm), shard, sink) and ok
    if not frames:
        ok = deliver(Heartbeat(shard, after), shard, sink) and ok
    return ok


class ShardSubscriber:
    """Follows one PS shard over gRPC from a background thread.

    Args:
        address: ``host:port`` of the shard's gRPC server.
        shard: the shard's index (the server checks it holds that shard).
        sink: where messages go.
        interval_s: how often the shard sends news (its ``sync_interval``).
        fp16: ask for float16 rows on the wire.
        worker: a name for the shard's logs.
        backoff_s: ``(first, max)`` delay between reconnection attempts.
    """

    def __init__(self, address: str, shard: int, sink: DeltaSink, *, interval_s: float = 1.0,
                 fp16: bool = False, worker: str = "", backoff_s: tuple[float, float] = (0.05, 2.0)
                 ) -> None:
        self.address = address
        self.shard = int(shard)
        self._sink = sink
        self._interval = float(interval_s)
        self._fp16 = bool(fp16)
        self._worker = worker
        self._backoff = backoff_s
        self._stop = threading.Event()
        self._mu = threading.Lock()
        self._call: Any = None
        self._thread: threading.Thread | None = None
        self.connected = False
        self.resubscribes = 0
        self.errors = 0
        self.last_error = ""
        labels = {"shard": str(self.shard)}
        self._m_err = counter("monolith_serving_sync_errors_total",
                              "Sync stream errors (connection lost, bad message).",
                              ["shard", "kind"])
        self._m_resub = counter("monolith_serving_sync_resubscribes_total",
                                "Resubscriptions after a refused delta.",
                                ["shard"]).labels(**labels)

    def start(self) -> ShardSubscriber:
        self._thread = threading.Thread(target=self._run, name=f"sync-sub-{self.shard}",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel the stream and join the thread."""
        self._stop.set()
        with self._mu:
            if self._call is not None:
                self._call.cancel()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        delay = self._backoff[0]
        while not self._stop.is_set():
            channel = grpc.insecure_channel(self.address, options=CHANNEL_OPTIONS)
            try:
                if self._follow(channel):
                    delay = self._backoff[0]
                    continue  # resubscribe at once
            except grpc.RpcError as exc:
                if self._stop.is_set():
                    break
                self._error("rpc", f"{exc.code() if hasattr(exc, 'code') else ''} "
                            f"{exc.details() if hasattr(exc, 'details') else exc}")
            except DecodeError as exc:
                self._error("decode", str(exc))
            except Exception as exc:  # noqa: BLE001 - the follower thread must not die
                if self._stop.is_set():
                    break
                self._error("internal", f"{type(exc).__name__}: {exc}")
            finally:
                self.connected = False
                with self._mu:
                    self._call = None
                channel.close()
            self._stop.wait(delay)
            delay = min(self._backoff[1], delay * 2)

    def _error(self, kind: str, msg: str) -> None:
        self.errors += 1
        self.last_error = msg
        self._m_err.labels(shard=str(self.shard), kind=kind).inc()
        log.warning("sync shard %d (%s): %s: %s", self.shard, self.address, kind, msg)

    def _follow(self, channel: grpc.Channel) -> bool:
        """One subscription; True when it ended by a refusal (resubscribe now)."""
        req = SubscribeRequest(self.shard, self._sink.position(self.shard),
                               self._sink.dense_ident(), self._fp16, self._interval,
                               self._worker)
        call = channel.unary_stream(SUBSCRIBE)(encode_subscribe(req))
        with self._mu:
            if self._stop.is_set():
                call.cancel()
                return False
            self._call = call
        asm = DeltaAssembler()
        for frame in call:
            self.connected = True
            if not deliver(decode_message(frame, asm), self.shard, self._sink):
                self.resubscribes += 1
                self._m_resub.inc()
                call.cancel()
                return True
        return False

    def wait_connected(self, timeout: float) -> bool:
        """Poll until the stream delivered a message (tests)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.connected:
                return True
            time.sleep(0.01)
        return self.connected
