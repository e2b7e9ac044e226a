"""The SMP over gRPC: :class:`SMPServer` (a :class:`SnapshotStore` behind a generic handler)
and :class:`SMPClient` (participants, the coordinator, peers and recovery all use it).

Service ``monolith.snapshot.v1.SMP``; every request and answer is a wire frame (arrays plus
JSON meta, crc32c checked) — no protobuf, no pickle:

============  ==========================================  ===============================
method        request meta (arrays)                       answer meta (arrays)
============  ==========================================  ===============================
Lease         participant, nbytes                         segment, path, capacity, directory
Release       participant, segment                        released
Commit        participant, segment, nbytes                key
PutPart       participant (data)                          key
WaitPart      participant, snapshot_id, kind, timeout_s,  record
              capture (the capture's token, or null)
PutBlock      a block chunk frame (see ``store``)         (empty)
GetBlock      participant, snapshot_id, kind, index,      found (data)
              offset, length
PartLocation  participant, snapshot_id, kind              location or null
ReadPart      ... , offset, length                        found (data)
Seal          (manifest)                                  snapshot_id
PutRecord     record                                      (empty)
Catalog       (empty)                                     records, newest_id (m0, m1, ...)
Stats         (empty)                                     stats
StreamBlock   participant, snapshot_id, kind, index,      a stream: meta {found, size},
              chunk                                       then raw chunks of the block
StreamPart    participant, snapshot_id, kind, chunk       the same for the whole part
BulkPort      (empty)                                     port (the data port)
============  ==========================================  ===============================

Restores stream blocks and parts chunk by chunk, each handed to the caller's sink as it
arrives (no frame or checksum per chunk: the caller checks the whole block's crc32c
against the sealed manifest). :class:`SMPClient` reads them through the SMP's **data
port** (:mod:`~monolith_py.snapshot.bulk`, plain TCP, 3-3.5 GB/s per stream here) and
falls back to ``StreamBlock``/``StreamPart`` (gRPC server streaming of
:data:`~monolith_py.snapshot.store.STREAM_CHUNK`-byte messages, ~1.1 GB/s) when the SMP
has none. Placements go the same way: :class:`GrpcPeers` streams each remote block to
the peer's data port (``block_writer``) and uses ``PutBlock`` chunk frames when the peer
has none or the stream fails.

Bad requests get ``INVALID_ARGUMENT`` (and are counted by the store); a missing peer is
``UNAVAILABLE`` on the client side (:class:`~monolith_py.errors.UnavailableError`).

Example::

    >>> server = SMPServer(SMPConfig(job="doc", num_hosts=1, k=1, m=1), port=0).start()  # doctest: +SKIP
    >>> SMPClient(server.address).stats()["host"]                                          # doctest: +SKIP
    0
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent import futures
from typing import Any

import grpc
import numpy as np

from monolith_py.errors import (
    ConfigError,
    CorruptDataError,
    DeadlineExceededError,
    DecodeError,
    InvalidInputError,
    MonolithError,
    SnapshotError,
    UnavailableError,
)
from monolith_py.observe.metrics import proc_cpu_s
from monolith_py.snapshot.bulk import BulkServer, BulkWriter, bulk_read
from monolith_py.snapshot.manifest import (
    Manifest,
    PartKey,
    PartRecord,
    check_capture,
    check_participant,
)
from monolith_py.snapshot.store import STREAM_CHUNK, BlockKey, SMPConfig, SnapshotStore
from monolith_py.wire import WireLimits, decode_arrays, encode_arrays

__all__ = ["SMPServer", "SMPClient", "GrpcPeers", "SERVICE", "MAX_MESSAGE_BYTES",
           "smp_clients"]

log = logging.getLogger("monolith.snapshot.smp")

SERVICE = "monolith.snapshot.v1.SMP"
MAX_MESSAGE_BYTES = 64 << 20
_CHUNK = 8 << 20  # ranged unary reads (whole blocks and parts are streamed)
_NO_PORT = object()  # SMPClient._on_data_port: the SMP has no data port
_LIMITS = WireLimits(max_header_bytes=4 << 20, max_arrays=1 << 16,
                     max_total_bytes=MAX_MESSAGE_BYTES, max_ndim=2)
_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
            ("grpc.so_reuseport", 0)]


def _frame(meta: Mapping[str, Any] | None = None, **arrays: Any) -> bytes:
    return encode_arrays({k: np.frombuffer(v, dtype=np.uint8) if isinstance(v, (bytes, bytearray, memoryview)) else v
                          for k, v in arrays.items()}, dict(meta or {}))


def _key(meta: Mapping[str, Any]) -> PartKey:
    try:
        sid, kind = int(meta["snapshot_id"]), str(meta["kind"])
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidInputError(f"request lacks snapshot_id/kind: {exc}") from exc
    if kind not in ("full", "inc") or sid < 0:
        raise InvalidInputError(f"bad part key {sid}/{kind}")
    return (check_participant(meta.get("participant")), sid, kind)


def _int(meta: Mapping[str, Any], name: str, lo: int = 0) -> int:
    v = meta.get(name)
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise InvalidInputError(f"{name!r} must be an int >= {lo}, got {v!r}")
    return v


class SMPServer:
    """Serve a :class:`SnapshotStore` on ``host:port`` (port 0: a free one).

    Args:
        config: the store's :class:`SMPConfig`.
        peers: SMP addresses of the group by host index (``peers[config.host_id]`` is
            ignored); used to place blocks and broadcast compaction records.
        checkpoint_dir: passed to compaction's recovery when a chain is not all local.
    """

    def __init__(self, config: SMPConfig, port: int = 0, host: str = "127.0.0.1", *,
                 peers: Sequence[str] = (), max_workers: int = 8, bulk_port: int = 0) -> None:
        self.config = config
        self.host = host
        peer_map = {i: a for i, a in enumerate(peers) if i != config.host_id and a}
        if config.m > 1 and len(peer_map) < config.num_hosts - 1:
            raise ConfigError(
                f"SMP {config.host_id}: give the addresses of all {config.num_hosts} hosts "
                f"(--peers), got {list(peers)}")
        self.peers = GrpcPeers(peer_map) if peer_map else None
        self.store = SnapshotStore(config, self.peers, chain_reader=self._chain_reader)
        self._cpu: dict[str, float] = {}  # CPU seconds spent in each RPC's handler
        self._cpu_mu = threading.Lock()
        handlers = {
            "Lease": self._lease, "Release": self._release, "Commit": self._commit, "PutPart": self._put_part,
            "WaitPart": self._wait_part, "PutBlock": self._put_block,
            "GetBlock": self._get_block, "PartLocation": self._part_location,
            "ReadPart": self._read_part, "Seal": self._seal, "PutRecord": self._put_record,
            "Catalog": self._catalog, "Stats": self._stats, "BulkPort": self._bulk_port,
        }
        methods = {name: grpc.unary_unary_rpc_method_handler(self._wrap(name, fn))
                   for name, fn in handlers.items()}
        methods["StreamBlock"] = grpc.unary_stream_rpc_method_handler(self._stream_block)
        methods["StreamPart"] = grpc.unary_stream_rpc_method_handler(self._stream_part)
        generic = grpc.method_handlers_generic_handler(SERVICE, methods)
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers,
                                       thread_name_prefix=f"smp{config.host_id}"),
            handlers=[generic], options=_OPTIONS)
        self.port = self._server.add_insecure_port(f"{host}:{int(port)}")
        if self.port == 0:
            self.store.close()
            raise ConfigError(f"SMP cannot listen on {host}:{port}")
        try:
            self.bulk = BulkServer(self._open_bulk, host, bulk_port,
                                   on_reject=lambda: self.store._reject("bulk"),
                                   put_=self._put_bulk)
        except OSError as exc:
            self.store.close()
            raise ConfigError(f"SMP cannot listen on {host}:{bulk_port} (data port): "
                              f"{exc}") from None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, repair: bool = True) -> SMPServer:
        """Serve; with ``repair`` (and peers) rebuild this host's share of the retained
        snapshots from the peers in the background (``stats()["repair"]`` once done)."""
        self._server.start()
        self.bulk.start()
        if repair and self.peers is not None:
            self.store.start_repair(dict(self.peers.clients))
        log.info("SMP host %d of job %s serving on %s, data port %d (k=%d, m=%d, keep=%d, "
                 "segments in %s)", self.config.host_id, self.config.job, self.address,
                 self.bulk.port, self.config.k, self.config.m, self.config.keep,
                 self.store.pool.directory)
        return self

    def stop(self, grace: float | None = 1.0) -> None:
        self.bulk.stop()
        self._server.stop(grace).wait()
        self.store.close()
        if self.peers is not None:
            self.peers.close()

    def __enter__(self) -> SMPServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _chain_reader(self, man: Manifest, participant: str) -> Any:
        from monolith_py.snapshot.recovery import Recovery

        sources: dict[int, Any] = {self.config.host_id: self.store}
        if self.peers is not None:
            sources.update(self.peers.clients)
        return Recovery(sources, self.config.host_id, job=self.config.job).restore(
            participant, man.snapshot_id).state

    # -- handlers -------------------------------------------------------------------------------

    def _wrap(self, name: str, fn: Callable[[dict[str, np.ndarray], dict[str, Any]], bytes]
              ) -> Callable[[bytes, grpc.ServicerContext], bytes]:
        def handle(request: bytes, context: grpc.ServicerContext) -> bytes:
            t0 = time.thread_time()
            try:
                if name == "PutBlock":
                    return fn({"frame": request}, {})  # type: ignore[dict-item]
                arrays, meta = decode_arrays(request, limits=_LIMITS, require_checksum=True)
                return fn(arrays, meta)
            except (DecodeError, InvalidInputError) as exc:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"SMP: {exc}"[:4000])
            except DeadlineExceededError as exc:
                context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"SMP: {exc}"[:4000])
            except MonolithError as exc:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"SMP: {exc}"[:4000])
            except Exception as exc:  # a bug must not take the SMP down
                log.exception("SMP %s failed", name)
                context.abort(grpc.StatusCode.INTERNAL, f"SMP: {type(exc).__name__}: {exc}")
            finally:
                self._account(name, time.thread_time() - t0)
            return b""  # pragma: no cover

        return handle

    def _account(self, method: str, cpu_s: float) -> None:
        with self._cpu_mu:
            self._cpu[method] = self._cpu.get(method, 0.0) + cpu_s

    def _lease(self, a: Any, m: dict[str, Any]) -> bytes:
        return _frame(self.store.lease(check_participant(m.get("participant")),
                                       _int(m, "nbytes", 1)))

    def _release(self, a: Any, m: dict[str, Any]) -> bytes:
        seg = m.get("segment")
        if not isinstance(seg, str):
            raise InvalidInputError("'segment' must be a string")
        return _frame({"released": self.store.release(check_participant(m.get("participant")),
                                                      seg)})

    def _commit(self, a: Any, m: dict[str, Any]) -> bytes:
        seg = m.get("segment")
        if not isinstance(seg, str):
            raise InvalidInputError("'segment' must be a string")
        key = self.store.commit(check_participant(m.get("participant")), seg,
                                _int(m, "nbytes", 1))
        return _frame({"key": list(key)})

    def _put_part(self, a: dict[str, np.ndarray], m: dict[str, Any]) -> bytes:
        if set(a) != {"data"}:
            raise InvalidInputError("PutPart carries one array 'data'")
        key = self.store.put_part(check_participant(m.get("participant")), a["data"])
        return _frame({"key": list(key)})

    def _wait_part(self, a: Any, m: dict[str, Any]) -> bytes:
        p, sid, kind = _key(m)
        t = m.get("timeout_s", 60.0)
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t <= 3600:
            raise InvalidInputError("timeout_s must be in [0, 3600]")
        token = check_capture(m.get("capture"))
        return _frame({"record": self.store.wait_part(p, sid, kind, float(t), token).to_json()})

    def _put_block(self, a: dict[str, Any], m: Any) -> bytes:
        self.store.put_block(a["frame"])
        return _frame()

    def _get_block(self, a: Any, m: dict[str, Any]) -> bytes:
        key: BlockKey = (*_key(m), _int(m, "index"))
        data = self.store.get_block(key, _int(m, "offset"), _int(m, "length"))
        return _frame({"found": data is not None}, **({} if data is None else {"data": data}))

    def _bulk_port(self, a: Any, m: Any) -> bytes:
        return _frame({"port": self.bulk.port})

    def _open_bulk(self, m: Mapping[str, Any]) -> Any:
        op = m.get("op")
        if op == "block":
            return self.store.open_block((*_key(m), _int(m, "index")))
        if op == "part":
            return self.store.open_part(_key(m))
        raise InvalidInputError(f"unknown data port op {op!r}")

    def _put_bulk(self, m: Mapping[str, Any]) -> Any:
        return self.store.block_target((*_key(m), _int(m, "index")), _int(m, "block_bytes", 1),
                                       _int(m, "part_size", 1))

    def _stream_block(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        def open_(m: dict[str, Any]) -> Any:
            return self.store.open_block((*_key(m), _int(m, "index")))
        yield from self._stream(request, context, open_)

    def _stream_part(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        yield from self._stream(request, context, lambda m: self.store.open_part(_key(m)))

    def _stream(self, request: bytes, context: grpc.ServicerContext,
                open_: Callable[[dict[str, Any]], Any]) -> Iterator[bytes]:
        try:
            _, m = decode_arrays(request, limits=_LIMITS, require_checksum=True)
            chunk = min(max(_int(m, "chunk", 1), 64 << 10), 16 << 20)
            reader = open_(m)
        except (DecodeError, InvalidInputError) as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"SMP: {exc}"[:4000])
            return
        if reader is None:
            yield _frame({"found": False})
            return
        with reader as view:  # pinned until the stream ends or is cancelled
            yield _frame({"found": True, "size": view.nbytes})
            for lo in range(0, view.nbytes, chunk):
                yield bytes(view[lo: lo + chunk])

    def _part_location(self, a: Any, m: dict[str, Any]) -> bytes:
        return _frame({"location": self.store.part_location(_key(m))})

    def _read_part(self, a: Any, m: dict[str, Any]) -> bytes:
        data = self.store.read_part(_key(m), _int(m, "offset"), _int(m, "length"))
        return _frame({"found": data is not None}, **({} if data is None else {"data": data}))

    def _seal(self, a: dict[str, np.ndarray], m: Any) -> bytes:
        raw = a.get("manifest")
        if raw is None:
            raise InvalidInputError("Seal carries the manifest frame as 'manifest'")
        return _frame({"snapshot_id": self.store.seal(raw.tobytes()).snapshot_id})

    def _put_record(self, a: Any, m: dict[str, Any]) -> bytes:
        self.store.put_record(PartRecord.from_json(m.get("record")))
        return _frame()

    def _catalog(self, a: Any, m: Any) -> bytes:
        cat = self.store.catalog()
        arrays = {f"m{i}": raw for i, raw in enumerate(cat["manifests"])}
        return _frame({"records": [r.to_json() for r in cat["records"]],
                       "newest_id": cat["newest_id"]}, **arrays)

    def _stats(self, a: Any, m: Any) -> bytes:
        with self._cpu_mu:
            cpu = {k: round(v, 3) for k, v in self._cpu.items()}
        return _frame({"stats": {**self.store.stats(), "handler_cpu_s": cpu,
                                 "thread_cpu_s": _thread_cpu()}})


def _thread_cpu() -> dict[str, float]:
    """CPU seconds used so far by this process's threads, by name (threads the runtime
    started, such as gRPC's, are summed as ``native``); empty where /proc is missing."""
    names = {t.native_id: t.name.rstrip("0123456789_") or t.name for t in threading.enumerate()}
    out: dict[str, float] = {}
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return out
    for tid in tids:
        cpu = proc_cpu_s(f"/proc/self/task/{tid}/stat")
        if cpu is not None:
            name = names.get(int(tid), "native")
            out[name] = round(out.get(name, 0.0) + cpu, 2)
    return out


