"""Composition of a PS part chain (a full part, then increments) into a shard state.

Two phases per table, whatever the chain length:

1. **resolve** — the live keys of the newest part, sorted, each mapped to the newest part
   of the chain that captured its row (one merge pass per part against its sorted keys,
   newest first, in parallel ranges of the live keys); nothing large is allocated yet;
2. **fill** — the resolution is grouped by part, and each part's rows of every array (row
   records, weights, slots) are gathered by a compiled parallel kernel, straight into
   their destination: new arrays, a table's
   :meth:`~monolith_py.table.EmbeddingTable.staged_state` (``stage=``: the rows land in
   the arena the table then adopts, so a restore writes each byte of the state once), or
   the arrays of a part frame being written into a shared-memory segment
   (:func:`compose_frame`: an SMP's compaction, no intermediate state).

A chain of one key-sorted full part (what an SMP composes) without ``stage`` is returned
without copying its rows: the arrays are views of the part.

A live key that no part of the chain holds, or a row of the newest part that is not live,
means the chain is broken (a wrong base): :class:`CorruptDataError`, never a silent load.

Example::

    >>> import numpy as np
    >>> from monolith_py.ps import PSShard
    >>> from monolith_py.table import TableConfig
    >>> from monolith_py.snapshot.pspart import ShardCapturer, decode_part
    >>> shard = PSShard(0, 1, [TableConfig("t", dim=2)])
    >>> _ = shard.pull("t", np.arange(5), train=True)
    >>> cap = ShardCapturer(shard)
    >>> full = decode_part(bytes(cap.capture(1, 1, None).frame()))
    >>> shard.push("t", np.array([3]), np.ones((1, 2), np.float32), now=9)
    >>> inc = decode_part(bytes(cap.capture(2, 2, base_id=1).frame()))
    >>> state = compose([full, inc])
    >>> bool((state["tables"]["t"]["weights"] == shard.state_dict()["tables"]["t"]["weights"]).all())
    True
    >>> fresh = PSShard(0, 1, [TableConfig("t", dim=2)])   # compose into the table itself:
    >>> state = compose([full, inc], stage=lambda name, n: fresh.tables[name].staged_state(n))
    >>> fresh.load_state_dict(state)                        # adopts the rows, no copy
    >>> bool((fresh.pull("t", np.arange(5), False) == shard.pull("t", np.arange(5), False)).all())
    True
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, MutableMapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from numba import njit, prange

from monolith_py.errors import CorruptDataError
from monolith_py.snapshot.manifest import chain_break

if TYPE_CHECKING:
    from monolith_py.snapshot.pspart import DecodedPart, TablePart

__all__ = ["compose", "compose_frame", "shard_state", "apply_increment", "Stage"]

_SHARD_FORMAT = "monolith.ps_shard.v1"
_COUNTERS = ("admitted", "filtered", "evicted", "erased")

Stage = Callable[[str, int], Any]
"""``stage(table name, rows)``: a staged table state to compose into (an object with
``meta`` int64 ``[n, 4]``, ``weights``, ``slots`` and dict entries, e.g.
``EmbeddingTable.staged_state``), or ``None`` for new arrays."""


@njit(cache=True, parallel=True)
def _gather_into(out, src, out_rows, src_rows):  # type: ignore[no-untyped-def]
    """out[out_rows[t]] = src[src_rows[t]] for 2-D arrays."""
    w = src.shape[1]
    for t in prange(out_rows.shape[0]):
        o = out_rows[t]
        r = src_rows[t]
        for j in range(w):
            out[o, j] = src[r, j]


@njit(cache=True)
def _group_rows(src_part, src_row, parts):  # type: ignore[no-untyped-def]
    """The resolution grouped by part (a counting sort, two scans): part ``j``'s rows are
    ``out_rows[starts[j]:starts[j + 1]]`` (increasing) of the composed table, taken from its
    rows ``rows[...]`` (same range)."""
    n = src_part.shape[0]
    starts = np.zeros(parts + 1, dtype=np.int64)
    for t in range(n):
        starts[src_part[t] + 1] += 1
    for j in range(parts):
        starts[j + 1] += starts[j]
    fill = starts[:-1].copy()
    out_rows = np.empty(n, dtype=np.int64)
    rows = np.empty(n, dtype=np.int64)
    for t in range(n):
        j = src_part[t]
        k = fill[j]
        fill[j] = k + 1
        out_rows[k] = t
        rows[k] = src_row[t]
    return starts, out_rows, rows


@njit(cache=True, parallel=True)
def _keys_differ(meta, live):  # type: ignore[no-untyped-def]
    """Rows whose key column differs from ``live``."""
    bad = 0
    for t in prange(live.shape[0]):
        if meta[t, 0] != live[t]:
            bad += 1
    return bad


@njit(cache=True, parallel=True)
def _copy_into(out, src):  # type: ignore[no-untyped-def]
    """out[:] = src for 2-D arrays of the same shape (both threads share the pages)."""
    w = src.shape[1]
    for t in prange(src.shape[0]):
        for j in range(w):
            out[t, j] = src[t, j]


@njit(cache=True, parallel=True)
def _match_part(sk, order, live, src_part, src_row, j):  # type: ignore[no-untyped-def]
    """One merge pass of the increasing ``live`` keys against a part's increasing keys
    ``sk`` (its rows ``order``, or in order when ``order`` is empty): live keys not yet
    resolved to a newer part are resolved to part ``j``. The live keys are cut into ranges
    merged in parallel, each from its first key's place in ``sk``. Returns (keys of ``sk``
    found live, live keys newly resolved)."""
    n = sk.shape[0]
    m = live.shape[0]
    direct = order.shape[0] == 0
    ranges = min(16, m // 65536 + 1)
    found = 0
    new = 0
    for c in prange(ranges):
        lo = m * c // ranges
        hi = m * (c + 1) // ranges
        f = 0
        k = 0
        if lo < hi:
            i = np.searchsorted(sk, live[lo])
            for t in range(lo, hi):
                w = live[t]
                while i < n and sk[i] < w:
                    i += 1
                if i == n:
                    break
                if sk[i] == w:
                    f += 1
                    if src_part[t] < 0:
                        src_part[t] = j
                        src_row[t] = i if direct else order[i]
                        k += 1
        found += f
        new += k
    return found, new


_DIGIT = 11  # bits per radix pass: 2048 counters per digit stay in L1
_PASSES = 6  # 6 x 11 >= 64 bits


@njit(cache=True, nogil=True)
def _radix(keys, want_order):  # type: ignore[no-untyped-def]
    """``keys`` (int64) sorted by a least-significant-digit radix sort, and, with
    ``want_order``, the stable order that sorts them (else an empty array). One pass counts
    every digit; a digit all keys share (the high ones of small keys) is skipped. About
    4x numpy's sort of 2 M int64 keys here (24 against 116 ms for keys below 2^22, 78
    against 139 for keys over all 64 bits)."""
    n = keys.shape[0]
    flip = np.uint64(1) << np.uint64(63)  # signed order as unsigned order
    mask = np.uint64((1 << _DIGIT) - 1)
    src = np.empty(n, dtype=np.uint64)
    for i in range(n):
        src[i] = np.uint64(keys[i]) ^ flip
    counts = np.zeros((_PASSES, 1 << _DIGIT), dtype=np.int64)
    for i in range(n):
        v = src[i]
        for d in range(_PASSES):
            counts[d, (v >> np.uint64(_DIGIT * d)) & mask] += 1
    dst = np.empty(n, dtype=np.uint64)
    order = np.arange(n, dtype=np.int64) if want_order else np.empty(0, dtype=np.int64)
    spare = np.empty(n if want_order else 0, dtype=np.int64)
    for d in range(_PASSES):
        c = counts[d]
        if c.max() == n:
            continue
        total = 0
        for b in range(c.shape[0]):
            t = c[b]
            c[b] = total
            total += t
        shift = np.uint64(_DIGIT * d)
        for i in range(n):
            v = src[i]
            b = (v >> shift) & mask
            at = c[b]
            c[b] = at + 1
            dst[at] = v
            if want_order:
                spare[at] = order[i]
        src, dst = dst, src
        if want_order:
            order, spare = spare, order
    out = np.empty(n, dtype=np.int64)
    for i in range(n):
        out[i] = np.int64(src[i] ^ flip)
    return out, order


@dataclass
class _Resolved:
    """Where each row of one composed table comes from.

    ``src_part is None``: every row comes from ``chain[0]`` in order (a single key-sorted
    full part); else row ``t`` is ``chain[src_part[t]]`` row ``src_row[t]``."""

    name: str
    chain: Sequence[TablePart]
    live: np.ndarray
    src_part: np.ndarray | None
    src_row: np.ndarray | None

    @property
    def rows(self) -> int:
        return int(self.live.shape[0])

    @property
    def newest(self) -> TablePart:
        return self.chain[-1]


def _sorted_index(keys: np.ndarray, is_sorted: bool) -> tuple[np.ndarray, np.ndarray | None]:
    if is_sorted:
        return np.ascontiguousarray(keys), None
    return _radix(np.ascontiguousarray(keys, dtype=np.int64), True)  # type: ignore[no-any-return]


def _resolve(name: str, chain: Sequence[TablePart], base_id: int) -> _Resolved:
    newest = chain[-1]
    first = chain[0]
    for tp in chain:
        if set(tp.slots) != set(newest.slots):
            raise CorruptDataError(f"table {name!r}: slots differ between chain parts "
                                   f"({sorted(tp.slots)} vs {sorted(newest.slots)})")
    if len(chain) == 1:
        keys = first.meta[:, 0]
        if first.sorted:
            if keys.shape[0] > 1 and not (np.diff(keys) > 0).all():
                raise CorruptDataError(f"table {name!r}: a sorted full part has unsorted keys")
            return _Resolved(name, chain, np.ascontiguousarray(keys), None, None)
        indices = [_sorted_index(keys, False)]
        live = indices[0][0]
        if live.shape[0] > 1 and not (np.diff(live) > 0).all():
            raise CorruptDataError(f"table {name!r}: duplicate keys in a full part")
    else:
        assert newest.live is not None
        # the increments' keys are sorted in another thread meanwhile (the radix kernel
        # releases the GIL)
        with ThreadPoolExecutor(1, thread_name_prefix="compose-sort") as pool:
            sorting = pool.submit(lambda: [_sorted_index(tp.meta[:, 0], tp.sorted)
                                           for tp in chain])
            live = _radix(np.ascontiguousarray(newest.live, dtype=np.int64), False)[0]
            indices = sorting.result()
        if live.shape[0] > 1 and not (np.diff(live) > 0).all():
            raise CorruptDataError(f"table {name!r}: duplicate live keys in an increment")
    n = live.shape[0]
    src_part = np.full(n, -1, dtype=np.int32)
    src_row = np.empty(n, dtype=np.int64)
    left = n
    no_order = np.empty(0, dtype=np.int64)
    for j in range(len(chain) - 1, -1, -1):
        if not left:
            break
        sk, order = indices[j]
        found, new = _match_part(sk, no_order if order is None else order,
                                 live, src_part, src_row, j)
        left -= new
        if j == len(chain) - 1 and len(chain) > 1 and found != sk.shape[0]:
            raise CorruptDataError(f"table {name!r}: the newest part captured rows that are "
                                   "not live")
    if left:
        raise CorruptDataError(
            f"table {name!r}: {left} live keys are in no part of the chain "
            f"(broken chain on base snapshot {base_id})")
    return _Resolved(name, chain, live, src_part, src_row)


Plan = dict[tuple[str, int], tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]]
"""``{(table, part index): (src_rows, dest_rows, weights, {slot: array})}``: for each part
whose row arrays were deferred, which of its rows (increasing) go to which rows of the
composed ``weights`` and slots."""


def _fill(res: _Resolved, meta: np.ndarray, weights: np.ndarray,
          slots: Mapping[str, np.ndarray], deferred: Collection[int] = (),
          plan: Plan | None = None) -> None:
    """Gather every row of ``res`` into ``meta`` ``[n, 4]``, ``weights``, ``slots``; the
    weights and slots of the parts in ``deferred`` are left to the caller (``plan``)."""
    if res.src_part is None:  # one key-sorted full part: a straight copy
        tp = res.chain[0]
        if res.rows:
            _copy_into(meta, tp.meta)
            if 0 in deferred:
                assert plan is not None
                every = np.arange(res.rows, dtype=np.int64)
                plan[(res.name, 0)] = (every, every, weights, dict(slots))
                return
            _copy_into(weights, tp.weights)
            for s, out in slots.items():
                _copy_into(out, tp.slots[s])
        return
    assert res.src_row is not None
    # grouped by part, each array is gathered once per part over that part's rows only
    # (a scan of the whole resolution per part and array cost 1.6x as much at 16 parts)
    starts, out_rows, rows = _group_rows(res.src_part, res.src_row, len(res.chain))
    for j, tp in enumerate(res.chain):
        lo, hi = int(starts[j]), int(starts[j + 1])
        if lo == hi:
            continue
        dest, src = out_rows[lo:hi], rows[lo:hi]
        _gather_into(meta, tp.meta, dest, src)
        if j in deferred:
            assert plan is not None
            order = np.argsort(src, kind="stable")
            plan[(res.name, j)] = (src[order], dest[order], weights, dict(slots))
            continue
        _gather_into(weights, tp.weights, dest, src)
        for s, out in slots.items():
            _gather_into(out, tp.slots[s], dest, src)
    if _keys_differ(meta, res.live):
        raise CorruptDataError(f"table {res.name!r}: composed keys do not match the live keys")


def _scalars(tp: TablePart) -> dict[str, Any]:
    sd: dict[str, Any] = {
        "format": tp.format, "name": tp.name, "dim": tp.dim, "optimizer": tp.optimizer,
        "version": tp.version, "clock": tp.clock,
        "pending": tp.pending.copy(), "deleted_keys": tp.deleted_keys.copy(),
        "deleted_versions": tp.deleted_versions.copy(),
    }
    if tp.filter is not None:
        sd["filter.counters"] = tp.filter.copy()
    for c in _COUNTERS:
        sd[f"stat.{c}"] = tp.counters[c]
    return sd


def _columns(sd: MutableMapping[str, Any], keys: np.ndarray, meta: np.ndarray,
             weights: np.ndarray, slots: Mapping[str, np.ndarray]) -> None:
    sd.update({"keys": keys, "weights": weights, "last_update": meta[:, 1],
               "update_count": meta[:, 2], "row_version": meta[:, 3]})
    for s, a in slots.items():
        sd[f"slot.{s}"] = a


def _table_state(res: _Resolved, stage: Stage | None, deferred: Collection[int] = (),
                 plan: Plan | None = None) -> MutableMapping[str, Any]:
    tp, n = res.newest, res.rows
    staged = stage(res.name, n) if stage is not None else None
    if staged is not None and (staged.meta.shape != (n, 4) or staged.weights.shape != (
            n, tp.dim) or {s: a.shape for s, a in staged.slots.items()} != {
            s: (n, a.shape[1]) for s, a in tp.slots.items()}):
        staged = None  # the part does not fit the table: new arrays (its load will say why)
    if staged is not None:
        _fill(res, staged.meta, staged.weights, staged.slots, deferred, plan)
        staged.update(_scalars(tp))
        staged["keys"] = res.live  # equal to the key column (checked by _fill), contiguous
        return staged  # type: ignore[no-any-return]
    sd = _scalars(tp)
    if res.src_part is None and 0 not in deferred:  # views of the part, no copy
        _columns(sd, res.live, tp.meta, tp.weights, dict(tp.slots))
        return sd
    meta = np.empty((n, 4), dtype=np.int64)
    weights = np.empty((n, tp.dim), dtype=np.float32)
    slots = {s: np.empty((n, a.shape[1]), dtype=np.float32) for s, a in tp.slots.items()}
    _fill(res, meta, weights, slots, deferred, plan)
    _columns(sd, res.live, meta, weights, slots)
    return sd


def _check_chain(chain: Sequence[DecodedPart]) -> None:
    problem = chain_break(chain)
    if problem is not None:
        raise CorruptDataError(problem)
    newest = chain[-1]
    for p in chain:
        if p.shard_id != newest.shard_id or set(p.tables) != set(newest.tables):
            raise CorruptDataError(
                f"chain mixes shards or tables: shard {p.shard_id} tables {sorted(p.tables)} "
                f"vs shard {newest.shard_id} tables {sorted(newest.tables)}")


def _resolve_all(chain: Sequence[DecodedPart]) -> list[_Resolved]:
    _check_chain(chain)
    newest = chain[-1]
    return [_resolve(name, [p.tables[name] for p in chain], newest.base_id)
            for name in newest.tables]


def compose(chain: Sequence[DecodedPart], stage: Stage | None = None, *,
            deferred: Collection[int] = (), plan: Plan | None = None) -> dict[str, Any]:
    """The shard state dict at the newest part of ``chain`` (a full part first, then the
    increments on top of it, oldest first).

    ``stage(name, rows)`` may return a staged table state to compose that table into (see
    the module docstring); the returned state then holds it for ``PSShard.load_state_dict``.
    ``deferred``: indices of chain parts whose weights and slots are not in memory (a
    restore streams them from the peers): their rows are not gathered but described in
    ``plan`` (see :data:`Plan`) for the caller to write.
    """
    if deferred and plan is None:
        raise ValueError("deferred parts need a plan to describe their rows")
    resolved = _resolve_all(chain)
    newest = chain[-1]
    return {"format": _SHARD_FORMAT, "shard_id": newest.shard_id,
            "num_shards": newest.num_shards, "routing_version": newest.routing_version,
            "tables": {r.name: _table_state(r, stage, deferred, plan) for r in resolved}}


def compose_frame(chain: Sequence[DecodedPart], snapshot_id: int, step: int,
                  alloc: Callable[[int], Any] | None = None,
                  extra_meta: Mapping[str, Any] | None = None) -> memoryview:
    """A full, key-sorted part frame of ``chain`` composed straight into the buffer
    ``alloc(nbytes)`` returns (a shared-memory segment; default a ``bytearray``): the same
    bytes as ``encode_shard_state(compose(chain), ...)`` without the intermediate state."""
    from monolith_py.snapshot.pspart import PS_PART_FORMAT, _table_specs

    resolved = _resolve_all(chain)
    newest = chain[-1]
    specs: list[tuple[str, Any, tuple[int, ...]]] = []
    tmeta = []
    smalls = []
    for i, r in enumerate(resolved):
        tp = r.newest
        small = {"pending": tp.pending, "dk": tp.deleted_keys, "dv": tp.deleted_versions}
        if tp.filter is not None:
            small["filter"] = tp.filter
        slots = {s: int(a.shape[1]) for s, a in tp.slots.items()}
        specs += _table_specs(i, tp.dim, slots, r.rows, None, small)
        tmeta.append({"name": r.name, "dim": int(tp.dim), "optimizer": tp.optimizer,
                      "format": tp.format, "slots": slots, "version": int(tp.version),
                      "clock": int(tp.clock),
                      "counters": {c: int(tp.counters[c]) for c in _COUNTERS},
                      "size": r.rows, "since": -1, "sorted": True})
        smalls.append(small)
    from monolith_py.wire import plan_frame

    meta = {"format": PS_PART_FORMAT, "kind": "full", "snapshot_id": int(snapshot_id),
            "step": int(step), "base_id": -1, "shard_id": int(newest.shard_id),
            "num_shards": int(newest.num_shards),
            "routing_version": int(newest.routing_version), "tables": tmeta,
            **dict(extra_meta or {})}
    plan = plan_frame(specs, meta)
    buf = (alloc(plan.nbytes) if alloc is not None else None) or bytearray(plan.nbytes)
    for i, (r, small) in enumerate(zip(resolved, smalls)):
        _fill(r, plan.array(buf, f"t{i}.meta"), plan.array(buf, f"t{i}.w"),
              {s: plan.array(buf, f"t{i}.s.{s}") for s in r.newest.slots})
        for name, arr in small.items():
            plan.array(buf, f"t{i}.{name}")[...] = arr
    plan.finish(buf)
    return memoryview(buf).cast("B")[: plan.nbytes]


def shard_state(part: DecodedPart) -> dict[str, Any]:
    """The shard state dict of one full part."""
    return compose([part])


def _as_part(state: Mapping[str, Any], snapshot_id: int) -> DecodedPart:
    from monolith_py.snapshot.pspart import DecodedPart, TablePart

    tables = {}
    for name, sd in state["tables"].items():
        meta = np.stack([sd["keys"], sd["last_update"], sd["update_count"], sd["row_version"]],
                        axis=1)
        tables[name] = TablePart(
            name=name, dim=int(sd["dim"]), optimizer=sd["optimizer"], format=sd["format"],
            meta=meta, weights=sd["weights"],
            slots={k[5:]: v for k, v in sd.items() if k.startswith("slot.")}, live=None,
            pending=sd["pending"], deleted_keys=sd["deleted_keys"],
            deleted_versions=sd["deleted_versions"], filter=sd.get("filter.counters"),
            version=int(sd["version"]), clock=int(sd["clock"]),
            counters={c: int(sd[f"stat.{c}"]) for c in _COUNTERS},
            size=int(sd["keys"].shape[0]), sorted=True)
    return DecodedPart(kind="full", snapshot_id=snapshot_id, step=0, base_id=-1,
                       shard_id=int(state["shard_id"]), num_shards=int(state["num_shards"]),
                       routing_version=int(state["routing_version"]), tables=tables)


def apply_increment(state: Mapping[str, Any], inc: DecodedPart) -> dict[str, Any]:
    """``state`` (a shard state dict at the increment's base) moved to the increment."""
    if inc.kind != "inc":
        raise CorruptDataError("apply_increment needs an increment")
    return compose([_as_part(state, inc.base_id), inc])
