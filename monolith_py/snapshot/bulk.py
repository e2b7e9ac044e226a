"""Bulk reads of snapshot bytes over plain TCP: the SMP's data port.

Restores move gigabytes (every part of a chain, or the blocks of a lost host's parts). A
gRPC stream of them costs several copies per byte in Python (the message into a ``bytes``
object on fresh pages, then into the destination) and ran at ~1 GB/s per stream here,
where a plain socket read straight into a reused buffer runs at 3-4 GB/s. So each SMP
also listens on a **data port** (``SMPServer.bulk_port``, announced by the ``BulkPort``
RPC) that serves exactly the two streaming reads of the gRPC service, ``StreamBlock``
and ``StreamPart``, with one kernel copy on each side:

* request: a 4-byte big-endian length, then a wire frame (crc32c required, at most
  :data:`MAX_REQUEST` bytes) whose meta is ``{"op": "block" | "part", "participant",
  "snapshot_id", "kind"[, "index"][, "offset", "length"]}`` (a byte range: restores
  read a part's header and key columns first, see :mod:`~monolith_py.snapshot._fetch`);
* answer: a 4-byte length and a frame ``{"found": bool, "size": n}`` (or ``{"error":
  text}`` for a bad request, after which the server closes the connection), then ``n``
  raw bytes. A connection may carry several requests one after the other.

It also takes **block placements** (``"op": "put"``, the bulk twin of ``PutBlock``): the
request names the block (``participant``, ``snapshot_id``, ``kind``, ``index``) and its
``block_bytes`` and ``part_size``; the server answers ``{"ready": true}`` once it has a
segment for it (or an error), the sender streams the ``block_bytes`` raw bytes, which the
server reads straight into that segment, then a trailer frame ``{"block_crc": c}``; the
server keeps the block only if its crc32c matches and answers ``{"ok": true}`` (else an
error, and the segment goes back to the pool).

The raw bytes carry no checksum of their own: every reader checks what it receives
against the crc32c of the sealed manifest (block by block, or the whole part), as it
does for the gRPC stream. Control (lease, commit, placement, seal, catalogs) stays on
gRPC. The port is as exposed as the gRPC one (see "Network exposure" in
``docs/operations.md``): it serves reads of what the SMP holds and the same block
placements ``PutBlock`` takes (checked the same way), bounds its connections
(:data:`MAX_CONNECTIONS`, more are closed at once) and times out idle or slow peers.

Example::

    >>> server = BulkServer(lambda meta: None, "127.0.0.1").start()
    >>> bulk_read(("127.0.0.1", server.port), {"op": "part", "participant": "ps/0",
    ...            "snapshot_id": 1, "kind": "full"}, lambda off, chunk: None) is None
    True
    >>> server.stop()
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Mapping
from typing import Any

import crc32c

from monolith_py.errors import (
    CorruptDataError,
    DecodeError,
    InvalidInputError,
    MonolithError,
    UnavailableError,
)
from monolith_py.wire import WireLimits, decode_arrays, encode_arrays

__all__ = ["BulkServer", "BulkWriter", "bulk_read", "MAX_REQUEST", "MAX_CONNECTIONS", "CHUNK"]

log = logging.getLogger("monolith.snapshot.bulk")

MAX_REQUEST = 64 << 10
"""Largest request frame accepted (a key is a few hundred bytes)."""
MAX_CONNECTIONS = 32
"""Connections served at once; more are closed as they arrive."""
CHUNK = 1 << 20
"""Bytes per socket call on either side (a reused buffer that stays in cache)."""
_LIMITS = WireLimits(max_header_bytes=MAX_REQUEST, max_arrays=0, max_total_bytes=MAX_REQUEST,
                     max_ndim=1)

Sink = Callable[[int, memoryview], None]
Putter = Callable[[Mapping[str, Any]], Any]
"""``put_(meta)``: where a placed block goes: an object with ``view`` (a writable
``memoryview`` of exactly the block's bytes), ``commit(block_crc)`` (keeps it; raises
:class:`~monolith_py.errors.CorruptDataError` when the crc does not match) and
``abort()`` (gives the segment back unless committed); raises
:class:`~monolith_py.errors.InvalidInputError` for a bad request."""
Opener = Callable[[Mapping[str, Any]], Any]
"""``open_(meta)``: a context manager whose ``__enter__`` gives the bytes asked for (kept
from retention until it exits), ``None`` when not held; raises
:class:`~monolith_py.errors.InvalidInputError` for a bad request."""


def _message(meta: Mapping[str, Any]) -> bytes:
    frame = encode_arrays({}, dict(meta))
    return len(frame).to_bytes(4, "big") + frame


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    """``n`` bytes, or ``None`` on a clean end of stream before the first byte."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        r = sock.recv_into(view[got:])
        if not r:
            if got == 0:
                return None
            raise ConnectionError(f"connection closed after {got} of {n} bytes")
        got += r
    return bytes(buf)


