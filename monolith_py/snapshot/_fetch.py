"""Reading a part from the SMPs of other hosts (private to recovery).

* :func:`fetch_whole` — the whole part streamed from its home SMP into a pre-faulted buffer.
* :func:`fetch_decoded` — any ``k`` of its ``m`` blocks streamed **concurrently** from the
  hosts that hold them and, when a data block is missing, **decoded stripe by stripe while
  they arrive** (zfec releases the GIL): received data blocks land directly at their place
  in the part's buffer, parity blocks pass through a small ring (flow-controlled: a stream
  waits while its ring is full), and the decoder writes the missing data blocks into the
  buffer. Each block's crc32c is computed on the fly and checked against the sealed
  manifest at its end; a block that fails (host gone, missing, corrupt, short) is excluded
  and the part is fetched again from the remaining blocks. Decoded data blocks are checked
  against their sealed crc32c too, so every byte of the part is verified once (no second
  pass over the whole part).

Streams go through the sources' ``stream_block``/``stream_part`` (gRPC server streaming of
:data:`~monolith_py.snapshot.store.STREAM_CHUNK`-byte messages for an
:class:`~monolith_py.snapshot.smp.SMPClient`, plain memory copies for an in-process
:class:`~monolith_py.snapshot.store.SnapshotStore`); a source without them is read with
``get_block``/``read_part``.
"""

from __future__ import annotations

import mmap
import threading
from collections.abc import Callable, Mapping
from typing import Any

import crc32c
import numpy as np
import zfec
from numba import njit

from monolith_py.errors import CorruptDataError, MonolithError
from monolith_py.snapshot.manifest import PartRecord
from monolith_py.snapshot.store import STREAM_CHUNK

__all__: list[str] = []  # private module

Sink = Callable[[int, memoryview], None]

STRIPE = 4 * STREAM_CHUNK
"""Bytes of each block decoded per zfec call (a multiple of the stream's messages). zfec
releases the GIL while it decodes but must take it back after every call, which costs up
to a switch interval while the stream threads run Python: fewer, larger calls (measured
here with a busy Python thread beside it: 390 MB/s with 4 MiB stripes, 530 with 16)."""
RING_BYTES = 4 * STRIPE
"""Ring per parity block being streamed (memory: this, not the whole block)."""
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


def new_buffer(nbytes: int) -> memoryview:
    """A writable buffer of ``nbytes`` whose pages are mapped now (one call, 4 KiB pages:
    measured 0.4 s per GiB here against up to 2.4 s for first-touch huge pages). Like
    ``monolith_py.table._arrays.prefaulted_zeros``, which this module cannot import: the
    SMP side stays free of torch, which the table package loads."""
    if nbytes < (4 << 20):
        return memoryview(bytearray(nbytes))
    return memoryview(mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
                                | _POPULATE))


class _Abort(Exception):
    """Raised inside a sink to stop a stream (another block failed)."""


def _stream(src: Any, what: str, key: Any, sink: Sink, size_hint: int) -> int | None:
    fn = getattr(src, f"stream_{what}", None)
    if fn is not None:
        return fn(key, sink, size_hint=size_hint)  # type: ignore[no-any-return]
    if what == "block":
        data = src.get_block(key)
    else:
        data = src.read_part(key, 0, size_hint)
    if data is None:
        return None
    view = memoryview(data).cast("B")
    for lo in range(0, view.nbytes, STREAM_CHUNK):
        sink(lo, view[lo: lo + STREAM_CHUNK])
    return view.nbytes


def fetch_whole(src: Any, rec: PartRecord, why: list[str]) -> memoryview | None:
    """The part streamed from its home SMP ``src``; ``None`` (reason in ``why``) when it is
    not there, unreachable or fails its crc."""
    out = new_buffer(max(rec.size, 1))
    state = {"crc": 0, "pos": 0}

    def sink(off: int, chunk: memoryview) -> None:
        n = chunk.nbytes
        if off != state["pos"] or off + n > rec.size:
            raise CorruptDataError(f"chunk [{off}, +{n}) out of order or past the part's end")
        out[off: off + n] = chunk
        state["crc"] = crc32c.crc32c(chunk, state["crc"])
        state["pos"] = off + n

    try:
        size = _stream(src, "part", rec.key, sink, rec.size)
    except MonolithError as exc:
        why.append(f"host {rec.home} unavailable ({type(exc).__name__})")
        return None
    if size is None:
        why.append(f"host {rec.home} has no whole copy")
        return None
    if size != rec.size or state["crc"] != rec.crc:
        why.append(f"host {rec.home} copy corrupt")
        return None
    return out[: rec.size]


