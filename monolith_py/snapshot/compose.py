"""Composition of a PS part chain (a full part, then increments) into a shard state.

One pass, whatever the chain length: the live keys of the newest part are sorted; each is
resolved to the newest part of the chain that captured its row (``searchsorted`` on each
part's sorted keys, newest first); then every array (metadata, weights, slots) is gathered
once into its output by a compiled, parallel kernel. A chain made of one key-sorted full
part (what an SMP composes) is returned without copying its rows: the arrays are views of
the part, and ``PSShard.load_state_dict`` copies them into the table.

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
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from numba import njit, prange

from monolith_py.errors import CorruptDataError

if TYPE_CHECKING:
    from monolith_py.snapshot.pspart import DecodedPart, TablePart

__all__ = ["compose", "shard_state", "apply_increment"]

_SHARD_FORMAT = "monolith.ps_shard.v1"
_COUNTERS = ("admitted", "filtered", "evicted", "erased")


@njit(cache=True, parallel=True)
def _gather_into(out, src, out_rows, src_rows):  # type: ignore[no-untyped-def]
    """out[out_rows[t]] = src[src_rows[t]] for 2-D arrays."""
    w = src.shape[1]
    for t in prange(out_rows.shape[0]):
        o = out_rows[t]
        r = src_rows[t]
        for j in range(w):
            out[o, j] = src[r, j]


def _sorted_index(keys: np.ndarray, is_sorted: bool) -> tuple[np.ndarray, np.ndarray | None]:
    if is_sorted:
        return keys, None
    order = np.argsort(keys, kind="stable")
    return keys[order], order


def _table_state(tp: TablePart, keys: np.ndarray, meta: np.ndarray, weights: np.ndarray,
                 slots: Mapping[str, np.ndarray]) -> dict[str, Any]:
    sd: dict[str, Any] = {
        "format": tp.format, "name": tp.name, "dim": tp.dim, "optimizer": tp.optimizer,
        "keys": keys, "weights": weights,
        "last_update": meta[:, 1], "update_count": meta[:, 2], "row_version": meta[:, 3],
        "version": tp.version, "clock": tp.clock,
        "pending": tp.pending.copy(), "deleted_keys": tp.deleted_keys.copy(),
        "deleted_versions": tp.deleted_versions.copy(),
    }
    for s, a in slots.items():
        sd[f"slot.{s}"] = a
    if tp.filter is not None:
        sd["filter.counters"] = tp.filter.copy()
    for c in _COUNTERS:
        sd[f"stat.{c}"] = tp.counters[c]
    return sd


def _compose_table(name: str, chain: Sequence[TablePart], base_id: int) -> dict[str, Any]:
    newest = chain[-1]
    first = chain[0]
    if len(chain) == 1:
        keys = first.meta[:, 0]
        if first.sorted:
            if keys.shape[0] > 1 and not (np.diff(keys) > 0).all():
                raise CorruptDataError(f"table {name!r}: a sorted full part has unsorted keys")
            return _table_state(first, np.ascontiguousarray(keys), first.meta, first.weights,
                                dict(first.slots))
        live = np.sort(keys)
        if live.shape[0] > 1 and not (np.diff(live) > 0).all():
            raise CorruptDataError(f"table {name!r}: duplicate keys in a full part")
    else:
        assert newest.live is not None
        live = np.sort(newest.live)
    n = live.shape[0]
    src_part = np.full(n, -1, dtype=np.int32)
    src_row = np.empty(n, dtype=np.int64)
    todo = np.arange(n, dtype=np.int64)
    for j in range(len(chain) - 1, -1, -1):
        if not todo.shape[0]:
            break
        sk, order = _sorted_index(chain[j].meta[:, 0], chain[j].sorted)
        want = live[todo]
        pos = np.searchsorted(sk, want)
        hit = pos < sk.shape[0]
        hit[hit] = sk[pos[hit]] == want[hit]
        found = todo[hit]
        src_part[found] = j
        src_row[found] = pos[hit] if order is None else order[pos[hit]]
        if j == len(chain) - 1 and len(chain) > 1 and found.shape[0] != sk.shape[0]:
            raise CorruptDataError(f"table {name!r}: the newest part captured rows that are "
                                   "not live")
        todo = todo[~hit]
    if todo.shape[0]:
        raise CorruptDataError(
            f"table {name!r}: {todo.shape[0]} live keys are in no part of the chain "
            f"(broken chain on base snapshot {base_id})")
    meta = np.empty((n, 4), dtype=np.int64)
    weights = np.empty((n, newest.dim), dtype=np.float32)
    slots = {s: np.empty((n, a.shape[1]), dtype=np.float32) for s, a in newest.slots.items()}
    for j, tp in enumerate(chain):
        out_rows = np.flatnonzero(src_part == j)
        if not out_rows.shape[0]:
            continue
        rows = src_row[out_rows]
        _gather_into(meta, tp.meta, out_rows, rows)
        _gather_into(weights, tp.weights, out_rows, rows)
        for s, out in slots.items():
            if s not in tp.slots:
                raise CorruptDataError(f"table {name!r}: slot {s!r} missing in a chain part")
            _gather_into(out, tp.slots[s], out_rows, rows)
    if not np.array_equal(meta[:, 0], live):
        raise CorruptDataError(f"table {name!r}: composed keys do not match the live keys")
    return _table_state(newest, live, meta, weights, slots)


def compose(chain: Sequence[DecodedPart]) -> dict[str, Any]:
    """The shard state dict at the newest part of ``chain`` (a full part first, then the
    increments on top of it, oldest first)."""
    if not chain:
        raise CorruptDataError("empty chain")
    if chain[0].kind != "full":
        raise CorruptDataError(f"snapshot {chain[0].snapshot_id}: an increment needs its base")
    for prev, cur in zip(chain, chain[1:]):
        if cur.kind != "inc" or cur.base_id != prev.snapshot_id:
            raise CorruptDataError(
                f"part of snapshot {cur.snapshot_id} ({cur.kind}, base {cur.base_id}) does "
                f"not apply to snapshot {prev.snapshot_id}")
    newest = chain[-1]
    for p in chain:
        if p.shard_id != newest.shard_id or set(p.tables) != set(newest.tables):
            raise CorruptDataError(
                f"chain mixes shards or tables: shard {p.shard_id} tables {sorted(p.tables)} "
                f"vs shard {newest.shard_id} tables {sorted(newest.tables)}")
    tables = {name: _compose_table(name, [p.tables[name] for p in chain], newest.base_id)
              for name in newest.tables}
    return {"format": _SHARD_FORMAT, "shard_id": newest.shard_id,
            "num_shards": newest.num_shards, "routing_version": newest.routing_version,
            "tables": tables}


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
