"""``ReplicaTable``: a read-only copy of an embedding table, fed by sync deltas.

Same collisionless index as the training table (:class:`~monolith_py.table.CuckooHashMap`),
rows in one arena (float32, or float16 to halve memory), no optimizer slots, no admission,
no metadata but the *owner* shard of each row: one replica holds a table's keys from every
PS shard, and a full resync of shard ``i`` replaces exactly the rows shard ``i`` owns.

All operations are batch operations (numpy / compiled index kernels, no per-key Python
loops). Not thread-safe: the serving store serializes writers and readers.

Example::

    >>> import numpy as np
    >>> r = ReplicaTable("item", dim=2)
    >>> r.upsert(np.array([7, 9]), np.array([[1, 2], [3, 4]], np.float32), owner=0)
    >>> r.lookup(np.array([9, 8])).tolist()
    [[3.0, 4.0], [0.0, 0.0]]
    >>> r.erase(np.array([9])); len(r)
    1
"""

from __future__ import annotations

import numpy as np

from monolith_py.errors import InvalidInputError
from monolith_py.table.cuckoo import CuckooHashMap

__all__ = ["ReplicaTable"]


class ReplicaTable:
    """Read-only serving copy of one table (see the module doc).

    Args:
        name, dim: the table's name and row width.
        fp16: store rows as float16 (lookups still return float32).
        initial_capacity: rows to allocate up front (the arena doubles as needed).
    """

    def __init__(self, name: str, dim: int, *, fp16: bool = False,
                 initial_capacity: int = 1024) -> None:
        if not 1 <= int(dim) <= 65536:
            raise InvalidInputError(f"dim must be in [1, 65536], got {dim!r}")
        self.name = str(name)
        self.dim = int(dim)
        self.dtype = np.dtype(np.float16 if fp16 else np.float32)
        cap = max(16, int(initial_capacity))
        self._index = CuckooHashMap(cap)
        self._rows = np.zeros((cap, self.dim), dtype=self.dtype)
        self._keys = np.zeros(cap, dtype=np.int64)
        self._owner = np.full(cap, -1, dtype=np.int32)
        self._free = np.arange(cap - 1, -1, -1, dtype=np.int64)  # a stack: pop from the end
        self._nfree = cap

    def __len__(self) -> int:
        return len(self._index)

    @property
    def capacity(self) -> int:
        return int(self._rows.shape[0])

    @property
    def memory_bytes(self) -> int:
        return int(self._rows.nbytes + self._keys.nbytes + self._owner.nbytes
                   + self._free.nbytes + self._index.memory_bytes)

    # -- arena ----------------------------------------------------------------------------

    def _alloc(self, n: int) -> np.ndarray:
        if n > self._nfree:
            old = self.capacity
            new = max(old * 2, old + n - self._nfree)
            rows = np.zeros((new, self.dim), dtype=self.dtype)
            rows[:old] = self._rows
            self._rows = rows
            self._keys = np.concatenate([self._keys, np.zeros(new - old, np.int64)])
            self._owner = np.concatenate([self._owner, np.full(new - old, -1, np.int32)])
            free = np.empty(new, dtype=np.int64)
            free[: self._nfree] = self._free[: self._nfree]
            free[self._nfree : self._nfree + new - old] = np.arange(new - 1, old - 1, -1)
            self._free = free
            self._nfree += new - old
        out = self._free[self._nfree - n : self._nfree].copy()
        self._nfree -= n
        return out

    def _release(self, rows: np.ndarray) -> None:
        n = rows.shape[0]
        self._free[self._nfree : self._nfree + n] = rows
        self._nfree += n
        self._owner[rows] = -1

    # -- writes ---------------------------------------------------------------------------

    def upsert(self, keys: np.ndarray, rows: np.ndarray, owner: int) -> None:
        """Set the rows of unique int64 ``keys`` ``[n]`` to ``rows`` ``[n, dim]``."""
        k = np.ascontiguousarray(keys, dtype=np.int64)
        n = k.shape[0]
        if rows.shape != (n, self.dim):
            raise InvalidInputError(
                f"table {self.name!r}: rows must be [{n}, {self.dim}], got {rows.shape}")
        if n == 0:
            return
        r = self._index.find(k)
        miss = r < 0
        if miss.any():
            new = self._alloc(int(miss.sum()))
            self._index.insert_or_assign(k[miss], new)
            r[miss] = new
            self._keys[new] = k[miss]
        self._rows[r] = rows
        self._owner[r] = int(owner)

    def erase(self, keys: np.ndarray) -> None:
        """Delete ``keys`` (absent ones are ignored)."""
        k = np.unique(np.asarray(keys, dtype=np.int64))
        if k.shape[0] == 0 or len(self) == 0:
            return
        r = self._index.find(k)
        present = r >= 0
        if present.any():
            self._index.erase(k[present])
            self._release(r[present])

    def replace_owner(self, owner: int, keys: np.ndarray, rows: np.ndarray) -> None:
        """Make the rows owned by ``owner`` exactly ``keys -> rows`` (a full resync of
        one shard): its other rows are deleted, rows of other owners stay."""
        k = np.asarray(keys, dtype=np.int64)
        live = np.flatnonzero(self._owner == int(owner))
        if live.shape[0]:
            gone = self._keys[live]
            gone = gone[~np.isin(gone, k)]
            self.erase(gone)
        self.upsert(k, rows, owner)

    def clear(self) -> None:
        """Delete every row."""
        self.__init__(self.name, self.dim, fp16=self.dtype == np.float16)  # type: ignore[misc]

    # -- reads ----------------------------------------------------------------------------

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """float32 ``[n, dim]`` rows of int64 ``keys`` ``[n]``; absent keys read zeros
        (the training table's default for keys it does not hold)."""
        k = np.ascontiguousarray(keys, dtype=np.int64)
        r = self._index.find(k)
        out = self._rows[np.maximum(r, 0)].astype(np.float32, copy=False)  # a new array
        out[r < 0] = 0.0
        return out

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """All ``(keys [n], float32 rows [n, dim])``, sorted by key (for tests/snapshots)."""
        live = np.flatnonzero(self._owner >= 0)
        order = np.argsort(self._keys[live], kind="stable")
        sel = live[order]
        return self._keys[sel].copy(), self._rows[sel].astype(np.float32)