class _Pipeline:
    """One attempt: stream the ``chosen`` blocks and decode the missing data blocks."""

    def __init__(self, sources: Mapping[int, Any], rec: PartRecord, chosen: list[int],
                 out: memoryview) -> None:
        self.sources, self.rec, self.chosen, self.out = sources, rec, chosen, out
        self.k, self.bs = rec.k, rec.block_size
        self.missing = [d for d in range(rec.k) if d not in chosen]
        self.ring_bytes = self.bs if self.bs <= RING_BYTES else RING_BYTES
        self.rings = {i: memoryview(bytearray(self.ring_bytes)) for i in chosen if i >= rec.k}
        self.got = dict.fromkeys(chosen, 0)
        self.crc = dict.fromkeys(chosen, 0)
        self.done = 0  # bytes of every block decoded (the rings may reuse what lies below)
        self.failed: dict[int, str] = {}
        self.decoded_crc = dict.fromkeys(self.missing, 0)
        self.cv = threading.Condition()

    def _sink(self, i: int) -> Sink:
        bs, k, out = self.bs, self.k, self.out
        ring = self.rings.get(i)
        rb = self.ring_bytes

        def write(off: int, chunk: memoryview) -> None:
            n = chunk.nbytes
            if off != self.got[i] or off + n > bs or n > rb:
                raise CorruptDataError(f"chunk [{off}, +{n}) out of order or past the end")
            self.crc[i] = crc32c.crc32c(chunk, self.crc[i])
            if ring is None:
                out[i * bs + off: i * bs + off + n] = chunk
            else:
                with self.cv:
                    while off + n - self.done > rb and not self.failed:
                        self.cv.wait()
                    if self.failed:
                        raise _Abort()
                r = off % rb
                first = min(n, rb - r)
                ring[r: r + first] = chunk[:first]
                if n > first:
                    ring[: n - first] = chunk[first:]
            with self.cv:
                self.got[i] = off + n
                self.cv.notify_all()
                if self.failed:
                    raise _Abort()

        return write

    def _fetch(self, i: int) -> None:
        host = self.rec.placement[i]
        problem = None
        try:
            size = _stream(self.sources[host], "block", (*self.rec.key, i), self._sink(i),
                           self.bs)
        except _Abort:
            return
        except CorruptDataError:
            problem = f"block {i} on host {host} corrupt: excluded"
        except MonolithError as exc:
            problem = f"block {i}: host {host} unavailable ({type(exc).__name__})"
        except Exception as exc:  # never leave the decoder waiting
            problem = f"block {i}: reading from host {host} failed ({type(exc).__name__}: {exc})"
        else:
            if size is None:
                problem = f"block {i}: missing on host {host}"
            elif size != self.bs or self.crc[i] != self.rec.block_crcs[i]:
                problem = f"block {i} on host {host} corrupt: excluded"
        if problem is not None:
            with self.cv:
                self.failed[i] = problem
                self.cv.notify_all()

    def _view(self, i: int, lo: int, hi: int) -> memoryview:
        if i < self.k:
            return self.out[i * self.bs + lo: i * self.bs + hi]
        r = lo % self.ring_bytes
        return self.rings[i][r: r + hi - lo]

    def run(self) -> dict[int, str]:
        threads = [threading.Thread(target=self._fetch, args=(i,), daemon=True,
                                    name=f"fetch-block-{i}") for i in self.chosen]
        for t in threads:
            t.start()
        dec = zfec.Decoder(self.k, self.rec.m) if self.missing else None
        nums = tuple(self.chosen)
        lo = 0
        try:
            while lo < self.bs:
                hi = min(lo + STRIPE, self.bs) if dec is not None else self.bs
                with self.cv:
                    while not self.failed and min(self.got.values()) < hi:
                        self.cv.wait()
                    if self.failed:
                        break
                if dec is not None:
                    got = dec.decode([self._view(i, lo, hi) for i in self.chosen], nums)
                    for d in self.missing:
                        self.decoded_crc[d] = crc32c.crc32c(got[d], self.decoded_crc[d])
                        self.out[d * self.bs + lo: d * self.bs + hi] = got[d]
                with self.cv:
                    self.done = hi
                    self.cv.notify_all()
                lo = hi
        finally:
            for t in threads:
                t.join()
        return dict(self.failed)

    def bad_decoded(self) -> list[int]:
        """Decoded data blocks whose bytes do not match their sealed crc32c."""
        return [d for d in self.missing if self.decoded_crc[d] != self.rec.block_crcs[d]]


