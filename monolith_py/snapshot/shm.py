"""Shared-memory segments owned by an SMP: files in a tmpfs directory, mapped by both sides.

An SMP keeps every part and block it stores in a :class:`Segment` — a file under its own
directory (default ``/dev/shm/monolith-<job>-h<host>``) mapped with ``MAP_POPULATE``.
Segments are recycled: a freed segment keeps its pages and is handed out again for a
request of similar size, so the copy into it runs at memcpy speed instead of paying a page
fault per 4 KiB (1.5–3.5 s per GB on the machines we measured). A participant on the same
host maps a leased segment by path (:func:`attach`) and writes its part directly into it.

Files, not ``multiprocessing.shared_memory``: the latter's resource tracker unlinks
segments when an attaching process exits (Python < 3.13), and an SMP must decide alone.
A restarted SMP removes what a previous incarnation left in its directory.

Example::

    >>> import tempfile
    >>> pool = SegmentPool(tempfile.mkdtemp())
    >>> seg = pool.create(10_000)
    >>> with attach(seg.path, seg.capacity) as m:
    ...     m[:5] = b"hello"
    >>> bytes(seg.view[:5])
    b'hello'
    >>> pool.release(seg); pool.close()
"""

from __future__ import annotations

import collections
import itertools
import logging
import mmap
import os
import re
import shutil
import threading
from dataclasses import dataclass, field
from typing import Any

from monolith_py.errors import ConfigError, InvalidInputError

__all__ = ["Segment", "SegmentPool", "attach", "default_shm_root", "SEGMENT_NAME"]

log = logging.getLogger("monolith.snapshot.shm")

SEGMENT_NAME = re.compile(r"^seg-[0-9]{1,12}-[0-9a-f]{8}$")
_PAGE = mmap.PAGESIZE
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


def default_shm_root() -> str:
    """``/dev/shm`` when it exists (tmpfs), else the temp directory."""
    return "/dev/shm" if os.path.isdir("/dev/shm") else os.environ.get("TMPDIR", "/tmp")


_CLASS_BITS = 4  # size classes per doubling above _CLASS_MIN: 16 (at most 6.25 % slack)
_CLASS_MIN = 1 << 22


