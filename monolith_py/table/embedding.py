"""``EmbeddingTable``: collisionless rows behind a cuckoo index, with admission, expiry,
sparse optimizers, change tracking and a sharding-independent state."""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from monolith_py.errors import InvalidInputError, InvalidTypeError
from monolith_py.table._arena import COUNT, KEY, LAST, VERSION, RowArena, gather_rows, sum_by_row
from monolith_py.table._arrays import as_float_rows, as_keys, check_reserved, unique_sorted
from monolith_py.table._state import STATE_FORMAT, check_state
from monolith_py.table.admission import CountMinSketch, admit
from monolith_py.table.changes import DeletionLog, TableDelta
from monolith_py.table.config import TableConfig
from monolith_py.table.cuckoo import CuckooHashMap
from monolith_py.table.expiry import expired
from monolith_py.table.init import INIT_KINDS, init_rows
from monolith_py.table.optim import apply_optimizer, new_scratch, slot_specs
from monolith_py.table.staging import StagedState

__all__ = ["EmbeddingTable"]

_EMPTY_KEYS = np.zeros(0, dtype=np.int64)
_NEVER = int(np.iinfo(np.int64).max)


def _as_int(value: Any, name: str = "now") -> int:
    what = "event-time seconds" if name == "now" else "a table version"
    if isinstance(value, (bool, np.bool_, float, np.floating)):
        raise InvalidTypeError(f"{name} must be an integer ({what}), got {value!r}")
    try:
        return int(operator.index(value))
    except TypeError:
        raise InvalidTypeError(
            f"{name} must be an integer ({what}), got {type(value).__name__}"
        ) from None