def fetch_decoded(sources: Mapping[int, Any], rec: PartRecord, why: list[str],
                  used: list[int] | None = None) -> memoryview | None:
    """The part rebuilt from any ``rec.k`` valid blocks of the hosts in its placement
    (data blocks preferred: with all of them there is nothing to decode); ``None``
    (reasons in ``why``) when fewer than ``k`` remain. Every data block of the result,
    received or decoded, matched its sealed crc32c. ``used`` receives the indices of the
    blocks it was built from."""
    k, m, bs = rec.k, rec.m, rec.block_size
    excluded: set[int] = set()
    for i in range(m):
        if sources.get(rec.placement[i]) is None:
            why.append(f"block {i}: host {rec.placement[i]} not in the group")
            excluded.add(i)
    out: memoryview | None = None
    while True:
        cands = [i for i in sorted(range(m), key=lambda i: (i >= k, i)) if i not in excluded]
        if len(cands) < k:
            why.append(f"only {len(cands)} of the {k} blocks needed")
            return None
        if out is None:
            out = new_buffer(k * bs)
        pipe = _Pipeline(sources, rec, cands[:k], out)
        failed = pipe.run()
        if not failed:
            bad = pipe.bad_decoded()
            if bad:  # every block used passed its crc: the manifest's crcs disagree
                why.append(f"decoded blocks {bad} fail their sealed crc32c")
                return None
            if used is not None:
                used[:] = cands[:k]
            return out[: rec.size]
        for i, problem in sorted(failed.items()):
            why.append(problem)
            excluded.add(i)


# -- parts composed while their rows stream in (no buffer for the rows) -----------------------

_LAZY = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
_HEAD = 64 << 10  # first read of a part: the frame prefix and (usually) its whole header
_GAP = 64 << 10   # arrays closer than this are read in one range


@njit(cache=True, nogil=True)
def _scatter_rows(out, dest_rows, src, src_rows, base):  # type: ignore[no-untyped-def]
    """out[dest_rows[t]] = src[src_rows[t] - base] (2-D arrays of one width)."""
    w = src.shape[1]
    for t in range(src_rows.shape[0]):
        o = dest_rows[t]
        r = src_rows[t] - base
        for j in range(w):
            out[o, j] = src[r, j]


