"""``PSShard``: the sparse parameters one parameter-server shard owns.

A shard holds, for every table of the job, the keys ``k`` with
``shard_of(k, num_shards) == shard_id`` (see :mod:`monolith_py.ps.routing`): their rows,
optimizer slots, metadata and admission-filter state, in one
:class:`~monolith_py.table.EmbeddingTable` per table. It is a plain object: single-process
mode calls it directly (:class:`~monolith_py.ps.ShardedBackend`), multi-process mode
serves it over gRPC (:class:`~monolith_py.ps.PSServer`).

Contract:

* Every method validates all of its input (table names, dtypes, shapes, finiteness, key
  ownership) before it changes anything; a bad call raises
  :class:`~monolith_py.errors.InvalidInputError` and leaves every table unchanged.
* Keys that the routing hash sends to another shard are rejected, never stored.
* Thread-safe: every method holds :attr:`lock` (an ``RLock``). Code that reads
  :attr:`tables` from another thread (train -> serve sync via ``changes_since``,
  snapshots via ``state_dict``) must hold ``shard.lock`` while it reads.
* Time (``now``) is event time in integer seconds, passed in.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import numpy as np

from monolith_py.errors import InvalidInputError, InvalidTypeError
from monolith_py.ps.routing import ROUTING_VERSION, first_foreign, shard_of
from monolith_py.table import EmbeddingTable, TableConfig

__all__ = ["PSShard", "table_config_dict"]

_STATE_FORMAT = "monolith.ps_shard.v1"


def table_config_dict(config: TableConfig) -> dict[str, Any]:
    """A table's config as plain JSON values (what a shard reports and a client compares:
    a trainer whose table settings differ from the shards' is refused at connect)."""
    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(config))  # type: ignore[no-any-return]


def _as_keys(table: str, keys: Any) -> np.ndarray:
    arr = keys.detach().cpu().numpy() if hasattr(keys, "detach") else keys
    if not isinstance(arr, np.ndarray):
        raise InvalidTypeError(
            f"table {table!r}: keys must be a numpy array or torch tensor, got "
            f"{type(keys).__name__}")
    if arr.dtype != np.int64:
        raise InvalidTypeError(f"table {table!r}: keys must be int64, got {arr.dtype}")
    if arr.ndim != 1:
        raise InvalidInputError(f"table {table!r}: keys must be 1-D [n], got shape {arr.shape}")
    return np.ascontiguousarray(arr)


def _as_grads(table: str, grads: Any, n: int, dim: int) -> np.ndarray:
    arr = grads.detach().cpu().numpy() if hasattr(grads, "detach") else grads
    if not isinstance(arr, np.ndarray):
        raise InvalidTypeError(
            f"table {table!r}: grads must be a numpy array or torch tensor, got "
            f"{type(grads).__name__}")
    if arr.dtype != np.float32:
        raise InvalidTypeError(f"table {table!r}: grads must be float32, got {arr.dtype}")
    if arr.shape != (n, dim):
        raise InvalidInputError(
            f"table {table!r}: grads must have shape [{n}, {dim}] (one row per key), got "
            f"{list(arr.shape)}")
    if arr.size and not np.isfinite(arr).all():
        raise InvalidInputError(f"table {table!r}: grads contain NaN/inf")
    return arr


