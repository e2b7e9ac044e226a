"""Train -> serve sync: the messages, the ordering rule, and the receiver's contract.

A PS shard's state, as a serving worker sees it, is a **position**: the shard's
incarnation ``epoch`` (a random id drawn whenever the shard's version counters may have
gone back: a process start, a restore) and, per table, the table ``version`` the worker
has applied. A :class:`ShardDelta` moves a reader from ``since`` to ``version`` for each
table it names; a *full* delta replaces everything the reader holds from that shard.

Ordering rule (:func:`classify`): an incremental delta applies only on top of exactly the
position it was computed from (same epoch, ``since == current version`` for every table);
a delta the reader already has is a no-op (``"duplicate"``); anything else is refused and
the reader catches up by resubscribing from its real position. So applying a delta twice,
or out of order, never corrupts a replica.

Example::

    >>> import numpy as np
    >>> d = ShardDelta(shard=0, epoch=7, full=False, tables={
    ...     "item": TablePatch("item", 4, since=3, version=5, keys=np.array([1], np.int64),
    ...                        rows=np.zeros((1, 4), np.float32))})
    >>> classify(ShardPosition(7, {"item": 3}), d)
    'apply'
    >>> classify(ShardPosition(7, {"item": 5}), d), classify(ShardPosition(7, {"item": 4}), d)
    ('duplicate', 'refuse')
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

__all__ = [
    "ShardPosition",
    "TablePatch",
    "ShardDelta",
    "DenseUpdate",
    "Heartbeat",
    "DeltaSink",
    "ColdStartSource",
    "classify",
    "Verdict",
]

Verdict = Literal["apply", "duplicate", "refuse"]

_EMPTY_KEYS = np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class ShardPosition:
    """Where a reader stands on one shard: ``epoch`` and ``{table: version applied}``."""

    epoch: int
    versions: Mapping[str, int]

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": int(self.epoch), "versions": {k: int(v) for k, v in self.versions.items()}}


@dataclass(frozen=True)
class TablePatch:
    """One table's part of a delta.

    Attributes:
        name, dim: the table and its row width.
        since, version: the delta moves the table from ``since`` to ``version``.
        keys: int64 ``[n]`` keys to upsert (unique).
        rows: float32 or float16 ``[n, dim]`` their rows.
        deleted: int64 ``[m]`` keys to delete (disjoint from ``keys``).
    """

    name: str
    dim: int
    since: int
    version: int
    keys: np.ndarray = field(default_factory=lambda: _EMPTY_KEYS)
    rows: np.ndarray = field(default_factory=lambda: np.zeros((0, 1), np.float32))
    deleted: np.ndarray = field(default_factory=lambda: _EMPTY_KEYS)

    def __post_init__(self) -> None:
        if self.rows.shape[0] == 0 and self.rows.shape != (0, self.dim):
            object.__setattr__(self, "rows", np.zeros((0, self.dim), self.rows.dtype))


@dataclass(frozen=True)
class ShardDelta:
    """Changes of one shard's tables; ``full=True`` means "this is everything"."""

    shard: int
    epoch: int
    full: bool
    tables: Mapping[str, TablePatch]

    def position_after(self) -> dict[str, int]:
        return {name: p.version for name, p in self.tables.items()}

    @property
    def num_rows(self) -> int:
        return sum(int(p.keys.shape[0]) for p in self.tables.values())

    @property
    def num_deleted(self) -> int:
        return sum(int(p.deleted.shape[0]) for p in self.tables.values())


@dataclass(frozen=True)
class DenseUpdate:
    """The dense part of the model: a JSON model spec (see
    :class:`monolith_py.modules.spec.ModelSpec`) and its tensors (``state_dict`` names ->
    arrays). ``(epoch, version)`` identifies it; ``epoch`` is the publishing board's."""

    spec: Mapping[str, Any]
    tensors: Mapping[str, np.ndarray]
    epoch: int
    version: int

    @property
    def ident(self) -> tuple[int, int]:
        return (int(self.epoch), int(self.version))


@dataclass(frozen=True)
class Heartbeat:
    """Sent when a shard has nothing new: the reader is current at ``position``."""

    shard: int
    position: ShardPosition


def classify(current: ShardPosition | None, delta: ShardDelta) -> Verdict:
    """Decide what a reader at ``current`` does with ``delta`` (pure, see module doc).

    * full delta: ``"apply"`` unless it is older than what the reader has in the same
      epoch (then ``"refuse"``);
    * incremental delta: ``"apply"`` when it starts exactly at the reader's versions,
      ``"duplicate"`` when the reader already is at or past every ``version`` in it,
      ``"refuse"`` otherwise (other epoch, unknown table, gap).
    """
    if delta.full:
        if current is None or current.epoch != delta.epoch:
            return "apply"
        for name, p in delta.tables.items():
            if p.version < current.versions.get(name, -1):
                return "refuse"
        return "apply"
    if current is None or current.epoch != delta.epoch:
        return "refuse"
    verdicts = set()
    for name, p in delta.tables.items():
        have = current.versions.get(name)
        if have is None:
            return "refuse"
        if p.since == have:
            verdicts.add("apply")
        elif p.version <= have:
            verdicts.add("duplicate")
        else:
            return "refuse"
    if verdicts == {"duplicate"} or not verdicts:
        return "duplicate"
    return "apply" if verdicts == {"apply"} else "refuse"


@runtime_checkable
class DeltaSink(Protocol):
    """What a sync receiver feeds (the serving store implements it).

    Contract:

    * Called from subscriber threads (one per shard), possibly concurrently:
      implementations are thread-safe and apply each delta atomically (a reader of the
      sink never sees half of one).
    * ``position(shard)`` is where the sink stands; a subscriber (re)subscribes from it.
    * ``apply_delta`` applies ``delta`` per :func:`classify` and returns the verdict; on
      ``"refuse"`` nothing changed and the subscriber resubscribes from ``position``.
    * ``apply_dense`` swaps in a new dense model; returns False (and changes nothing)
      when the update is invalid.
    * ``dense_ident()`` is the ``(epoch, version)`` of the dense state held, or None.
    * ``heartbeat`` records that the shard is alive; returns False when the sink is not
      at the heartbeat's position (the subscriber then resubscribes).
    """

    def position(self, shard: int) -> ShardPosition | None: ...

    def apply_delta(self, delta: ShardDelta) -> Verdict: ...

    def apply_dense(self, dense: DenseUpdate) -> bool: ...

    def dense_ident(self) -> tuple[int, int] | None: ...

    def heartbeat(self, beat: Heartbeat) -> bool: ...


@runtime_checkable
class ColdStartSource(Protocol):
    """Where a new serving worker loads its first state from before following deltas
    (the latest sealed snapshot or universal checkpoint; see ``monolith_py.snapshot``).

    ``load(sink, shards)`` applies a full delta per shard it has (with the shard's epoch
    and versions as of the snapshot, so the subscriber only asks for what came after) and
    the dense state; returns the shards it loaded. Shards it could not load are
    fully resynced from the PS. Called once, before the subscribers start.
    """

    def load(self, sink: DeltaSink, shards: int) -> set[int]: ...