def _round(n: int) -> int:
    """The capacity of a segment for ``n`` bytes: whole pages, and above 4 MiB the next of
    16 size classes per doubling. A part that grew a little since the one before it (a
    table gains keys; a compaction's full part) then still fits the segment that one
    freed, instead of faulting in a new one."""
    n = max(_PAGE, -(-int(n) // _PAGE) * _PAGE)
    if n <= _CLASS_MIN:
        return n
    step = 1 << (n.bit_length() - 1 - _CLASS_BITS)
    return -(-n // step) * step


def _fits(want: int, capacity: int) -> bool:
    """A free segment serves a request of ``want`` (rounded) bytes up to 1.25x its size (4
    size classes): a looser fit lets small parts take the segments large ones need next
    (a compaction's full part)."""
    return want <= capacity <= want + (want >> 2)


def _map(fd: int, size: int, writable: bool) -> mmap.mmap:
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    return mmap.mmap(fd, size, flags=mmap.MAP_SHARED | _POPULATE, prot=prot)


@dataclass(eq=False)
class Segment:
    """One mapped file. ``view`` is a writable ``memoryview`` of ``capacity`` bytes."""

    name: str
    path: str
    capacity: int
    _mm: mmap.mmap = field(repr=False)
    view: memoryview = field(repr=False)

    def close(self) -> None:
        try:
            self.view.release()
            self._mm.close()
        except (BufferError, ValueError):
            pass  # a view is still exported; the mapping goes with the process


class SegmentPool:
    """Creates, recycles and removes the segments of one SMP.

    Which free segments are kept follows demand: the pool remembers the sizes of its last
    ``history`` requests, and when it holds more than ``keep_free_bytes`` it removes first
    the free segments that would serve none of them (a lease grown once during a pause),
    those freed longest ago first; only then segments of sizes still asked for. A request
    that no free segment fits takes such an unwanted larger one before growing a smaller
    one by much.

    Args:
        directory: where segment files live (created; emptied of old segments).
        keep_free_bytes: bytes of released segments kept for reuse (the rest is removed).
        history: requests remembered (a compaction cycle of requests or more).
    """

    def __init__(self, directory: str, keep_free_bytes: int = 4 << 30,
                 history: int = 64) -> None:
        self.directory = os.path.abspath(directory)
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the segment directory {directory!r}: {exc}") from exc
        removed = 0
        for name in os.listdir(self.directory):
            if SEGMENT_NAME.match(name):
                os.unlink(os.path.join(self.directory, name))
                removed += 1
        if removed:
            log.info("removed %d segments left by a previous SMP in %s", removed, self.directory)
        self.keep_free_bytes = int(keep_free_bytes)
        self._free: list[Segment] = []
        self._live: dict[str, Segment] = {}
        self._ids = itertools.count(1)
        self._asked: collections.deque[int] = collections.deque(maxlen=max(int(history), 1))
        self._lock = threading.Lock()
        self.created_bytes = 0  # new memory so far: segments created, and growth

    # -- allocation ---------------------------------------------------------------------------

    def create(self, nbytes: int) -> Segment:
        """A segment of at least ``nbytes``: the smallest free one up to 1.25× that size;
        else the largest free one below it, grown to the size (unless the pool could not
        keep the result) when that adds at most 1/8; else the smallest larger free one of
        a size no recent request had, or else the smallest one up to 1.5× the size (its
        slack costs memory for a while, new memory costs CPU now); else the grown one;
        else a new one."""
        if nbytes < 0:
            raise InvalidInputError(f"segment size must be >= 0, got {nbytes}")
        want = _round(nbytes)
        with self._lock:
            best = grow = spare = near = None
            for seg in self._free:
                if _fits(want, seg.capacity):
                    if best is None or seg.capacity < best.capacity:
                        best = seg
                elif seg.capacity < want <= self.keep_free_bytes:
                    if grow is None or seg.capacity > grow.capacity:
                        grow = seg
                elif seg.capacity > want and not self._wanted(seg.capacity):
                    if spare is None or seg.capacity < spare.capacity:
                        spare = seg
                elif want < seg.capacity <= want + (want >> 1):
                    if near is None or seg.capacity < near.capacity:
                        near = seg
            self._asked.append(want)
            if best is None and (grow is None or want - grow.capacity > want >> 3):
                best = spare or near  # no new memory at all, rather than much of it
            if best is not None:
                return self._lend_locked(best)
            if grow is not None:
                self._free.remove(grow)
        if grow is not None:
            try:
                seg = self._grow(grow, want)
            except (ConfigError, OSError):
                self._remove(grow)  # not reserved, or no longer mapped: gone either way
                raise
            new = want - grow.capacity
        else:
            seg = self._new(want)
            new = want
        with self._lock:
            self._live[seg.name] = seg
            self.created_bytes += new
            free = [s.capacity for s in self._free]
        log.log(logging.INFO if new >= 64 << 20 else logging.DEBUG,
                "%.1f MiB of new shared memory for a segment of %.1f MiB (free: %d segments, "
                "%.1f MiB, the largest %.1f MiB)", new / 2**20, want / 2**20, len(free),
                sum(free) / 2**20, max(free, default=0) / 2**20)
        return seg

    def take(self, nbytes: int) -> Segment | None:
        """A free segment that fits ``nbytes`` (as :meth:`create` picks it), or ``None``:
        never new memory."""
        want = _round(nbytes)
        with self._lock:
            fits = [seg for seg in self._free if _fits(want, seg.capacity)]
            if not fits:
                return None
            self._asked.append(want)
            return self._lend_locked(min(fits, key=lambda seg: seg.capacity))

    def _lend_locked(self, seg: Segment) -> Segment:
        self._free.remove(seg)
        self._live[seg.name] = seg
        return seg

    def _wanted(self, capacity: int) -> bool:
        """Whether a free segment of ``capacity`` would serve a recent request."""
        return any(_fits(w, capacity) for w in self._asked)

    def _reserve(self, fd: int, offset: int, size: int) -> None:
        try:
            os.posix_fallocate(fd, offset, size)  # reserve the pages now, not on first write
        except OSError as exc:
            raise ConfigError(
                f"cannot reserve {size} bytes of shared memory in {self.directory}: {exc}; "
                "free memory or lower the snapshot retention (keep)") from exc

    def _new(self, size: int) -> Segment:
        name = f"seg-{next(self._ids)}-{os.urandom(4).hex()}"
        path = os.path.join(self.directory, name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            try:
                self._reserve(fd, 0, size)
            except ConfigError:
                os.unlink(path)
                raise
            mm = _map(fd, size, writable=True)
        finally:
            os.close(fd)
        return Segment(name, path, size, mm, memoryview(mm))

    def _grow(self, seg: Segment, size: int) -> Segment:
        """``seg`` (free) extended to ``size`` bytes: only the extension is new memory, the
        pages it had are kept (on the VMs we measured, memory the guest has not touched
        lately faults in at up to 3 s per GiB; a part a little larger than every free
        segment then costs its growth, not its size)."""
        fd = os.open(seg.path, os.O_RDWR)
        try:
            self._reserve(fd, seg.capacity, size - seg.capacity)
            seg.close()
            mm = _map(fd, size, writable=True)
        finally:
            os.close(fd)
        return Segment(seg.name, seg.path, size, mm, memoryview(mm))

    def get(self, name: str) -> Segment | None:
        with self._lock:
            return self._live.get(name)

    def release(self, seg: Segment) -> None:
        """Return ``seg`` for reuse. Free segments beyond ``keep_free_bytes`` are removed:
        first those of sizes no recent request had, then the others; within each, those
        freed longest ago first (a compaction frees a whole cycle's segments at once, and
        the next cycle asks for the same sizes again)."""
        drop: list[Segment] = []
        with self._lock:
            if self._live.pop(seg.name, None) is None:
                return
            if seg.capacity > self.keep_free_bytes:
                drop.append(seg)
            else:
                self._free.append(seg)
            kept = sum(s.capacity for s in self._free)
            while self._free and kept > self.keep_free_bytes:
                old = next((s for s in self._free if not self._wanted(s.capacity)),
                           self._free[0])
                self._free.remove(old)
                kept -= old.capacity
                drop.append(old)
        for old in drop:
            self._remove(old)

    def _remove(self, seg: Segment) -> None:
        seg.close()
        try:
            os.unlink(seg.path)
        except FileNotFoundError:
            pass

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"live_segments": len(self._live),
                    "live_bytes": sum(s.capacity for s in self._live.values()),
                    "free_segments": len(self._free),
                    "free_bytes": sum(s.capacity for s in self._free),
                    "created_bytes": self.created_bytes}

    def close(self, remove_directory: bool = False) -> None:
        """Unmap and remove every segment."""
        with self._lock:
            segs = list(self._live.values()) + self._free
            self._live.clear()
            self._free = []
        for seg in segs:
            self._remove(seg)
        if remove_directory:
            shutil.rmtree(self.directory, ignore_errors=True)


class _Attached:
    def __init__(self, mm: mmap.mmap) -> None:
        self.mm = mm
        self.view = memoryview(mm)

    def __enter__(self) -> memoryview:
        return self.view

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.view.release()
            self.mm.close()
        except (BufferError, ValueError):
            pass


def attach(path: str, capacity: int, writable: bool = True, *,
           directory: str | None = None) -> _Attached:
    """Map a segment file (``MAP_POPULATE``: its pages are mapped now, not while the
    caller holds a lock). ``directory`` (if given) must contain ``path``; names are
    checked, so a hostile answer cannot make us map an arbitrary file."""
    name = os.path.basename(path)
    if not SEGMENT_NAME.match(name):
        raise InvalidInputError(f"not a segment name: {name!r}")
    if directory is not None and os.path.dirname(os.path.abspath(path)) != os.path.abspath(directory):
        raise InvalidInputError(f"segment {path!r} lies outside {directory!r}")
    fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size < capacity:
            raise InvalidInputError(f"segment {name} has {size} bytes, expected {capacity}")
        return _Attached(_map(fd, capacity, writable))
    finally:
        os.close(fd)