class RowTarget:
    """Rows of one array of a part to write elsewhere as they stream past: row
    ``src_rows[t]`` (increasing) of the array goes to row ``dest_rows[t]`` of ``out``."""

    def __init__(self, start: int, nrows: int, out: np.ndarray, src_rows: np.ndarray,
                 dest_rows: np.ndarray) -> None:
        self.start, self.nrows, self.out = start, nrows, out
        self.row_bytes = out.shape[1] * out.dtype.itemsize
        self.end = start + nrows * self.row_bytes
        self.src_rows = np.ascontiguousarray(src_rows, dtype=np.int64)
        self.dest_rows = np.ascontiguousarray(dest_rows, dtype=np.int64)
        self.carry = np.empty(self.row_bytes, dtype=np.uint8)  # a row split between chunks

    def _put(self, rows: np.ndarray, first: int) -> None:
        """Scatter the needed ones of rows ``first .. first + len(rows)``."""
        i0, i1 = np.searchsorted(self.src_rows, (first, first + rows.shape[0]))
        if i1 > i0:
            _scatter_rows(self.out, self.dest_rows[i0:i1], rows, self.src_rows[i0:i1], first)

    def feed(self, pos: int, data: np.ndarray) -> None:
        """Bytes ``data`` (uint8) at part offset ``pos``; called in increasing order."""
        a, b = max(pos, self.start), min(pos + data.shape[0], self.end)
        if a >= b:
            return
        rel, w = a - self.start, self.row_bytes
        seg = data[a - pos: b - pos]
        head = (-rel) % w  # bytes that finish the row split at the previous chunk's end
        if head:
            done = rel % w
            n = min(head, seg.shape[0])
            self.carry[done: done + n] = seg[:n]
            if done + n == w:
                self._put(self.carry.view(self.out.dtype).reshape(1, -1), rel // w)
            seg, rel = seg[n:], rel + n
        full = seg.shape[0] // w
        if full:
            rows = seg[: full * w].view(self.out.dtype).reshape(full, -1)
            self._put(rows, rel // w)
        tail = seg.shape[0] - full * w
        if tail:
            self.carry[:tail] = seg[full * w:]


class SparsePart:
    """A part on the peers of which only the header and the arrays a composition needs
    whole (row metadata, live keys, small arrays) were read, into a buffer whose other
    pages were never touched; :meth:`fill` streams the data blocks once more, checks
    every byte against the sealed block crc32c and the bytes read before, and hands the
    row arrays' rows to their :class:`RowTarget` as they pass."""

    def __init__(self, rec: PartRecord, buf: Any, view: memoryview,
                 entries: dict[str, tuple[int, int]], read: list[tuple[int, int]]) -> None:
        self.rec, self._buf, self.view = rec, buf, view
        self.entries = entries  # array name -> (part offset, bytes)
        self.read = read        # part byte ranges read, sorted, disjoint

    def fill(self, sources: Mapping[int, Any], targets: list[RowTarget]) -> None:
        """Stream data blocks ``0 .. k-1`` in order into ``targets``; raises
        :class:`CorruptDataError` (a block that fails its crc, or bytes that differ from
        those read before) or :class:`MonolithError` (a host gone)."""
        rec, bs = self.rec, self.rec.block_size
        mine = np.frombuffer(self.view, dtype=np.uint8)
        targets = sorted(targets, key=lambda t: t.start)
        for i in range(rec.k):
            base = i * bs
            state = {"crc": 0, "pos": 0}

            def sink(off: int, chunk: memoryview, base: int = base,
                     state: dict[str, int] = state) -> None:
                n = chunk.nbytes
                if off != state["pos"] or off + n > bs:
                    raise CorruptDataError(f"chunk [{off}, +{n}) out of order or past the end")
                state["crc"] = crc32c.crc32c(chunk, state["crc"])
                state["pos"] = off + n
                p0, p1 = base + off, base + off + n
                data = np.frombuffer(chunk, dtype=np.uint8)
                for a, b in self.read:
                    lo, hi = max(a, p0), min(b, p1)
                    if lo < hi and not np.array_equal(data[lo - p0: hi - p0], mine[lo:hi]):
                        raise CorruptDataError("bytes differ from those read before")
                for t in targets:
                    if t.start < p1 and t.end > p0:
                        t.feed(p0, data)

            host = rec.placement[i]
            src = sources.get(host)
            if src is None:
                raise CorruptDataError(f"block {i}: host {host} not in the group")
            size = _stream(src, "block", (*rec.key, i), sink, bs)
            if size is None:
                raise CorruptDataError(f"block {i}: missing on host {host}")
            if size != bs or state["crc"] != rec.block_crcs[i]:
                raise CorruptDataError(f"block {i} on host {host} corrupt")


def _read_range(sources: Mapping[int, Any], rec: PartRecord, out: memoryview,
                lo: int, hi: int) -> None:
    """Part bytes ``[lo, hi)`` into ``out[lo:hi]`` from the data blocks that hold them."""
    bs = rec.block_size
    while lo < hi:
        i = lo // bs
        end = min(hi, (i + 1) * bs)
        src = sources[rec.placement[i]]
        fn = getattr(src, "read_block_into", None)
        if fn is not None:
            ok = fn((*rec.key, i), lo - i * bs, out[lo:end])
        else:
            data = src.get_block((*rec.key, i), lo - i * bs, end - lo)
            ok = data is not None and len(data) == end - lo
            if ok:
                out[lo:end] = data
        if not ok:
            raise CorruptDataError(f"block {i} missing on host {rec.placement[i]}")
        lo = end


def fetch_sparse(sources: Mapping[int, Any], rec: PartRecord, why: list[str],
                 want: Callable[[str], bool], min_bytes: int = 4 * _HEAD) -> SparsePart | None:
    """Read the header of a part and its arrays ``want(name)`` from the hosts of its data
    blocks (no decoding: every data block must be reachable); ``None`` (reason in
    ``why``) when one is not, or when the part is smaller than ``min_bytes``. The bytes read
    are verified later, by :meth:`SparsePart.fill`."""
    from monolith_py.wire import decode_arrays

    hosts = [rec.placement[i] for i in range(rec.k)]
    if any(sources.get(h) is None for h in hosts):
        why.append(f"data blocks not all reachable (hosts {hosts})")
        return None
    size = rec.size
    if size < max(min_bytes, 16):
        why.append("small part: read whole")
        return None
    buf = mmap.mmap(-1, rec.k * rec.block_size, flags=_LAZY)  # pages touched only if read
    view = memoryview(buf)[:size]
    try:
        head = min(size, _HEAD)
        _read_range(sources, rec, view, 0, head)
        header_len = int.from_bytes(view[8:12], "little")
        end = min(size, 16 + header_len)
        if end > head:
            _read_range(sources, rec, view, head, end)
        arrays, _ = decode_arrays(view, require_checksum=True, verified=True)
        start = np.frombuffer(view, dtype=np.uint8).ctypes.data
        entries = {name: (int(a.__array_interface__["data"][0] - start) if a.nbytes else 0,
                          int(a.nbytes)) for name, a in arrays.items()}
        del arrays
        read, done = [(0, end)], end  # part bytes [0, done) read so far
        for lo, hi in sorted((lo, lo + n) for name, (lo, n) in entries.items()
                             if n and want(name)):
            if hi <= done:
                continue
            if lo - done < _GAP:  # close to the last range: extend it
                _read_range(sources, rec, view, done, hi)
                read[-1] = (read[-1][0], hi)
            else:
                _read_range(sources, rec, view, lo, hi)
                read.append((lo, hi))
            done = hi
    except MonolithError as exc:
        why.append(f"sparse read failed ({type(exc).__name__}: {exc})")
        return None
    return SparsePart(rec, buf, view, entries, read)
