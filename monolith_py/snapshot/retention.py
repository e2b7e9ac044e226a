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
    """``(part keys to keep, manifest ids to keep, newest sealed id or -1)``.

    Each manifest lists its own chains, so only the retained manifests are consulted (and
    kept): a missing older manifest never hides a part a retained one needs."""
    sealed = sorted(manifests)
    if not sealed:
        return set(), set(), -1
    keys: set[PartKey] = set()
    retained = sealed[-keep:]
    for sid in retained:
        man = manifests[sid]
        for p in man.parts:
            keys.add((p, sid, "full"))  # a compaction may be on its way
            chain = man.chain(p)
            top = len(chain) - 1
            for j in range(top, -1, -1):
                r = chain[j]
                composed = (p, r.snapshot_id, "full")
                # the newest snapshot keeps its own part until the next seal (a reader may
                # hold a catalog from before a compaction record arrived)
                if composed in records and composed != r.key and not (sid == sealed[-1] and j == top):
                    keys.add(composed)
                    break
                keys.add(r.key)
    return keys, set(retained), sealed[-1]


def chain_length(manifests: Mapping[int, Manifest], records: Mapping[PartKey, PartRecord],
                 sid: int, p: str) -> int:
    """Increments between snapshot ``sid`` and the nearest full form of ``p``'s part."""
    man = manifests.get(sid)
    if man is None or p not in man.parts:
        return 0
    n = 0
    for r in reversed(man.chain(p)):
        if r.kind == "full" or ((p, r.snapshot_id, "full") in records and n):
            return n
        n += 1
    return n