class EmbeddingTable:
    """One embedding table: every int64 id gets its own row (no hashing-trick collisions).

    Args:
        config: the table's :class:`~monolith_py.table.TableConfig`.
        device: where :meth:`lookup` returns its rows (the rows live in host memory).

    Call order per training step: ``lookup(keys, train=True)`` (forward), then
    ``apply_gradients(keys, grads, now)`` (after ``backward``). Not thread-safe: one
    thread drives one table.

    Example::

        >>> import torch
        >>> from monolith_py.table import EmbeddingTable, OptimizerConfig, TableConfig
        >>> t = EmbeddingTable(TableConfig("item", dim=4, optimizer=OptimizerConfig("sgd", lr=0.1)))
        >>> keys = torch.tensor([10, 11, 10])
        >>> t.lookup(keys, train=True).shape     # admits 10 and 11 (threshold 1)
        torch.Size([3, 4])
        >>> t.apply_gradients(keys, torch.ones(3, 4), now=1_700_000_000)
        >>> len(t), t.stats()["admitted"]
        (2, 2)
    """

    def __init__(self, config: TableConfig, device: torch.device | str = "cpu") -> None:
        if not isinstance(config, TableConfig):
            raise InvalidTypeError(f"config must be a TableConfig, got {type(config).__name__}")
        self._config = config
        self._device = torch.device(device)
        self._dim = int(config.dim)
        self._specs = slot_specs(config.optimizer, self._dim)
        self._scratch = new_scratch(config.optimizer)
        self._init_kind = INIT_KINDS[config.initializer]
        self._init_scale = config.resolved_init_scale
        self._filter = (
            CountMinSketch(config.filter_memory_bytes) if config.admit_threshold > 1 else None
        )
        self._reset()

    def _reset(self) -> None:
        cfg = self._config
        self._index = CuckooHashMap(cfg.initial_capacity, cfg.max_load_factor)
        self._arena = RowArena(self._dim, self._specs, cfg.initial_capacity)
        self._pending = _EMPTY_KEYS  # sorted keys sighted by train lookups since last apply
        # (keys, rows, version) of the last train lookup: the step's apply_gradients on the
        # same keys reuses the rows instead of probing the index again, while the table is
        # unchanged since (same version)
        self._looked_up: tuple[np.ndarray, np.ndarray, int] | None = None
        self._log = DeletionLog()
        self._version = 0
        self._clock = 0
        self._oldest = _NEVER  # lower bound of the live rows' last_update (expiry fast path)
        self._counters = {"admitted": 0, "filtered": 0, "evicted": 0, "erased": 0}
        if self._filter is not None:
            self._filter.clear()

    # -- properties -------------------------------------------------------------------------

    @property
    def config(self) -> TableConfig:
        return self._config

    @property
    def name(self) -> str:
        return self._config.name

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def version(self) -> int:
        """Mutation counter: +1 per batch that wrote or deleted rows."""
        return self._version

    def __len__(self) -> int:
        return len(self._index)

    def __repr__(self) -> str:
        return f"EmbeddingTable(name={self.name!r}, dim={self.dim}, size={len(self)})"

    # -- admission and row creation ---------------------------------------------------------

    def _admitted(self, absent: np.ndarray, from_apply: bool) -> np.ndarray:
        """Count sightings of the unique absent keys and return those admitted."""
        if self._filter is None:
            return absent
        fresh = absent[~np.isin(absent, self._pending, assume_unique=True)]
        if not from_apply and fresh.shape[0]:
            self._pending = np.union1d(self._pending, fresh)
        self._filter.add(fresh)
        return absent[admit(self._filter.estimate(absent), self._config.admit_threshold)]

    def _insert(self, keys: np.ndarray, version: int, admitted: bool = True) -> np.ndarray:
        """Create rows for absent unique ``keys`` (initialized from (seed, key))."""
        a = self._arena
        rows = a.alloc(keys.shape[0])
        self._index.insert_or_assign(keys, rows)
        init_rows(a.weights, rows, keys, self._init_kind, self._init_scale, self._config.seed)
        a.key[rows] = keys
        a.last_update[rows] = self._clock
        a.update_count[rows] = 0
        a.version[rows] = version
        self._oldest = min(self._oldest, self._clock)
        if admitted:
            self._counters["admitted"] += int(keys.shape[0])
        return rows

    def _fill_absent(self, k: np.ndarray, rows: np.ndarray, from_apply: bool) -> bool:
        """Sight absent keys, insert admitted ones and fill their rows in ``rows``."""
        miss = rows < 0
        if not miss.any():
            return False
        absent = unique_sorted(k[miss])
        new = self._admitted(absent, from_apply)
        if not new.shape[0]:
            return False
        self._insert(new, self._version + 1)
        rows[miss] = self._index.find(k[miss])
        return True

    # -- the training/serving API -----------------------------------------------------------

    def lookup(self, keys: Any, train: bool = False) -> torch.Tensor:
        """Rows of ``keys`` (int64 ``[n]``) as float32 ``[n, dim]`` on the table's device.

        Unknown and not-yet-admitted keys read zeros. ``train=True`` counts a sighting for
        each absent key (once per step) and inserts those reaching ``admit_threshold``, so
        the forward pass sees their initial rows; ``train=False`` changes nothing.
        """
        k = as_keys(keys)
        check_reserved(k)
        rows = self._index.find(k)
        if train:
            if self._fill_absent(k, rows, from_apply=False):
                self._version += 1
            self._looked_up = (k.copy(), rows.copy(), self._version)
        out = np.empty((k.shape[0], self._dim), dtype=np.float32)
        gather_rows(self._arena.weights, rows, out)
        t = torch.from_numpy(out)
        return t if self._device.type == "cpu" else t.to(self._device)

    def apply_gradients(self, keys: Any, grads: Any, now: Any) -> None:
        """Run the optimizer on the rows of ``keys`` with gradients ``grads`` ``[n, dim]``.

        Gradients of repeated keys are summed first. Absent keys are sighted (unless a
        train lookup already counted them this step) and inserted when admitted;
        gradients of keys still filtered are dropped (``stats()["filtered"]``). Updated
        rows get ``last_update = now`` (event-time seconds).
        """
        k = as_keys(keys)
        check_reserved(k)
        g = as_float_rows(grads, k.shape[0], self._dim, "grads")
        t = _as_int(now)
        rows = self._rows_of_last_lookup(k)
        if rows is None:
            rows = self._index.find(k)
        inserted = self._fill_absent(k, rows, from_apply=True)
        self._pending = _EMPTY_KEYS
        self._clock = max(self._clock, t)
        n = k.shape[0]
        a = self._arena
        urows = np.empty(n, dtype=np.int64)
        gsum = np.empty((n, self._dim), dtype=np.float32)
        u = sum_by_row(rows, g, a.mark, urows, gsum)
        self._counters["filtered"] += int((rows < 0).sum())
        if u == 0:
            if inserted:
                self._version += 1  # rows were created though none got a gradient
            return
        urows = urows[:u]
        gsum = gsum[:u]
        self._version += 1
        apply_optimizer(self._config.optimizer, a.weights, a.slots, a.meta, urows, gsum, t,
                        self._version, self._scratch)

    def _rows_of_last_lookup(self, k: np.ndarray) -> np.ndarray | None:
        """The rows the last train lookup found for exactly these keys, if the table has
        not changed since (a copy: the caller fills in absent ones); else ``None``."""
        cached, self._looked_up = self._looked_up, None
        if cached is None:
            return None
        keys, rows, version = cached
        if version != self._version or keys.shape != k.shape or not np.array_equal(keys, k):
            return None
        return rows.copy()

    def evict_expired(self, now: Any) -> torch.Tensor:
        """Delete rows whose last update is more than ``ttl_seconds`` before ``now`` (event
        time); returns the evicted keys (int64 tensor, sorted)."""
        t = _as_int(now)
        self._clock = max(self._clock, t)
        ttl = self._config.ttl_seconds
        if ttl is None or len(self) == 0 or not expired(np.array([self._oldest]), t, ttl)[0]:
            return torch.zeros(0, dtype=torch.int64)  # even the oldest row is fresh enough
        a = self._arena
        live = a.live_rows()
        last = a.last_update[live]
        gone = expired(last, t, ttl)
        keep = last[~gone]
        self._oldest = int(keep.min()) if keep.shape[0] else _NEVER
        rows = live[gone]
        if not rows.shape[0]:
            return torch.zeros(0, dtype=torch.int64)
        keys = np.sort(a.key[rows])
        self._delete(keys, rows)
        self._counters["evicted"] += int(keys.shape[0])
        return torch.from_numpy(keys)

    def _delete(self, keys: np.ndarray, rows: np.ndarray) -> None:
        self._index.erase(keys)
        self._arena.free(rows)
        self._version += 1
        self._log.append(keys, self._version)

    # -- direct row access (restore, serving-side stores) -----------------------------------

    def erase(self, keys: Any) -> torch.Tensor:
        """Delete ``keys``; returns a bool mask ``[n]`` of those that were present."""
        k = as_keys(keys)
        check_reserved(k)
        rows = self._index.find(k)
        present = rows >= 0
        if present.any():
            uk, first = np.unique(k[present], return_index=True)
            self._delete(uk, rows[present][first])
            self._counters["erased"] += int(uk.shape[0])
            # a key repeated in the batch is present only at its first occurrence
            seen = np.zeros(k.shape[0], dtype=np.bool_)
            seen[np.flatnonzero(present)[first]] = True
            present = seen
        return torch.from_numpy(present)

    def load_rows(
        self,
        keys: Any,
        rows: Any,
        slots: Mapping[str, Any] | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        """Write rows directly: ``rows`` ``[n, dim]`` for unique ``keys`` ``[n]``.

        Absent keys are inserted (no admission). ``slots`` (``{name: [n, width]}``) sets
        optimizer slots, else they are reset; ``meta`` may hold ``last_update`` and
        ``update_count`` (int64 ``[n]``), else ``(newest event time, 0)``.
        """
        k = as_keys(keys)
        check_reserved(k)
        n = k.shape[0]
        w = as_float_rows(rows, n, self._dim, "rows")
        if unique_sorted(k).shape[0] != n:
            raise InvalidInputError("load_rows needs unique keys; got duplicates")
        sl: dict[str, np.ndarray] = {}
        for name, value in (slots or {}).items():
            if name not in self._specs:
                raise InvalidInputError(
                    f"unknown slot {name!r} for optimizer {self._config.optimizer.kind!r}; "
                    f"expected {sorted(self._specs)}"
                )
            sl[name] = as_float_rows(value, n, self._specs[name][0], f"slots[{name!r}]")
        md: dict[str, np.ndarray] = {}
        for name, value in (meta or {}).items():
            if name not in ("last_update", "update_count"):
                raise InvalidInputError(
                    f"unknown meta {name!r}; expected 'last_update' or 'update_count'"
                )
            arr = as_keys(value, f"meta[{name!r}]")
            if arr.shape[0] != n:
                raise InvalidInputError(f"meta[{name!r}] must have shape [{n}], got {arr.shape}")
            md[name] = arr
        if n == 0:
            return
        version = self._version + 1
        r = self._index.find(k)
        missing = r < 0
        if missing.any():
            r[missing] = self._insert(k[missing], version, admitted=False)
        a = self._arena
        a.weights[r] = w
        for name, (_, init) in self._specs.items():
            a.slots[name][r] = sl[name] if name in sl else init
        a.last_update[r] = md.get("last_update", self._clock)
        self._oldest = min(self._oldest, int(a.last_update[r].min()))
        a.update_count[r] = md.get("update_count", 0)
        a.version[r] = version
        self._version = version

    # -- change tracking --------------------------------------------------------------------

    def changes_since(self, version: int, include_state: bool = False) -> TableDelta:
        """Rows written and keys deleted after ``version`` (see :class:`TableDelta`);
        ``include_state=True`` adds optimizer slots and metadata (incremental snapshots)."""
        v = _as_int(version, "version")
        a = self._arena
        sel = a.rows_written_after(v)
        order = np.argsort(a.key[sel], kind="stable")
        sel = sel[order]
        keys = a.key[sel]
        deleted = self._log.since(v)
        if deleted.shape[0] and len(self):
            deleted = deleted[self._index.find(deleted) < 0]
        delta_slots = last = count = None
        if include_state:
            delta_slots = {name: arr[sel] for name, arr in a.slots.items()}
            last = a.last_update[sel]
            count = a.update_count[sel]
        return TableDelta(keys=keys, rows=a.weights[sel], deleted_keys=deleted,
                          version=self._version, since=v, slots=delta_slots,
                          last_update=last, update_count=count)

    def trim_changes(self, version: int) -> None:
        """Forget logged deletions at or before ``version`` (every reader is past it)."""
        self._log.trim(_as_int(version, "version"))

    # -- state ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The whole table as key-sorted compact arrays (independent of sharding and of
        the index layout): ``keys``, ``weights``, ``slot.<name>``, ``last_update``,
        ``update_count``, ``row_version``, filter counters, deletion log, counters."""
        a = self._arena
        live = a.live_rows()
        sel = live[np.argsort(a.key[live], kind="stable")]
        dkeys, dvers = self._log.arrays()
        sd: dict[str, Any] = {
            "format": STATE_FORMAT,
            "name": self.name,
            "dim": self._dim,
            "optimizer": self._config.optimizer.kind,
            "keys": a.key[sel],
            "weights": a.weights[sel],
            "last_update": a.last_update[sel],
            "update_count": a.update_count[sel],
            "row_version": a.version[sel],
            "version": self._version,
            "clock": self._clock,
            "pending": self._pending.copy(),
            "deleted_keys": dkeys.copy(),
            "deleted_versions": dvers.copy(),
        }
        for name, arr in a.slots.items():
            sd[f"slot.{name}"] = arr[sel]
        if self._filter is not None:
            sd["filter.counters"] = self._filter.state_dict()["counters"]
        for name, value in self._counters.items():
            sd[f"stat.{name}"] = value
        return sd

    def staged_state(self, rows: int) -> StagedState:
        """An empty state of ``rows`` rows to fill in place: its row arrays are views of a
        new row arena sized for this table (``max(rows, initial_capacity)`` rows), so
        :meth:`load_state_dict` adopts them instead of copying (a restore writes the rows
        once). An empty table whose arena was never used and has room lends that arena
        (its pages are mapped already) and keeps a one-row one until the load. See
        :class:`~monolith_py.table.staging.StagedState`; the table's contents are unchanged
        until the state is loaded."""
        n = _as_int(rows, "rows")
        if n < 0:
            raise InvalidInputError(f"rows must be >= 0, got {n}")
        arena = self._arena
        if len(self) == 0 and arena.reuse_for_load(n):
            # an empty table lends its arena (pages already mapped) and keeps a minimal one
            self._arena = RowArena(self._dim, self._specs, 1)
            self._looked_up = None
        else:
            arena = RowArena.for_load(self._dim, self._specs, n, self._config.initial_capacity)
        return StagedState(self, arena, n, {
            "format": STATE_FORMAT, "name": self.name, "dim": self._dim,
            "optimizer": self._config.optimizer.kind})

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the table's contents with ``state`` (from :meth:`state_dict`, possibly
        another shard layout, or a filled :meth:`staged_state`). Everything is validated
        first; on error the table is unchanged."""
        s = check_state(state, self._dim, self._config.optimizer.kind, self._specs,
                        None if self._filter is None else self._filter.state_dict()["counters"])
        keys = s["keys"]
        n = keys.shape[0]
        # an empty table (a restarted one) fills its own index: its pages were mapped when
        # the table was created, a new one's would fault in now (slow on a fresh process)
        reuse = len(self._index) == 0
        index = self._index if reuse else CuckooHashMap(
            max(self._config.initial_capacity, 1), self._config.max_load_factor)
        try:
            index.reserve(n)
            index.insert_or_assign(keys, np.arange(n, dtype=np.int64))
            arena = state.take_arena(self) if isinstance(state, StagedState) else None
            if arena is None:  # copy: each array written once, into pages mapped in one call
                arena = RowArena.for_load(self._dim, self._specs, n, self._config.initial_capacity)
                arena.meta[:n, KEY] = keys
                arena.meta[:n, LAST] = s["last_update"]
                arena.meta[:n, COUNT] = s["update_count"]
                arena.meta[:n, VERSION] = s["row_version"]
                arena.weights[:n] = s["weights"]
                for name in self._specs:
                    arena.slots[name][:n] = s[f"slot.{name}"]
        except BaseException:
            if reuse:  # the table stays empty
                index.clear()
            raise
        log = DeletionLog()
        if s["deleted_keys"].shape[0]:
            log.keys.append(s["deleted_keys"].copy())
            log.versions.append(s["deleted_versions"].copy())
        # commit
        self._index, self._arena, self._log = index, arena, log
        self._looked_up = None
        self._pending = s["pending"].copy()
        self._version = s["version"]
        self._clock = s["clock"]
        self._oldest = int(s["last_update"].min()) if n else _NEVER
        self._counters = {name: s[f"stat.{name}"] for name in self._counters}
        if self._filter is not None:
            self._filter.load_state_dict({"counters": s["filter.counters"]})

    # -- stats ------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Size, capacity, counters and memory of the table."""
        a = self._arena
        fmem = self._filter.memory_bytes if self._filter is not None else 0
        return {
            "name": self.name,
            "size": len(self),
            "capacity": a.capacity,
            "index_capacity": self._index.capacity,
            "index_load_factor": self._index.load_factor,
            **self._counters,
            "version": self._version,
            "deletion_log": len(self._log),
            "filter_memory_bytes": fmem,
            "index_memory_bytes": self._index.memory_bytes,
            "row_memory_bytes": a.memory_bytes,
            "memory_bytes": fmem + self._index.memory_bytes + a.memory_bytes,
        }
