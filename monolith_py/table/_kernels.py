"""Compiled kernels of the cuckoo index (private).

Layout: the index is one flat ``int64`` array of ``num_buckets * 8`` words, 64-byte
aligned, so one bucket is exactly one cache line: 4 keys followed by their 4 values.
An empty slot holds the key :data:`EMPTY` (``INT64_MIN``, reserved).

Every key has two candidate buckets, taken from the two 32-bit halves of one 64-bit mix
of the key, reduced to ``[0, num_buckets)`` by a multiply-shift (so ``num_buckets`` need
not be a power of two). Lookups prefetch both buckets of the key ``_PF`` positions ahead,
which hides most of the memory latency on large maps.

Inserts displace keys along the shortest path found by a bounded breadth-first search
over buckets. A kernel that cannot insert (the map reached its load limit, or no path was
found) returns the position it stopped at; the Python side grows the map and resumes.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

__all__: list[str] = []  # private module

EMPTY = np.int64(np.iinfo(np.int64).min)
SLOTS = 4
WIDTH = 8  # words per bucket: SLOTS keys then SLOTS values
_PF = 20  # prefetch distance (keys ahead)
_CHUNK = 8192  # keys per parallel work item
_QMAX = 1024  # BFS queue size (buckets)

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_LO32 = np.uint64(0xFFFFFFFF)
_S29 = np.uint64(29)
_S31 = np.uint64(31)
_S32 = np.uint64(32)


def _emit_prefetch(builder, ptr, write):  # type: ignore[no-untyped-def]
    i8p = ir.IntType(8).as_pointer()
    i32 = ir.IntType(32)
    fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
    fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
    args = [builder.bitcast(ptr, i8p), ir.Constant(i32, write), ir.Constant(i32, 3),
            ir.Constant(i32, 1)]
    builder.call(fn, args)


@intrinsic
def _prefetch(typingctx, arr, idx):  # type: ignore[no-untyped-def]
    """Hint the CPU to load ``arr[idx]`` into cache (no effect on results)."""
    sig = types.void(arr, idx)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1]], wraparound=False)
        _emit_prefetch(builder, ptr, write=0)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _prefetch_w(typingctx, arr, idx):  # type: ignore[no-untyped-def]
    """Like :func:`_prefetch`, announcing a write (the line is fetched for ownership)."""
    sig = types.void(arr, idx)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1]], wraparound=False)
        _emit_prefetch(builder, ptr, write=1)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def prefetch_row(typingctx, arr, row):  # type: ignore[no-untyped-def]
    """Hint the CPU to load the start of row ``row`` of the 2-D array ``arr``."""
    sig = types.void(arr, row)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        aryty, rowty = signature.args
        ary = context.make_array(aryty)(context, builder, args[0])
        zero = context.get_constant(rowty, 0)
        ptr = cgutils.get_item_pointer(
            context, builder, aryty, ary, [args[1], zero], wraparound=False
        )
        _emit_prefetch(builder, ptr, write=1)
        return context.get_dummy_value()

    return sig, codegen


@njit(inline="always")
def mix64(k):  # type: ignore[no-untyped-def]
    """A 64-bit bijective mix of ``k`` (the splitmix64 finalizer)."""
    h = np.uint64(k)
    h ^= h >> _S31
    h *= _M1
    h ^= h >> _S29
    h *= _M2
    h ^= h >> _S32
    return h


@njit(inline="always")
def bucket_pair(k, nb, salt):  # type: ignore[no-untyped-def]
    """The two candidate buckets of key ``k`` in a map of ``nb`` (uint64) buckets whose
    hash is salted with ``salt`` (uint64)."""
    h = mix64(np.uint64(k) ^ salt)
    b1 = np.int64(((h >> _S32) * nb) >> _S32)
    b2 = np.int64(((h & _LO32) * nb) >> _S32)
    if b2 == b1:
        b2 = b1 + 1
        if b2 == np.int64(nb):
            b2 = 0
    return b1, b2


@njit(inline="always")
def _probe(tab, base, k):  # type: ignore[no-untyped-def]
    """Slot of ``k`` in the bucket starting at word ``base``, or -1."""
    r = -1
    for s in range(SLOTS):
        if tab[base + s] == k:
            r = s
    return r


@njit(inline="always")
def _free_slot(tab, base):  # type: ignore[no-untyped-def]
    for s in range(SLOTS):
        if tab[base + s] == EMPTY:
            return s
    return -1


@njit(inline="always")
def _free_count(tab, base):  # type: ignore[no-untyped-def]
    c = 0
    for s in range(SLOTS):
        if tab[base + s] == EMPTY:
            c += 1
    return c


@njit(inline="always")
def _locate(tab, nb, salt, k):  # type: ignore[no-untyped-def]
    """Word index of ``k``'s key slot, or -1."""
    b1, b2 = bucket_pair(k, nb, salt)
    base = b1 * WIDTH
    s = _probe(tab, base, k)
    if s >= 0:
        return base + s
    base = b2 * WIDTH
    s = _probe(tab, base, k)
    if s >= 0:
        return base + s
    return -1