class PSShard:
    """Shard ``shard_id`` of ``num_shards``: one embedding table per configured table.

    Args:
        shard_id: this shard's index, ``0 <= shard_id < num_shards``.
        num_shards: how many shards the job has (the routing modulus).
        tables: the job's tables, as :class:`~monolith_py.table.TableConfig`s (the shard
            builds empty tables) or as ready ``{name: EmbeddingTable}`` (which must hold
            only keys this shard owns).

    Shapes: ``pull`` takes int64 keys ``[n]`` and returns float32 rows ``[n, dim]``;
    ``push`` takes the same keys and float32 gradients ``[n, dim]``.

    Example::

        >>> import numpy as np
        >>> from monolith_py.ps.routing import shard_of
        >>> from monolith_py.table import TableConfig
        >>> shard = PSShard(0, 2, [TableConfig("user", dim=4)])
        >>> keys = np.arange(100, dtype=np.int64)
        >>> mine = keys[shard_of(keys, 2) == 0]
        >>> shard.pull("user", mine, train=True).shape == (mine.shape[0], 4)
        True
        >>> shard.push("user", mine, np.ones((mine.shape[0], 4), np.float32), now=10)
        >>> shard.stats()["user"]["size"] == mine.shape[0]
        True
    """

    def __init__(self, shard_id: int, num_shards: int,
                 tables: Sequence[TableConfig] | Mapping[str, EmbeddingTable]) -> None:
        for name, v in (("shard_id", shard_id), ("num_shards", num_shards)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise InvalidTypeError(f"{name} must be an int, got {type(v).__name__}")
        if not 0 <= int(shard_id) < int(num_shards):
            raise InvalidInputError(
                f"need 0 <= shard_id < num_shards, got shard_id={shard_id}, "
                f"num_shards={num_shards}")
        self._shard_id = int(shard_id)
        self._num_shards = int(num_shards)
        shard_of(np.zeros(0, np.int64), self._num_shards)  # validates the range
        built: dict[str, EmbeddingTable] = {}
        if isinstance(tables, Mapping):
            for name, t in tables.items():
                if not isinstance(t, EmbeddingTable) or t.name != name:
                    raise InvalidInputError(
                        f"tables must map each name to its EmbeddingTable; {name!r} maps to "
                        f"{t!r}")
                if len(t):
                    keys = t.state_dict()["keys"]
                    self._check_owned(name, keys)
                built[name] = t
        else:
            for cfg in tables:
                if not isinstance(cfg, TableConfig):
                    raise InvalidTypeError(
                        f"tables must be TableConfigs, got {type(cfg).__name__}")
                if cfg.name in built:
                    raise InvalidInputError(f"table {cfg.name!r} is configured twice")
                built[cfg.name] = EmbeddingTable(cfg)
        if not built:
            raise InvalidInputError("a PS shard needs at least one table, got none")
        self._tables = built
        self._dims = {name: t.dim for name, t in built.items()}
        self.lock = threading.RLock()

    # -- introspection ----------------------------------------------------------------------

    @property
    def shard_id(self) -> int:
        return self._shard_id

    @property
    def num_shards(self) -> int:
        return self._num_shards

    @property
    def tables(self) -> Mapping[str, EmbeddingTable]:
        """Read-only view ``{name: EmbeddingTable}``. Readers on other threads hold
        :attr:`lock`; only this object's methods mutate the tables."""
        return MappingProxyType(self._tables)

    @property
    def dims(self) -> dict[str, int]:
        """``{table: dim}``."""
        return dict(self._dims)

    def info(self) -> dict[str, Any]:
        """What a client checks when it connects: ids, routing version and the tables."""
        return {
            "shard_id": self._shard_id,
            "num_shards": self._num_shards,
            "routing_version": ROUTING_VERSION,
            "tables": {name: {"dim": t.dim, "config": table_config_dict(t.config)}
                       for name, t in self._tables.items()},
        }

    def __repr__(self) -> str:
        return (f"PSShard({self._shard_id}/{self._num_shards}, "
                f"tables={sorted(self._tables)})")

    # -- validation ---------------------------------------------------------------------------

    def _check_table(self, table: Any) -> str:
        if not isinstance(table, str) or table not in self._tables:
            raise InvalidInputError(
                f"shard {self._shard_id}: unknown table {table!r}; it holds "
                f"{sorted(self._tables)}")
        return table

    def _check_owned(self, table: str, keys: np.ndarray) -> None:
        bad = first_foreign(keys, self._shard_id, self._num_shards)
        if bad >= 0:
            owner = int(shard_of(keys[bad : bad + 1], self._num_shards)[0])
            raise InvalidInputError(
                f"shard {self._shard_id} of {self._num_shards}: table {table!r} got key "
                f"{int(keys[bad])} (position {bad}), which belongs to shard {owner}; route "
                "keys with monolith_py.ps.routing.shard_of")

    def _keys(self, table: str, keys: Any) -> np.ndarray:
        k = _as_keys(table, keys)
        self._check_owned(table, k)
        return k

    # -- single table -------------------------------------------------------------------------

    def pull(self, table: str, keys: Any, train: bool) -> np.ndarray:
        """Rows of ``keys`` (int64 ``[n]``) of ``table``: float32 ``[n, dim]``.
        ``train=True`` counts sightings and inserts admitted keys; unknown or filtered
        keys read zeros."""
        return self.pull_many({table: keys}, train)[table]

    def push(self, table: str, keys: Any, grads: Any, now: int) -> None:
        """Apply float32 gradients ``[n, dim]`` of unique int64 ``keys`` ``[n]`` with the
        table's optimizer at event time ``now``."""
        self.push_many({table: (keys, grads)}, now)

    # -- several tables (one RPC) ---------------------------------------------------------------

    def pull_many(self, keys: Mapping[str, Any], train: bool) -> dict[str, np.ndarray]:
        """``{table: int64 keys [n]}`` -> ``{table: float32 rows [n, dim]}``; all input is
        validated before any table is touched."""
        checked = {self._check_table(t): self._keys(t, k) for t, k in keys.items()}
        train = bool(train)
        with self.lock:
            return {t: self._tables[t].lookup(k, train=train).numpy()
                    for t, k in checked.items()}

    def push_many(self, grads: Mapping[str, tuple[Any, Any]], now: int) -> int:
        """``{table: (unique int64 keys [n], float32 grads [n, dim])}`` at event time
        ``now``; returns the number of (table, key) gradients applied. Everything is
        validated before any table changes."""
        if isinstance(now, bool) or not isinstance(now, (int, np.integer)):
            raise InvalidTypeError(f"now must be an int (event-time seconds), got {now!r}")
        checked = []
        for t, pair in grads.items():
            self._check_table(t)
            if not isinstance(pair, tuple) or len(pair) != 2:
                raise InvalidInputError(f"table {t!r}: expected (keys, grads), got {pair!r}")
            k = self._keys(t, pair[0])
            g = _as_grads(t, pair[1], k.shape[0], self._dims[t])
            checked.append((t, k, g))
        total = 0
        with self.lock:
            for t, k, g in checked:
                if k.shape[0]:
                    self._tables[t].apply_gradients(k, g, int(now))
                    total += int(k.shape[0])
        return total

    def evict_expired(self, now: int) -> dict[str, int]:
        """Evict rows older than each table's TTL at event time ``now``;
        ``{table: keys evicted}``."""
        if isinstance(now, bool) or not isinstance(now, (int, np.integer)):
            raise InvalidTypeError(f"now must be an int (event-time seconds), got {now!r}")
        with self.lock:
            return {name: int(t.evict_expired(int(now)).numel())
                    for name, t in self._tables.items()}

    def stats(self) -> dict[str, dict[str, Any]]:
        """``{table: table.stats()}`` (each with ``shard`` added)."""
        with self.lock:
            return {name: {**t.stats(), "shard": self._shard_id}
                    for name, t in self._tables.items()}

    # -- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """``{"format", "shard_id", "num_shards", "routing_version", "tables": {name:
        EmbeddingTable.state_dict()}}`` -- arrays, ints and strings only."""
        with self.lock:
            return {
                "format": _STATE_FORMAT,
                "shard_id": self._shard_id,
                "num_shards": self._num_shards,
                "routing_version": ROUTING_VERSION,
                "tables": {name: t.state_dict() for name, t in self._tables.items()},
            }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict` output. The tables must match by name and
        every key must belong to this shard (a state of another layout is split with
        :func:`~monolith_py.ps.routing.shard_of` first). Validated before any change;
        a table whose own load fails is left unchanged, but earlier tables keep their
        new state, so callers treat a failure here as fatal for the shard."""
        fmt = state.get("format") if isinstance(state, Mapping) else None
        if fmt != _STATE_FORMAT:
            raise InvalidInputError(
                f"not a PS shard state (format {fmt!r}, expected {_STATE_FORMAT!r})")
        if state.get("routing_version") != ROUTING_VERSION:
            raise InvalidInputError(
                f"shard state uses routing version {state.get('routing_version')!r}, this "
                f"build routes with version {ROUTING_VERSION}")
        tables = state.get("tables")
        if not isinstance(tables, Mapping) or set(tables) != set(self._tables):
            got = sorted(tables) if isinstance(tables, Mapping) else tables
            raise InvalidInputError(
                f"shard state tables {got} do not match this shard's {sorted(self._tables)}")
        for name, sd in tables.items():
            keys = sd.get("keys") if isinstance(sd, Mapping) else None
            if not isinstance(keys, np.ndarray) or keys.dtype != np.int64 or keys.ndim != 1:
                raise InvalidInputError(f"table {name!r}: state 'keys' must be int64 [n]")
            self._check_owned(name, keys)
        with self.lock:
            for name, sd in tables.items():
                self._tables[name].load_state_dict(sd)