def _read_message(sock: socket.socket) -> dict[str, Any] | None:
    head = _recv_exact(sock, 4)
    if head is None:
        return None
    n = int.from_bytes(head, "big")
    if not 0 < n <= MAX_REQUEST:
        raise InvalidInputError(f"message of {n} bytes (at most {MAX_REQUEST})")
    body = _recv_exact(sock, n)
    if body is None:
        raise ConnectionError("connection closed before the message")
    _, meta = decode_arrays(body, limits=_LIMITS, require_checksum=True)
    return meta


def _answer(sock: socket.socket, where: str) -> dict[str, Any]:
    """The server's answer frame. Its ``error`` is raised: as :class:`CorruptDataError`
    for a block it found corrupt, else as :class:`InvalidInputError`; a malformed answer
    is a :class:`CorruptDataError`; a closed connection a ``ConnectionError``."""
    try:
        head = _read_message(sock)
    except (DecodeError, InvalidInputError) as exc:
        raise CorruptDataError(f"{where}: bad answer: {exc}") from None
    if head is None:
        raise ConnectionError("closed before answering")
    if "error" in head:
        err = str(head["error"])
        cls = CorruptDataError if err.startswith("CorruptDataError") else InvalidInputError
        raise cls(f"{where}: {err}")
    return head


class BulkServer:
    """Serve ``open_(meta)`` reads on ``host:port`` (0: a free one); see the module
    docstring for the protocol.

    Args:
        open_: the reader (see :data:`Opener`).
        host, port: where to listen.
        on_reject: called once per rejected request (for a counter).
        io_timeout_s: a peer silent for this long (mid-request or not reading) is dropped.
    """

    def __init__(self, open_: Opener, host: str, port: int = 0, *,
                 on_reject: Callable[[], None] | None = None, io_timeout_s: float = 60.0,
                 max_connections: int = MAX_CONNECTIONS, put_: Putter | None = None) -> None:
        self._open = open_
        self._put = put_
        self._on_reject = on_reject or (lambda: None)
        self.io_timeout_s = float(io_timeout_s)
        self._slots = threading.BoundedSemaphore(max_connections)
        self._sock = socket.create_server((host, int(port)))
        self.host = host
        self.port: int = self._sock.getsockname()[1]
        self._conns: set[socket.socket] = set()
        self._mu = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._accept, name=f"bulk-{self.port}",
                                        daemon=True)

    def start(self) -> BulkServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._mu:
            self._closed = True
            conns = list(self._conns)
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            if not self._slots.acquire(blocking=False):
                log.warning("bulk port %d: more than its connection limit; closing one",
                            self.port)
                conn.close()
                continue
            with self._mu:
                if self._closed:
                    conn.close()
                    self._slots.release()
                    return
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True,
                             name=f"bulk-{self.port}-conn").start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(self.io_timeout_s)
            while self._serve_one(conn):
                pass
        except (OSError, ConnectionError):
            pass  # the peer went away or stalled: nothing to answer
        finally:
            with self._mu:
                self._conns.discard(conn)
            conn.close()
            self._slots.release()

    def _serve_one(self, conn: socket.socket) -> bool:
        try:
            meta = _read_message(conn)
            if meta is None:
                return False
            if meta.get("op") == "put" and self._put is not None:
                return self._serve_put(conn, meta)
            reader = self._open(meta)
        except (DecodeError, InvalidInputError) as exc:
            self._on_reject()
            conn.sendall(_message({"error": f"{type(exc).__name__}: {exc}"[:2000]}))
            return False
        if reader is None:
            conn.sendall(_message({"found": False}))
            return True
        with reader as view:  # pinned until sent (or the peer gives up)
            try:
                lo, hi = _range(meta, view.nbytes)
            except InvalidInputError as exc:
                self._on_reject()
                conn.sendall(_message({"error": f"{type(exc).__name__}: {exc}"[:2000]}))
                return False
            conn.sendall(_message({"found": True, "size": hi - lo}))
            for a in range(lo, hi, 4 * CHUNK):
                conn.sendall(view[a: min(a + 4 * CHUNK, hi)])
        return True


    def _serve_put(self, conn: socket.socket, meta: Mapping[str, Any]) -> bool:
        assert self._put is not None
        target = self._put(meta)  # InvalidInputError: answered by the caller
        try:
            conn.sendall(_message({"ready": True}))
            view, got, summed = target.view, 0, 0
            while got < view.nbytes:
                r = conn.recv_into(view[got: got + CHUNK])
                if not r:
                    raise ConnectionError(f"connection closed after {got} of {view.nbytes} bytes")
                # summed while the bytes just received are in cache, not in a pass of its own
                summed = crc32c.crc32c(view[got: got + r], summed)
                got += r
            trailer = _read_message(conn)
            crc = None if trailer is None else trailer.get("block_crc")
            if isinstance(crc, bool) or not isinstance(crc, int):
                raise InvalidInputError(f"bad block trailer {trailer!r}")
            try:
                target.commit(crc, summed)
            except CorruptDataError as exc:  # commit gave the segment back
                self._on_reject()
                conn.sendall(_message({"error": f"{type(exc).__name__}: {exc}"[:2000]}))
                return False
            conn.sendall(_message({"ok": True}))
            return True
        finally:
            target.abort()  # a no-op once committed


