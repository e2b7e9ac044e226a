"""Change tracking: what changed in a table after a given version.

Every mutating batch raises the table's ``version`` by one; every row remembers the
version of its last write; every deletion (eviction, erasure) is logged with its version.
``changes_since(v)`` is therefore exact and lossless whatever the number of changes: it
scans rows (bounded by the table) and the deletion log (bounded by the deletions not yet
trimmed by ``trim_changes``). Sync (train -> serve) and incremental snapshots are both
readers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["TableDelta", "DeletionLog"]


@dataclass(frozen=True)
class TableDelta:
    """Rows written and keys deleted in ``(since, version]``.

    Attributes:
        keys: int64 ``[n]`` keys whose row was written after ``since`` (sorted).
        rows: float32 ``[n, dim]`` their current rows.
        deleted_keys: int64 ``[m]`` keys deleted after ``since`` and absent now (sorted;
            disjoint from ``keys``), so applying deletions and upserts in any order gives
            the table's state at ``version``.
        version: the table version this delta brings a reader to.
        since: the version the delta starts from.
        slots: optimizer slots of ``keys`` (``{name: float32 [n, w]}``) when requested.
        last_update, update_count: int64 ``[n]`` metadata of ``keys`` when requested.
    """

    keys: np.ndarray
    rows: np.ndarray
    deleted_keys: np.ndarray
    version: int
    since: int
    slots: dict[str, np.ndarray] | None = None
    last_update: np.ndarray | None = None
    update_count: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.keys.shape[0] + self.deleted_keys.shape[0])


@dataclass
class DeletionLog:
    """Deleted keys with the version of their deletion, in version order."""

    keys: list[np.ndarray] = field(default_factory=list)
    versions: list[np.ndarray] = field(default_factory=list)

    def append(self, keys: np.ndarray, version: int) -> None:
        if keys.shape[0]:
            self.keys.append(np.array(keys, dtype=np.int64))
            self.versions.append(np.full(keys.shape[0], version, dtype=np.int64))

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """``(keys, versions)`` as two int64 arrays (compacted in place)."""
        if len(self.keys) > 1:
            self.keys = [np.concatenate(self.keys)]
            self.versions = [np.concatenate(self.versions)]
        if not self.keys:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        return self.keys[0], self.versions[0]

    def since(self, version: int) -> np.ndarray:
        """Unique keys deleted after ``version``."""
        keys, versions = self.arrays()
        return np.unique(keys[versions > version])

    def trim(self, version: int) -> None:
        """Forget deletions at or before ``version``."""
        keys, versions = self.arrays()
        keep = versions > version
        self.keys = [keys[keep]] if keep.any() else []
        self.versions = [versions[keep]] if keep.any() else []

    def __len__(self) -> int:
        return int(sum(k.shape[0] for k in self.keys))