class SMPClient:
    """Client of one SMP (thread-safe; one channel).

    Args:
        address: ``host:port``.
        timeout_s: default deadline per call.
        host_id: the SMP's host index (informational).
    """

    def __init__(self, address: str, timeout_s: float = 30.0, host_id: int | None = None) -> None:
        self.address = address
        self.timeout_s = float(timeout_s)
        self.host_id = host_id
        self._channel = grpc.insecure_channel(address, options=_OPTIONS)
        self._stubs: dict[str, Any] = {}
        self._bulk: tuple[str, int] | bool | None = None  # None: not asked; False: none

    def close(self) -> None:
        self._channel.close()

    def _error(self, method: str, exc: grpc.RpcError) -> MonolithError:
        code = exc.code() if hasattr(exc, "code") else None
        detail = exc.details() if hasattr(exc, "details") else str(exc)
        where = f"SMP {self.address} {method}"
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
            return UnavailableError(f"{where}: {detail}")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return DeadlineExceededError(f"{where}: {detail}")
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return InvalidInputError(f"{where}: {detail}")
        return SnapshotError(f"{where}: {code}: {detail}")

    def _call(self, method: str, request: bytes, timeout_s: float | None = None
              ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        stub = self._stubs.get(method)
        if stub is None:
            stub = self._channel.unary_unary(f"/{SERVICE}/{method}")
            self._stubs[method] = stub
        try:
            raw = stub(request, timeout=timeout_s or self.timeout_s)
        except grpc.RpcError as exc:
            raise self._error(method, exc) from None
        return decode_arrays(raw, limits=_LIMITS, require_checksum=True)

    def _bulk_address(self, refresh: bool = False) -> tuple[str, int] | None:
        """The SMP's data port (asked once over gRPC; ``None`` if it has none)."""
        if self._bulk is None or refresh:
            try:
                _, m = self._call("BulkPort", _frame())
                self._bulk = (self.address.rsplit(":", 1)[0].strip("[]"), _int(m, "port", 1))
            except (SnapshotError, InvalidInputError):  # UNIMPLEMENTED: an older SMP
                self._bulk = False
        return self._bulk if isinstance(self._bulk, tuple) else None

    def _stream(self, method: str, meta: dict[str, Any],
                sink: Callable[[int, memoryview], None], size_hint: int | None) -> int | None:
        """Run a streaming read: ``sink(offset, chunk)`` per chunk; the size streamed, or
        ``None`` when the SMP does not hold it. A stream longer or shorter than it
        announced raises :class:`CorruptDataError`. Reads go through the data port
        (:mod:`~monolith_py.snapshot.bulk`) when the SMP has one; if it cannot be reached
        before any byte arrived (the SMP restarted on another port), the port is asked
        again, then the gRPC stream is used."""
        op = {"StreamBlock": "block", "StreamPart": "part"}[method]
        fed = [False]

        def feed(off: int, chunk: memoryview) -> None:
            fed[0] = True
            sink(off, chunk)

        got = self._on_data_port(
            lambda addr: bulk_read(addr, {**meta, "op": op}, feed, timeout_s=self.timeout_s),
            may_retry=lambda: not fed[0])
        if got is _NO_PORT:
            return self._grpc_stream(method, meta, sink, size_hint)
        return got  # type: ignore[no-any-return]

    def _on_data_port(self, call: Callable[[tuple[str, int]], Any],
                      may_retry: Callable[[], bool] = lambda: True) -> Any:
        """``call(address)`` on the SMP's data port; if it cannot be reached (the SMP
        restarted on another port), the port is asked again and ``call`` tried once more
        when ``may_retry()``. :data:`_NO_PORT` when the SMP has no data port (or the port
        it gives cannot be reached either, and ``may_retry()``)."""
        for refresh in (False, True):
            addr = self._bulk_address(refresh)
            if addr is None:
                break
            try:
                return call(addr)
            except UnavailableError:
                if not may_retry():
                    raise
        return _NO_PORT

    def block_writer(self, key: BlockKey, block_bytes: int, part_size: int) -> BulkWriter | None:
        """A stream placing block ``key`` on this SMP's data port (``None``: it has none
        that answers; use ``put_block``)."""
        p, sid, kind, idx = key
        meta = {"participant": p, "snapshot_id": sid, "kind": kind, "index": idx,
                "block_bytes": int(block_bytes), "part_size": int(part_size)}
        w = self._on_data_port(lambda addr: BulkWriter(addr, meta, timeout_s=self.timeout_s))
        return None if w is _NO_PORT else w  # type: ignore[no-any-return]

    def _grpc_stream(self, method: str, meta: dict[str, Any],
                     sink: Callable[[int, memoryview], None], size_hint: int | None
                     ) -> int | None:
        stub = self._stubs.get(method)
        if stub is None:
            stub = self._channel.unary_stream(f"/{SERVICE}/{method}")
            self._stubs[method] = stub
        timeout = self.timeout_s + (size_hint or 0) / 20e6  # generous: >= 20 MB/s
        call = stub(_frame({**meta, "chunk": STREAM_CHUNK}), timeout=timeout)
        try:
            try:
                _, head = decode_arrays(next(call), limits=_LIMITS, require_checksum=True)
            except StopIteration:
                raise CorruptDataError(f"SMP {self.address} {method}: empty stream") from None
            if not head.get("found"):
                return None
            size = _int(head, "size")
            pos = 0
            for msg in call:
                n = len(msg)
                if pos + n > size:
                    raise CorruptDataError(f"SMP {self.address} {method}: more than the "
                                           f"{size} bytes announced")
                sink(pos, memoryview(msg))
                pos += n
            if pos != size:
                raise CorruptDataError(f"SMP {self.address} {method}: stream ended at {pos} "
                                       f"of {size} bytes")
            return size
        except grpc.RpcError as exc:
            raise self._error(method, exc) from None
        except InvalidInputError as exc:  # a malformed head
            raise CorruptDataError(f"SMP {self.address} {method}: {exc}") from None
        finally:
            call.cancel()  # no-op once complete; stops the server on an early exit

    def stream_block(self, key: BlockKey, sink: Callable[[int, memoryview], None],
                     size_hint: int | None = None) -> int | None:
        """Stream block ``key`` into ``sink(offset, chunk)``; its size, or ``None`` when
        not held there. ``size_hint`` (the expected size) sets the deadline."""
        p, sid, kind, idx = key
        return self._stream("StreamBlock", {"participant": p, "snapshot_id": sid,
                                            "kind": kind, "index": idx}, sink, size_hint)

    def read_block_into(self, key: BlockKey, offset: int, out: memoryview) -> bool:
        """Bytes ``[offset, offset + len(out))`` of block ``key`` into ``out``; ``False``
        when the block is not held there (data port, else ranged ``GetBlock`` calls)."""
        p, sid, kind, idx = key
        n = out.nbytes
        addr = self._bulk_address()
        if addr is not None:
            def sink(off: int, chunk: memoryview) -> None:
                if off + chunk.nbytes > n:
                    raise CorruptDataError(f"SMP {self.address}: more than the {n} bytes asked")
                out[off: off + chunk.nbytes] = chunk

            got = bulk_read(addr, {"op": "block", "participant": p, "snapshot_id": sid,
                                   "kind": kind, "index": idx, "offset": int(offset),
                                   "length": n}, sink, timeout_s=self.timeout_s)
            if got is None:
                return False
            if got != n:
                raise CorruptDataError(f"SMP {self.address}: {got} of {n} bytes")
            return True
        data = self.get_block(key, offset, n)
        if data is None:
            return False
        if len(data) != n:
            raise CorruptDataError(f"SMP {self.address}: short block range")
        out[:] = data
        return True

    def stream_part(self, key: PartKey, sink: Callable[[int, memoryview], None],
                    size_hint: int | None = None) -> int | None:
        """Stream the whole part ``key`` (see :meth:`stream_block`)."""
        p, sid, kind = key
        return self._stream("StreamPart", {"participant": p, "snapshot_id": sid,
                                           "kind": kind}, sink, size_hint)

    # -- participant side ------------------------------------------------------------------------

    def lease(self, participant: str, nbytes: int) -> dict[str, Any]:
        return self._call("Lease", _frame({"participant": participant, "nbytes": int(nbytes)}))[1]

    def release(self, participant: str, segment: str) -> bool:
        m = self._call("Release", _frame({"participant": participant, "segment": segment}))[1]
        return bool(m.get("released"))

    def commit(self, participant: str, segment: str, nbytes: int) -> PartKey:
        m = self._call("Commit", _frame({"participant": participant, "segment": segment,
                                         "nbytes": int(nbytes)}))[1]
        return tuple(m["key"])  # type: ignore[return-value]

    def put_part(self, participant: str, data: Any) -> PartKey:
        m = self._call("PutPart", _frame({"participant": participant}, data=memoryview(data)))[1]
        return tuple(m["key"])  # type: ignore[return-value]

    # -- coordinator side ------------------------------------------------------------------------

    def wait_part(self, participant: str, snapshot_id: int, kind: str,
                  timeout_s: float, capture: str | None = None) -> PartRecord:
        m = self._call("WaitPart", _frame({"participant": participant, "snapshot_id": snapshot_id,
                                           "kind": kind, "timeout_s": float(timeout_s),
                                           "capture": capture}),
                       timeout_s=timeout_s + 10.0)[1]
        return PartRecord.from_json(m.get("record"))

    def seal(self, manifest_bytes: bytes) -> int:
        m = self._call("Seal", _frame(manifest=manifest_bytes))[1]
        return int(m["snapshot_id"])

    # -- peers and recovery ----------------------------------------------------------------------

    def put_block(self, frame: bytes) -> None:
        self._call("PutBlock", frame)

    def put_record(self, record: PartRecord) -> None:
        self._call("PutRecord", _frame({"record": record.to_json()}))

    def get_block(self, key: BlockKey, offset: int = 0, length: int | None = None) -> bytes | None:
        """The block (streamed whole; a range by chunked reads), or ``None`` when not held
        there."""
        if offset == 0 and length is None:
            parts_: list[bytes] = []
            size = self.stream_block(key, lambda off, chunk: parts_.append(bytes(chunk)))
            return None if size is None else b"".join(parts_)
        p, sid, kind, idx = key
        parts: list[np.ndarray] = []
        off = offset
        while True:
            n = _CHUNK if length is None else min(_CHUNK, offset + length - off)
            a, m = self._call("GetBlock", _frame({"participant": p, "snapshot_id": sid,
                                                  "kind": kind, "index": idx, "offset": off,
                                                  "length": n}))
            if not m.get("found"):
                return None
            data = a.get("data", np.zeros(0, np.uint8))
            parts.append(data)
            off += data.shape[0]
            if data.shape[0] < n or (length is not None and off >= offset + length):
                break
        if len(parts) == 1:
            return parts[0].tobytes()
        out = bytearray(sum(d.shape[0] for d in parts))  # one copy, no regrowth
        pos = 0
        for d in parts:
            out[pos: pos + d.shape[0]] = d.data
            pos += d.shape[0]
        return bytes(out)

    def part_location(self, key: PartKey) -> dict[str, Any] | None:
        p, sid, kind = key
        m = self._call("PartLocation", _frame({"participant": p, "snapshot_id": sid,
                                               "kind": kind}))[1]
        loc = m.get("location")
        return loc if isinstance(loc, dict) else None

    def read_part(self, key: PartKey, offset: int, length: int) -> bytes | None:
        p, sid, kind = key
        out = bytearray()
        off = offset
        while off < offset + length:
            n = min(_CHUNK, offset + length - off)
            a, m = self._call("ReadPart", _frame({"participant": p, "snapshot_id": sid,
                                                  "kind": kind, "offset": off, "length": n}))
            if not m.get("found"):
                return None
            data = a.get("data", np.zeros(0, np.uint8))
            out += data.tobytes()
            if data.shape[0] < n:
                break
            off += n
        return bytes(out)

    def catalog(self) -> dict[str, Any]:
        a, m = self._call("Catalog", _frame())
        mans = [a[f"m{i}"].tobytes() for i in range(len(a)) if f"m{i}" in a]
        recs = []
        for r in m.get("records", []):
            try:
                recs.append(PartRecord.from_json(r))
            except DecodeError as exc:
                log.warning("SMP %s: bad record skipped: %s", self.address, exc)
        return {"manifests": mans, "records": recs, "newest_id": m.get("newest_id", -1)}

    def stats(self) -> dict[str, Any]:
        return dict(self._call("Stats", _frame())[1]["stats"])

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Poll :meth:`stats` until the SMP answers."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self._call("Stats", _frame(), timeout_s=2.0)
                return
            except (UnavailableError, DeadlineExceededError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


class GrpcPeers:
    """:class:`~monolith_py.snapshot.store.Peers` over :class:`SMPClient`s."""

    def __init__(self, addresses: Mapping[int, str], timeout_s: float = 30.0) -> None:
        self.clients = {h: SMPClient(a, timeout_s, host_id=h) for h, a in addresses.items()}

    def _client(self, host: int) -> SMPClient:
        c = self.clients.get(host)
        if c is None:
            raise UnavailableError(f"no SMP address for host {host}")
        return c

    def put_block(self, host: int, frame: bytes) -> None:
        self._client(host).put_block(frame)

    def block_writer(self, host: int, key: BlockKey, block_bytes: int, part_size: int
                     ) -> BulkWriter | None:
        return self._client(host).block_writer(key, block_bytes, part_size)

    def put_record(self, host: int, record: PartRecord) -> None:
        self._client(host).put_record(record)

    def get_block(self, host: int, key: BlockKey) -> bytes | None:
        return self._client(host).get_block(key)

    def close(self) -> None:
        for c in self.clients.values():
            c.close()


def smp_clients(addresses: Sequence[str], timeout_s: float = 30.0) -> dict[int, SMPClient]:
    """``{host index: SMPClient}`` for a group's addresses."""
    return {i: SMPClient(a, timeout_s, host_id=i) for i, a in enumerate(addresses) if a}