def _range(meta: Mapping[str, Any], size: int) -> tuple[int, int]:
    """The byte range a request asks for: ``offset`` and ``length`` (both optional)."""
    off, length = meta.get("offset", 0), meta.get("length")
    if isinstance(off, bool) or not isinstance(off, int) or not 0 <= off <= size:
        raise InvalidInputError(f"offset must be an int in [0, {size}], got {off!r}")
    if length is None:
        return off, size
    if isinstance(length, bool) or not isinstance(length, int) or not 0 <= length <= size - off:
        raise InvalidInputError(f"length must be an int in [0, {size - off}], got {length!r}")
    return off, off + length


def bulk_read(address: tuple[str, int], meta: Mapping[str, Any], sink: Sink, *,
              timeout_s: float = 60.0) -> int | None:
    """Read what ``meta`` names from the data port at ``address`` into ``sink(offset,
    chunk)`` (a reused buffer: copy what you keep); its size, or ``None`` when not held.

    Raises :class:`UnavailableError` when the port cannot be reached, times out or drops
    the connection, :class:`CorruptDataError` for a stream that ends early or a malformed
    answer,
    :class:`InvalidInputError` when the server rejects the request. ``timeout_s`` bounds
    each socket wait, not the whole read."""
    where = f"SMP data port {address[0]}:{address[1]}"
    try:
        sock = socket.create_connection(address, timeout=timeout_s)
    except OSError as exc:
        raise UnavailableError(f"{where}: {exc}") from None
    pos, size = 0, -1
    try:
        sock.sendall(_message(meta))
        head = _answer(sock, where)
        if not head.get("found"):
            return None
        announced = head.get("size")
        if isinstance(announced, bool) or not isinstance(announced, int) or announced < 0:
            raise CorruptDataError(f"{where}: bad size {announced!r}")
        size = announced
        buf = memoryview(bytearray(min(CHUNK, max(size, 1))))
        while pos < size:
            want = min(buf.nbytes, size - pos)
            got = 0
            while got < want:
                r = sock.recv_into(buf[got:want])
                if not r:
                    raise CorruptDataError(f"{where}: stream ended at {pos + got} of "
                                           f"{size} bytes")
                got += r
            sink(pos, buf[:want])
            pos += want
        return size
    except MonolithError:
        raise
    except (OSError, ConnectionError) as exc:
        at = "" if size < 0 else f" (stream broke at {pos} of {size} bytes)"
        raise UnavailableError(f"{where}: {type(exc).__name__}: {exc}{at}") from None
    finally:
        sock.close()


class BulkWriter:
    """Place one block on the data port at ``address``: ``write`` its bytes in order (as
    they are encoded), then ``finish`` with its crc32c; see the module docstring.

    Raises :class:`UnavailableError` when the port cannot be reached, times out or drops
    the connection, :class:`InvalidInputError` when the server refuses the block and
    :class:`CorruptDataError` when it found the bytes did not match the crc. The server
    keeps nothing unless ``finish`` returned."""

    def __init__(self, address: tuple[str, int], meta: Mapping[str, Any], *,
                 timeout_s: float = 60.0) -> None:
        self._where = f"SMP data port {address[0]}:{address[1]}"
        size = meta.get("block_bytes")  # checked by the server
        self._size = size if isinstance(size, int) and not isinstance(size, bool) else -1
        self._sent = 0
        try:
            self._sock = socket.create_connection(address, timeout=timeout_s)
        except OSError as exc:
            raise UnavailableError(f"{self._where}: {exc}") from None
        try:
            self._sock.sendall(_message({**meta, "op": "put"}))
            self._answer("ready")
        except BaseException:
            self.close()
            raise

    def _answer(self, field: str) -> None:
        try:
            head = _answer(self._sock, self._where)
        except (OSError, ConnectionError) as exc:
            raise UnavailableError(f"{self._where}: {type(exc).__name__}: {exc}") from None
        if head.get(field) is not True:
            raise CorruptDataError(f"{self._where}: unexpected answer {head!r}")

    def write(self, data: Any) -> None:
        view = memoryview(data).cast("B")
        if self._sent + view.nbytes > self._size:
            raise InvalidInputError(f"{self._where}: more than the block's {self._size} bytes")
        try:
            self._sock.sendall(view)
        except OSError as exc:
            raise UnavailableError(f"{self._where}: {type(exc).__name__}: {exc} "
                                   f"(after {self._sent} of {self._size} bytes)") from None
        self._sent += view.nbytes

    def finish(self, block_crc: int) -> None:
        """Send the crc and wait until the block is kept."""
        try:
            if self._sent != self._size:
                raise InvalidInputError(f"{self._where}: {self._sent} of {self._size} bytes "
                                        "written")
            try:
                self._sock.sendall(_message({"block_crc": int(block_crc)}))
            except OSError as exc:
                raise UnavailableError(f"{self._where}: {type(exc).__name__}: {exc}") from None
            self._answer("ok")
        finally:
            self.close()

    def close(self) -> None:
        try:
            self._sock.close()
        except OSError:
            pass
