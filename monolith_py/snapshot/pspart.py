"""A PS shard's snapshot part: capture (full or incremental), decode and compose.

Frame layout (one wire frame per shard and snapshot; ``i`` indexes ``meta["tables"]``):

==================  =====================  ==========================================
array               shape                  what
==================  =====================  ==========================================
``t<i>.meta``       int64 ``[D, 4]``       ``(key, last_update, update_count,
                                           row_version)`` of the D captured rows
``t<i>.w``          float32 ``[D, dim]``   their weights
``t<i>.s.<slot>``   float32 ``[D, width]`` their optimizer slots
``t<i>.live``       int64 ``[L]``          (increments only) every live key
``t<i>.pending``    int64                  keys sighted since the last apply
``t<i>.dk/.dv``     int64                  deletion log (keys, versions)
``t<i>.filter``     uint8 ``[depth, w]``   admission count-min sketch (if any)
==================  =====================  ==========================================

A **full** part captures every live row; an **increment** (``kind="inc"``) captures the
rows whose version is newer than the table version recorded at the base snapshot, plus
all live keys (8 bytes each), so composition knows exactly which keys were deleted
without trusting the deletion log (sync may trim it). Rows are in arena order (``sorted``
false) when captured by a shard and key-sorted when composed by an SMP.

:func:`~monolith_py.snapshot.compose.compose` turns a chain of parts (a full part and the
increments after it) into exactly what ``PSShard.state_dict()`` returned at the cut (bit
for bit); a live key found in no part of the chain means a broken chain and raises
:class:`CorruptDataError`.

Example::

    >>> import numpy as np
    >>> from monolith_py.ps import PSShard
    >>> from monolith_py.table import TableConfig
    >>> shard = PSShard(0, 1, [TableConfig("t", dim=2)])
    >>> _ = shard.pull("t", np.arange(4), train=True)
    >>> cap = ShardCapturer(shard)
    >>> full = cap.capture(snapshot_id=1, step=10, base_id=None)
    >>> shard.push("t", np.array([2]), np.ones((1, 2), np.float32), now=5)
    >>> inc = cap.capture(snapshot_id=2, step=20, base_id=1)
    >>> inc.kind, inc.rows
    ('inc', 1)
    >>> state = apply_increment(shard_state(decode_part(full.frame())), decode_part(inc.frame()))
    >>> bool((state["tables"]["t"]["weights"] == shard.state_dict()["tables"]["t"]["weights"]).all())
    True
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from monolith_py.errors import DecodeError
from monolith_py.snapshot import _gather
from monolith_py.wire import FramePlan, decode_arrays, plan_frame

__all__ = ["PS_PART_FORMAT", "CapturedPart", "ShardCapturer", "DecodedPart", "TablePart",
           "decode_part", "shard_state", "apply_increment", "compose", "encode_shard_state"]

PS_PART_FORMAT = "monolith.ps_part/1"
_COUNTERS = ("admitted", "filtered", "evicted", "erased")


@dataclass
class CapturedPart:
    """A part written into ``buffer`` (finish it with :meth:`finish` outside the lock).

    Attributes:
        kind, base_id: ``"full"`` (base ``-1``) or ``"inc"`` on top of ``base_id``.
        rows: rows captured over all tables.
        stall_s: time the shard lock was held.
        nbytes: frame size.
    """

    buffer: Any
    plan: FramePlan
    snapshot_id: int
    kind: str
    base_id: int
    rows: int
    stall_s: float
    finished: bool = False

    @property
    def nbytes(self) -> int:
        return self.plan.nbytes

    def finish(self) -> int:
        """Write the frame header and checksum; returns the size."""
        if not self.finished:
            self.plan.finish(self.buffer)
            self.finished = True
        return self.plan.nbytes

    def frame(self) -> memoryview:
        """The finished frame (a view of ``buffer``)."""
        self.finish()
        return memoryview(self.buffer).cast("B")[: self.plan.nbytes]


def _table_specs(i: int, dim: int, slots: Mapping[str, int], d: int, live: int | None,
                 small: Mapping[str, np.ndarray]) -> list[tuple[str, Any, tuple[int, ...]]]:
    specs: list[tuple[str, Any, tuple[int, ...]]] = [
        (f"t{i}.meta", np.int64, (d, 4)), (f"t{i}.w", np.float32, (d, dim))]
    specs += [(f"t{i}.s.{name}", np.float32, (d, w)) for name, w in slots.items()]
    if live is not None:
        specs.append((f"t{i}.live", np.int64, (live,)))
    specs += [(f"t{i}.{name}", arr.dtype, arr.shape) for name, arr in small.items()]
    return specs


def row_bytes(table: Any) -> int:
    """Bytes of one captured row of ``table``: its record, weights and optimizer slots."""
    slots = getattr(getattr(table, "_arena", None), "slots", {})
    return 32 + 4 * int(table.dim) + 4 * sum(
        int(getattr(a, "shape", (0, 0))[1]) for a in slots.values())


def table_extra_bytes(table: Any) -> int:
    """Bytes every part of ``table`` carries besides its rows (filter, deletion log)."""
    st = table.stats()
    return int(st.get("filter_memory_bytes", 0)) + 16 * int(st.get("deletion_log", 0))


class ShardCapturer:
    """Captures the parts of one :class:`~monolith_py.ps.PSShard` (or of any object with
    ``lock``, ``tables``, ``shard_id``, ``num_shards``).

    Remembers each table's version at the last few captured snapshots, so an increment can
    be taken against any of them. Not thread-safe: one capture at a time.
    """

    def __init__(self, shard: Any, history: int = 8) -> None:
        self.shard = shard
        self._history = int(history)
        self._versions: dict[int, dict[str, int]] = {}
        self._live_scratch = np.zeros(0, dtype=np.int64)
        self._dirty_scratch = np.zeros(0, dtype=np.int64)

    def forget(self) -> None:
        """Drop the version history (after a restore: the next capture is full)."""
        self._versions.clear()

    def has_base(self, snapshot_id: int) -> bool:
        return snapshot_id in self._versions

    def _scratch(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        if self._live_scratch.shape[0] < n:
            cap = max(n, int(self._live_scratch.shape[0] * 1.5), 1024)
            self._live_scratch = np.empty(cap, dtype=np.int64)
            self._dirty_scratch = np.empty(cap, dtype=np.int64)
        return self._live_scratch, self._dirty_scratch

    def estimate_inc_bytes(self, base_id: int) -> int | None:
        """About the bytes an increment against ``base_id`` would take now (``None`` if
        ``base_id`` was not captured). Counts the changed rows without the shard lock,
        which is held only to take references to the row records: the count may be a
        little stale, never unsafe."""
        base = self._versions.get(base_id)
        if base is None:
            return None
        with self.shard.lock:
            metas = [(t, _gather.meta_of(t), base.get(name, -1))
                     for name, t in self.shard.tables.items()]
        total = 64 << 10  # the frame's header and alignment
        for table, meta, since in metas:
            if meta is None:
                return None
            live, dirty = _gather.count_rows(meta, np.int64(since))
            total += dirty * row_bytes(table) + 8 * live + table_extra_bytes(table)
        return int(total)

    def capture(self, snapshot_id: int, step: int, base_id: int | None,
                alloc: Callable[[int], Any] | None = None,
                extra_meta: Mapping[str, Any] | None = None) -> CapturedPart:
        """Capture the shard's part of snapshot ``snapshot_id`` (holds ``shard.lock``).

        ``base_id``: an earlier captured snapshot to take an increment against (``None``
        or an unknown id: a full part). ``alloc(nbytes)`` returns a writable buffer of at
        least ``nbytes`` (a leased shared-memory segment) or ``None`` (then a private
        ``bytearray`` is used).
        """
        shard = self.shard
        with shard.lock:
            t0 = time.perf_counter()
            base = self._versions.get(base_id) if base_id is not None else None
            kind = "inc" if base is not None else "full"
            tables = shard.tables
            views = {name: _gather.arena_of(t) for name, t in tables.items()}
            if any(v is None for v in views.values()):
                part = self._capture_from_state(snapshot_id, step, alloc, extra_meta)
                part.stall_s = time.perf_counter() - t0
                return part
            specs: list[tuple[str, Any, tuple[int, ...]]] = []
            tmeta: list[dict[str, Any]] = []
            plan_rows: list[tuple[int, np.ndarray, np.ndarray]] = []
            smalls: list[dict[str, np.ndarray]] = []
            rows_total = 0
            state_format = _gather.table_state_format()
            for i, (name, table) in enumerate(tables.items()):
                v = views[name]
                assert v is not None
                since = base[name] if base is not None and name in base else -1
                live_s, dirty_s = self._scratch(v.meta.shape[0])
                nl, nd = _gather.scan_rows(v.meta, np.int64(since), live_s, dirty_s)
                # scratch is reused by the next table: keep private copies of the indices
                dirty = dirty_s[:nd].copy() if len(tables) > 1 else dirty_s[:nd]
                live = live_s[:nl].copy() if len(tables) > 1 else live_s[:nl]
                small = {"pending": v.pending, "dk": v.deleted_keys, "dv": v.deleted_versions}
                if v.filter_counters is not None:
                    small["filter"] = v.filter_counters
                slots = {s: int(a.shape[1]) for s, a in v.slots.items()}
                specs += _table_specs(i, table.dim, slots, nd,
                                      nl if kind == "inc" else None, small)
                tmeta.append({"name": name, "dim": int(table.dim), "format": state_format,
                              "optimizer": table.config.optimizer.kind, "slots": slots,
                              "version": v.version, "clock": v.clock, "counters": v.counters,
                              "size": int(nl), "since": int(since), "sorted": False})
                plan_rows.append((i, dirty, live))
                smalls.append(small)
                rows_total += nd
            base_sid = -1 if kind == "full" or base_id is None else int(base_id)
            meta = self._meta(snapshot_id, step, kind, base_sid, tmeta, extra_meta)
            plan = plan_frame(specs, meta)
            buf = (alloc(plan.nbytes) if alloc is not None else None) or bytearray(plan.nbytes)
            for (i, dirty, live), (name, table), small in zip(plan_rows, tables.items(),
                                                              smalls):
                v = views[name]
                assert v is not None
                _gather.copy_rows(v.meta, dirty, plan.array(buf, f"t{i}.meta"))
                _gather.copy_rows(v.weights, dirty, plan.array(buf, f"t{i}.w"))
                for s, arr in v.slots.items():
                    _gather.copy_rows(arr, dirty, plan.array(buf, f"t{i}.s.{s}"))
                if kind == "inc":
                    plan.array(buf, f"t{i}.live")[:] = live
                for sname, arr in small.items():
                    plan.array(buf, f"t{i}.{sname}")[...] = arr
            self._remember(snapshot_id, {name: views[name].version for name in tables})  # type: ignore[union-attr]
            stall = time.perf_counter() - t0
        return CapturedPart(buf, plan, snapshot_id, kind, base_sid, rows_total, stall)

    def _remember(self, snapshot_id: int, versions: dict[str, int]) -> None:
        self._versions[snapshot_id] = versions
        while len(self._versions) > self._history:
            del self._versions[min(self._versions)]

    def _meta(self, snapshot_id: int, step: int, kind: str, base_id: int,
              tables: list[dict[str, Any]], extra: Mapping[str, Any] | None) -> dict[str, Any]:
        from monolith_py.ps.routing import ROUTING_VERSION

        return {"format": PS_PART_FORMAT, "kind": kind, "snapshot_id": int(snapshot_id),
                "step": int(step), "base_id": int(base_id),
                "shard_id": int(self.shard.shard_id), "num_shards": int(self.shard.num_shards),
                "routing_version": ROUTING_VERSION, "tables": tables, **dict(extra or {})}

    def _capture_from_state(self, snapshot_id: int, step: int,
                            alloc: Callable[[int], Any] | None,
                            extra_meta: Mapping[str, Any] | None) -> CapturedPart:
        """Fallback: a full part from ``state_dict()`` (lock already held)."""
        state = self.shard.state_dict()
        frame_plan, fill = _plan_state(state, snapshot_id, step, extra_meta)
        buf = (alloc(frame_plan.nbytes) if alloc is not None else None) or bytearray(
            frame_plan.nbytes)
        fill(buf)
        self._remember(snapshot_id, {n: int(sd["version"]) for n, sd in state["tables"].items()})
        rows = sum(int(sd["keys"].shape[0]) for sd in state["tables"].values())
        return CapturedPart(buf, frame_plan, snapshot_id, "full", -1, rows, 0.0)


def _plan_state(state: Mapping[str, Any], snapshot_id: int, step: int,
                extra_meta: Mapping[str, Any] | None) -> tuple[FramePlan, Callable[[Any], None]]:
    """Plan a full, key-sorted part from a shard state dict; ``fill(buf)`` writes it."""
    specs: list[tuple[str, Any, tuple[int, ...]]] = []
    tmeta = []
    items = list(state["tables"].items())
    for i, (name, sd) in enumerate(items):
        n, dim = sd["weights"].shape
        slots = {k[5:]: int(v.shape[1]) for k, v in sd.items() if k.startswith("slot.")}
        small = {"pending": sd["pending"], "dk": sd["deleted_keys"], "dv": sd["deleted_versions"]}
        if "filter.counters" in sd:
            small["filter"] = sd["filter.counters"]
        specs += _table_specs(i, int(dim), slots, int(n), None,
                              {k: np.asarray(v) for k, v in small.items()})
        tmeta.append({"name": name, "dim": int(dim), "optimizer": sd["optimizer"],
                      "format": sd["format"],
                      "slots": slots, "version": int(sd["version"]), "clock": int(sd["clock"]),
                      "counters": {c: int(sd[f"stat.{c}"]) for c in _COUNTERS},
                      "size": int(n), "since": -1, "sorted": True})
    meta = {"format": PS_PART_FORMAT, "kind": "full", "snapshot_id": int(snapshot_id),
            "step": int(step), "base_id": -1, "shard_id": int(state["shard_id"]),
            "num_shards": int(state["num_shards"]),
            "routing_version": int(state["routing_version"]), "tables": tmeta,
            **dict(extra_meta or {})}
    plan = plan_frame(specs, meta)

    def fill(buf: Any) -> None:
        for i, (_, sd) in enumerate(items):
            m = plan.array(buf, f"t{i}.meta")
            m[:, 0] = sd["keys"]
            m[:, 1] = sd["last_update"]
            m[:, 2] = sd["update_count"]
            m[:, 3] = sd["row_version"]
            plan.array(buf, f"t{i}.w")[...] = sd["weights"]
            for k, v in sd.items():
                if k.startswith("slot."):
                    plan.array(buf, f"t{i}.s.{k[5:]}")[...] = v
            plan.array(buf, f"t{i}.pending")[...] = sd["pending"]
            plan.array(buf, f"t{i}.dk")[...] = sd["deleted_keys"]
            plan.array(buf, f"t{i}.dv")[...] = sd["deleted_versions"]
            if "filter.counters" in sd:
                plan.array(buf, f"t{i}.filter")[...] = sd["filter.counters"]

    return plan, fill


def encode_shard_state(state: Mapping[str, Any], snapshot_id: int, step: int,
                       alloc: Callable[[int], Any] | None = None,
                       extra_meta: Mapping[str, Any] | None = None) -> memoryview:
    """A full, key-sorted part frame of a shard state dict (e.g. composed by an SMP)."""
    plan, fill = _plan_state(state, snapshot_id, step, extra_meta)
    buf = (alloc(plan.nbytes) if alloc is not None else None) or bytearray(plan.nbytes)
    fill(buf)
    plan.finish(buf)
    return memoryview(buf).cast("B")[: plan.nbytes]


# -- decode --------------------------------------------------------------------------------------

@dataclass
class TablePart:
    """One table of a decoded part (arrays are views over the frame)."""

    name: str
    dim: int
    optimizer: str
    format: str
    meta: np.ndarray
    weights: np.ndarray
    slots: dict[str, np.ndarray]
    live: np.ndarray | None
    pending: np.ndarray
    deleted_keys: np.ndarray
    deleted_versions: np.ndarray
    filter: np.ndarray | None
    version: int
    clock: int
    counters: dict[str, int]
    size: int
    sorted: bool


@dataclass
class DecodedPart:
    """A decoded PS part: shard identity, kind and its tables."""

    kind: str
    snapshot_id: int
    step: int
    base_id: int
    shard_id: int
    num_shards: int
    routing_version: int
    tables: dict[str, TablePart] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


def _bad(msg: str) -> DecodeError:
    return DecodeError(f"bad PS part: {msg}")


def _req_int(d: Mapping[str, Any], name: str, lo: int = -(1 << 63)) -> int:
    v = d.get(name)
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise _bad(f"{name!r} must be an int >= {lo}, got {v!r}")
    return v


def decode_part(buf: Any, verified: bool = False) -> DecodedPart:
    """Validate and decode a PS part frame (zero copy; checksum required). ``verified``:
    the bytes were already checked against the sealed manifest's crc of the whole part
    (the frame's own payload checksum is then not computed a second time)."""
    arrays, meta = decode_arrays(buf, require_checksum=True, verified=verified)
    if meta.get("format") != PS_PART_FORMAT or meta.get("kind") not in ("full", "inc"):
        raise _bad(f"format {meta.get('format')!r} / kind {meta.get('kind')!r}")
    kind = meta["kind"]
    out = DecodedPart(kind=kind, snapshot_id=_req_int(meta, "snapshot_id", 0),
                      step=_req_int(meta, "step", 0), base_id=_req_int(meta, "base_id", -1),
                      shard_id=_req_int(meta, "shard_id", 0),
                      num_shards=_req_int(meta, "num_shards", 1),
                      routing_version=_req_int(meta, "routing_version", 0), meta=meta)
    tables = meta.get("tables")
    if not isinstance(tables, list):
        raise _bad("'tables' must be a list")
    used: set[str] = set()
    for i, t in enumerate(tables):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise _bad(f"table entry {i} malformed")
        name = t["name"]
        dim = _req_int(t, "dim", 1)
        slots = t.get("slots")
        counters = t.get("counters")
        if not isinstance(slots, dict) or not isinstance(counters, dict):
            raise _bad(f"table {name!r}: slots/counters malformed")

        def arr(suffix: str, dtype: Any, ndim: int, optional: bool = False) -> Any:
            key = f"t{i}.{suffix}"
            a = arrays.get(key)
            if a is None:
                if optional:
                    return None
                raise _bad(f"table {name!r} lacks {key!r}")
            if a.dtype != np.dtype(dtype) or a.ndim != ndim:
                raise _bad(f"{key!r} must be {np.dtype(dtype)} with {ndim} dims, got "
                           f"{a.dtype} {a.shape}")
            used.add(key)
            return a

        m = arr("meta", np.int64, 2)
        d = m.shape[0]
        w = arr("w", np.float32, 2)
        if m.shape[1] != 4 or w.shape != (d, dim):
            raise _bad(f"table {name!r}: meta {m.shape} / weights {w.shape} mismatch")
        sl = {}
        for s, width in slots.items():
            a = arr(f"s.{s}", np.float32, 2)
            if a.shape != (d, width):
                raise _bad(f"table {name!r}: slot {s!r} shape {a.shape}")
            sl[s] = a
        live = arr("live", np.int64, 1, optional=kind == "full")
        tp = TablePart(
            name=name, dim=dim, optimizer=str(t.get("optimizer")),
            format=str(t.get("format")), meta=m, weights=w,
            slots=sl, live=live if kind == "inc" else None,
            pending=arr("pending", np.int64, 1), deleted_keys=arr("dk", np.int64, 1),
            deleted_versions=arr("dv", np.int64, 1),
            filter=arr("filter", np.uint8, 2, optional=True),
            version=_req_int(t, "version", 0), clock=_req_int(t, "clock"),
            counters={c: _req_int(counters, c, 0) for c in _COUNTERS},
            size=_req_int(t, "size", 0), sorted=bool(t.get("sorted")))
        if tp.deleted_keys.shape != tp.deleted_versions.shape:
            raise _bad(f"table {name!r}: deletion log keys/versions differ in length")
        if kind == "full" and d != tp.size or kind == "inc" and live.shape[0] != tp.size:
            raise _bad(f"table {name!r}: {d} rows / {tp.size} live keys disagree")
        out.tables[name] = tp
    extra = sorted(set(arrays) - used)
    if extra:
        raise _bad(f"unexpected arrays {extra[:4]}")
    return out


from monolith_py.snapshot.compose import apply_increment, compose, shard_state  # noqa: E402
