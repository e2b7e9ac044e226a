"""Retention: which stored parts the retained snapshots need (a pure policy).

An SMP keeps the newest ``keep`` sealed snapshots. A snapshot needs, for every
participant, either a composed full part of that snapshot (a compaction record) or the
part its manifest names — and, for an increment, recursively what its base snapshot needs.
The newest snapshot also keeps the part its own manifest names until the next seal, so a
reader holding a catalog from before a compaction record arrived can still read it.
Everything else (older chains, parts of abandoned snapshots at or below the newest sealed
id) may be freed; data of newer, in-flight snapshot ids is never the policy's to free.

Example::

    >>> needed_parts({}, {}, keep=2)
    (set(), set(), -1)
"""

from __future__ import annotations

from collections.abc import Mapping

from monolith_py.snapshot.manifest import Manifest, PartKey, PartRecord

__all__ = ["needed_parts", "chain_length"]


def needed_parts(manifests: Mapping[int, Manifest], records: Mapping[PartKey, PartRecord],
                 keep: int) -> tuple[set[PartKey], set[int], int]:
    """``(part keys to keep, manifest ids to keep, newest sealed id or -1)``."""
    sealed = sorted(manifests)
    if not sealed:
        return set(), set(), -1
    keys: set[PartKey] = set()
    mans: set[int] = set()

    def resolve(p: str, sid: int, depth: int, own: bool = False) -> None:
        while depth <= 10_000:
            if (p, sid, "full") in records and not own:
                keys.add((p, sid, "full"))
                return
            man = manifests.get(sid)
            if man is None:
                return
            mans.add(sid)
            rec = man.parts.get(p)
            if rec is None:
                return
            keys.add(rec.key)
            if rec.kind != "inc":
                return
            sid, depth, own = rec.base_id, depth + 1, False

    for sid in sealed[-keep:]:
        mans.add(sid)
        for p in manifests[sid].parts:
            keys.add((p, sid, "full"))  # a compaction may be on its way
            resolve(p, sid, 0)
            if sid == sealed[-1]:
                resolve(p, sid, 0, own=True)
    return keys, mans, sealed[-1]


def chain_length(manifests: Mapping[int, Manifest], records: Mapping[PartKey, PartRecord],
                 sid: int, p: str) -> int:
    """Increments between snapshot ``sid`` and the nearest full form of ``p``'s part."""
    n = 0
    while True:
        if (p, sid, "full") in records:
            return n
        man = manifests.get(sid)
        rec = man.parts.get(p) if man is not None else None
        if rec is None or rec.kind == "full":
            return n
        n += 1
        sid = rec.base_id