@njit(inline="always")
def _prefetch_key(tab, nb, salt, k):  # type: ignore[no-untyped-def]
    b1, b2 = bucket_pair(k, nb, salt)
    _prefetch(tab, b1 * WIDTH)
    _prefetch(tab, b2 * WIDTH)


@njit(inline="always")
def _prefetch_key_w(tab, nb, salt, k):  # type: ignore[no-untyped-def]
    b1, b2 = bucket_pair(k, nb, salt)
    _prefetch_w(tab, b1 * WIDTH)
    _prefetch_w(tab, b2 * WIDTH)


@njit(inline="always")
def _find_range(tab, salt, keys, out, default, lo, hi):  # type: ignore[no-untyped-def]
    nb = np.uint64(tab.shape[0] // WIDTH)
    bad = 0
    for i in range(lo, min(hi, lo + _PF)):
        _prefetch_key(tab, nb, salt, keys[i])
    for i in range(lo, hi):
        j = i + _PF
        if j < hi:
            _prefetch_key(tab, nb, salt, keys[j])
        k = keys[i]
        w = _locate(tab, nb, salt, k)
        if k == EMPTY:
            bad += 1
            w = -1
        out[i] = tab[w + SLOTS] if w >= 0 else default
    return bad


@njit(cache=True)
def find_serial(tab, salt, keys, out, default):  # type: ignore[no-untyped-def]
    """out[i] = value of keys[i] or ``default``; returns the number of reserved keys."""
    return _find_range(tab, salt, keys, out, default, 0, keys.shape[0])


@njit(cache=True, parallel=True)
def find_parallel(tab, salt, keys, out, default):  # type: ignore[no-untyped-def]
    """:func:`find_serial` over chunks of keys on all threads."""
    n = keys.shape[0]
    nch = (n + _CHUNK - 1) // _CHUNK
    bad = 0
    for c in prange(nch):
        lo = c * _CHUNK
        bad += _find_range(tab, salt, keys, out, default, lo, min(n, lo + _CHUNK))
    return bad


@njit(inline="always")
def _bfs_place(tab, nb, salt, b1, b2, k, v, queue):  # type: ignore[no-untyped-def]
    """Insert (k, v), both buckets being full, by moving keys along the shortest path of
    displacements to a free slot. Returns False when no path of the bounded search
    exists (nothing has been moved then)."""
    qb = queue[0]
    qp = queue[1]
    qs = queue[2]
    qb[0] = b1
    qp[0] = -1
    qs[0] = -1
    qb[1] = b2
    qp[1] = -1
    qs[1] = -1
    head = 0
    tail = 2
    alts = queue[3]
    # compute and prefetch the alternative buckets of both roots' keys at once
    for q in range(2):
        base = qb[q] * WIDTH
        for s in range(SLOTS):
            c1, c2 = bucket_pair(tab[base + s], nb, salt)
            alt = c2 if c1 == qb[q] else c1
            alts[q * SLOTS + s] = alt
            _prefetch(tab, alt * WIDTH)
    while head < tail:
        b = qb[head]
        base = b * WIDTH
        if head >= 2:
            for s in range(SLOTS):
                c1, c2 = bucket_pair(tab[base + s], nb, salt)
                alt = c2 if c1 == b else c1
                alts[s] = alt
                _prefetch(tab, alt * WIDTH)
            off = 0
        else:
            off = head * SLOTS
        for s in range(SLOTS):
            alt = alts[off + s]
            e = _free_slot(tab, alt * WIDTH)
            if e >= 0:
                # Found: shift every key of the path one step, from the end backwards.
                dst = alt * WIDTH + e
                src = base + s
                tab[dst] = tab[src]
                tab[dst + SLOTS] = tab[src + SLOTS]
                cur = head
                cs = s
                while qp[cur] >= 0:
                    p = qp[cur]
                    ps = qs[cur]
                    dst = qb[cur] * WIDTH + cs
                    src = qb[p] * WIDTH + ps
                    tab[dst] = tab[src]
                    tab[dst + SLOTS] = tab[src + SLOTS]
                    cur = p
                    cs = ps
                dst = qb[cur] * WIDTH + cs
                tab[dst] = k
                tab[dst + SLOTS] = v
                return True
            if tail < qb.shape[0]:
                qb[tail] = alt
                qp[tail] = head
                qs[tail] = s
                tail += 1
        head += 1
    return False


@njit(inline="always")
def _place_new(tab, nb, salt, k, v, queue):  # type: ignore[no-untyped-def]
    """Insert a key known to be absent; False when it does not fit."""
    b1, b2 = bucket_pair(k, nb, salt)
    # the emptier of the two buckets (ties: the first) keeps buckets balanced, which
    # postpones the need for displacements to much higher loads
    f1 = _free_count(tab, b1 * WIDTH)
    f2 = _free_count(tab, b2 * WIDTH)
    if f1 == 0 and f2 == 0:
        return _bfs_place(tab, nb, salt, b1, b2, k, v, queue)
    base = b1 * WIDTH if f1 >= f2 else b2 * WIDTH
    e = _free_slot(tab, base)
    tab[base + e] = k
    tab[base + e + SLOTS] = v
    return True


@njit(cache=True)
def upsert(tab, salt, keys, values, start, size, limit, mode, out, inserted, queue):  # type: ignore[no-untyped-def]
    """Insert or update ``keys[start:]`` in order.

    ``mode`` 0 (insert_or_assign): present keys get ``values[i]``.
    ``mode`` 1 (find_or_insert): present keys keep their value; ``out[i]`` receives the
    value of ``keys[i]`` after the call and ``inserted[i]`` whether it was new.
    Inserting stops before the map would exceed ``limit`` keys or when no displacement
    path is found. Returns ``(next position, size)``: position ``len(keys)`` means done.
    """
    nb = np.uint64(tab.shape[0] // WIDTH)
    n = keys.shape[0]
    for i in range(start, min(n, start + _PF)):
        _prefetch_key_w(tab, nb, salt, keys[i])
    for i in range(start, n):
        j = i + _PF
        if j < n:
            _prefetch_key_w(tab, nb, salt, keys[j])
        k = keys[i]
        w = _locate(tab, nb, salt, k)
        if w >= 0:
            if mode == 0:
                tab[w + SLOTS] = values[i]
            else:
                out[i] = tab[w + SLOTS]
                inserted[i] = False
            continue
        if size >= limit:
            return i, size
        if not _place_new(tab, nb, salt, k, values[i], queue):
            return i, size
        size += 1
        if mode == 1:
            out[i] = values[i]
            inserted[i] = True
    return n, size


@njit(cache=True)
def rehash(old, new, salt, queue):  # type: ignore[no-untyped-def]
    """Insert every key of ``old`` into the empty map ``new``; False if one did not fit."""
    nb = np.uint64(new.shape[0] // WIDTH)
    nob = old.shape[0] // WIDTH
    ahead = 2
    for b in range(nob):
        if b + ahead < nob:
            pbase = (b + ahead) * WIDTH
            for s in range(SLOTS):
                kk = old[pbase + s]
                if kk != EMPTY:
                    _prefetch_key(new, nb, salt, kk)
        base = b * WIDTH
        for s in range(SLOTS):
            k = old[base + s]
            if k != EMPTY:
                if not _place_new(new, nb, salt, k, old[base + s + SLOTS], queue):
                    return False
    return True


@njit(cache=True)
def erase(tab, salt, keys, mask):  # type: ignore[no-untyped-def]
    """Remove keys in order; ``mask[i]`` = whether keys[i] was present. Returns count."""
    nb = np.uint64(tab.shape[0] // WIDTH)
    n = keys.shape[0]
    removed = 0
    for i in range(min(n, _PF)):
        _prefetch_key(tab, nb, salt, keys[i])
    for i in range(n):
        j = i + _PF
        if j < n:
            _prefetch_key(tab, nb, salt, keys[j])
        w = _locate(tab, nb, salt, keys[i])
        if w >= 0:
            tab[w] = EMPTY
            mask[i] = True
            removed += 1
        else:
            mask[i] = False
    return removed


@njit(cache=True)
def export(tab, keys_out, values_out):  # type: ignore[no-untyped-def]
    """Copy every (key, value) into the outputs (bucket order); returns the count."""
    nb = tab.shape[0] // WIDTH
    c = 0
    for b in range(nb):
        base = b * WIDTH
        for s in range(SLOTS):
            k = tab[base + s]
            if k != EMPTY:
                keys_out[c] = k
                values_out[c] = tab[base + s + SLOTS]
                c += 1
    return c


@njit(cache=True)
def bucket_pairs(keys, num_buckets, salt, out):  # type: ignore[no-untyped-def]
    """Candidate buckets of each key (used by tests to check crafted collisions)."""
    nb = np.uint64(num_buckets)
    for i in range(keys.shape[0]):
        b1, b2 = bucket_pair(keys[i], nb, salt)
        out[i, 0] = b1
        out[i, 1] = b2


@njit(cache=True, parallel=True)
def rehash_stream(old, new, salt, obounds, nbounds, dkeys, dvals, dcount):  # type: ignore[no-untyped-def]
    """Parallel, streaming part of a rehash from ``old`` into the *unfilled* ``new``.

    Part ``p`` owns old buckets ``[obounds[p], obounds[p+1])`` and new buckets
    ``[nbounds[p], nbounds[p+1])``: it marks its new buckets empty, then moves each key to
    the new bucket of the same hash choice that placed it (or else its other bucket) when
    that bucket is its own and has room. Because buckets are a monotone function of the
    hash, targets are mostly sequential and parts never write outside their range. Keys
    that do not fit are deferred to ``dkeys[p]``/``dvals[p]``; ``dcount[p]`` is their
    number, or -1 if the part's deferral buffer overflowed.
    """
    nbo = np.uint64(old.shape[0] // WIDTH)
    nbn = np.uint64(new.shape[0] // WIDTH)
    parts = obounds.shape[0] - 1
    cap = dkeys.shape[1]
    for p in prange(parts):
        lo = nbounds[p]
        hi = nbounds[p + 1]
        for w in range(lo * WIDTH, hi * WIDTH, WIDTH):
            for s in range(SLOTS):
                new[w + s] = EMPTY
        cnt = 0
        for b in range(obounds[p], obounds[p + 1]):
            base = b * WIDTH
            for s in range(SLOTS):
                k = old[base + s]
                if k == EMPTY:
                    continue
                v = old[base + s + SLOTS]
                o1, o2 = bucket_pair(k, nbo, salt)
                n1, n2 = bucket_pair(k, nbn, salt)
                t1 = n1 if o1 == b else n2
                t2 = n2 if o1 == b else n1
                placed = False
                if lo <= t1 < hi:
                    e = _free_slot(new, t1 * WIDTH)
                    if e >= 0:
                        new[t1 * WIDTH + e] = k
                        new[t1 * WIDTH + e + SLOTS] = v
                        placed = True
                if not placed and lo <= t2 < hi:
                    e = _free_slot(new, t2 * WIDTH)
                    if e >= 0:
                        new[t2 * WIDTH + e] = k
                        new[t2 * WIDTH + e + SLOTS] = v
                        placed = True
                if not placed:
                    if cnt < cap:
                        dkeys[p, cnt] = k
                        dvals[p, cnt] = v
                    cnt += 1
        dcount[p] = cnt if cnt <= cap else -1


@njit(cache=True)
def place_deferred(new, salt, dkeys, dvals, dcount, queue):  # type: ignore[no-untyped-def]
    """Serial end of :func:`rehash_stream`: insert the deferred keys. False if one did
    not fit."""
    nb = np.uint64(new.shape[0] // WIDTH)
    for p in range(dcount.shape[0]):
        for i in range(dcount[p]):
            if not _place_new(new, nb, salt, dkeys[p, i], dvals[p, i], queue):
                return False
    return True
