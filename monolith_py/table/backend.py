"""The seam between the embedding module and wherever the sparse parameters live.

:class:`SparseBackend` is what :class:`~monolith_py.modules.DynamicEmbeddingBagCollection`
talks to. One call carries a whole step's keys for *all* tables, so a remote
implementation (the parameter-server client in :mod:`monolith_py.ps`) can batch them into
one request per shard. :class:`LocalBackend` is the single-process implementation over
in-memory :class:`~monolith_py.table.EmbeddingTable` objects.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import torch

from monolith_py.errors import InvalidInputError, InvalidTypeError

if TYPE_CHECKING:  # pragma: no cover
    from monolith_py.table import EmbeddingTable

__all__ = ["SparseBackend", "LocalBackend"]


@runtime_checkable
class SparseBackend(Protocol):
    """Sparse parameters of several named tables.

    Contract:

    * Callers pass **unique** int64 keys per table (the module deduplicates); tensors are
      1-D ``[n]`` keys and ``[n, dim]`` float32 rows/gradients, ``dim`` being the table's.
    * Call order per training step: ``lookup(keys, train=True)`` (forward) ->
      ``apply_gradients(grads, now)`` (after ``loss.backward()``). ``evict_expired(now)``
      and ``stats()`` may be called between steps. Scoring without training uses
      ``lookup(keys, train=False)``, which must not change any state.
    * ``now`` is event time in integer seconds (the newest event timestamp seen), never the
      wall clock.
    * Every method validates all of its input before changing anything: an invalid
      argument raises :class:`~monolith_py.errors.InvalidInputError` and leaves every
      table as it was.
    * Calls may block (a remote backend waits for its shards, raising
      :class:`~monolith_py.errors.RetriableError` subclasses on timeouts). Implementations
      need not be thread-safe: one trainer thread drives one backend.
    """

    def lookup(self, keys: Mapping[str, torch.Tensor], train: bool) -> dict[str, torch.Tensor]:
        """``{table: unique int64 keys [n]}`` -> ``{table: float32 rows [n, dim]}``.

        ``train=True`` counts sightings for admission and inserts admitted keys (so the
        forward pass sees their initial rows); unknown or filtered keys read zeros.
        ``train=False`` is read-only."""
        ...

    def apply_gradients(
        self, grads: Mapping[str, tuple[torch.Tensor, torch.Tensor]], now: int
    ) -> None:
        """``{table: (unique keys [n], grads [n, dim])}``: run each table's optimizer on
        those rows at event time ``now`` (gradients of still-filtered keys are dropped)."""
        ...

    def evict_expired(self, now: int) -> dict[str, int]:
        """Free rows whose last update is older than their table's TTL at event time
        ``now``; returns ``{table: number of keys evicted}``."""
        ...

    def stats(self) -> dict[str, dict[str, Any]]:
        """``{table: table.stats()}`` (size, capacity, admitted, filtered, evicted, ...)."""
        ...


def _finite(t: torch.Tensor) -> bool:
    # numpy on CPU: single-threaded, so no OpenMP stall per table on a busy machine
    if t.device.type == "cpu":
        return bool(np.isfinite(t.detach().numpy()).all())
    return bool(torch.isfinite(t).all())


class LocalBackend:
    """:class:`SparseBackend` over in-process :class:`~monolith_py.table.EmbeddingTable`s.

    Args:
        tables: table name -> table. The module builds one per ``TableConfig`` when it is
            given no backend.

    Example::

        >>> import torch
        >>> from monolith_py.table import EmbeddingTable, TableConfig
        >>> backend = LocalBackend({"user": EmbeddingTable(TableConfig("user", dim=4))})
        >>> rows = backend.lookup({"user": torch.tensor([3, 9])}, train=True)
        >>> rows["user"].shape
        torch.Size([2, 4])
        >>> backend.apply_gradients({"user": (torch.tensor([3, 9]), torch.ones(2, 4))}, now=100)
    """

    def __init__(self, tables: Mapping[str, EmbeddingTable]) -> None:
        if not tables:
            raise InvalidInputError("LocalBackend needs at least one table, got none")
        self._tables: dict[str, EmbeddingTable] = dict(tables)
        self._dims: dict[str, int] = {name: int(t.config.dim) for name, t in self._tables.items()}

    @property
    def tables(self) -> dict[str, EmbeddingTable]:
        """The wrapped tables (name -> table)."""
        return self._tables

    def dim(self, table: str) -> int:
        """Embedding width of ``table``."""
        self._check_name(table)
        return self._dims[table]

    # -- validation (all of it before any table is touched) -----------------------------

    def _check_name(self, name: str) -> None:
        if name not in self._tables:
            raise InvalidInputError(
                f"unknown table {name!r}; this backend holds {sorted(self._tables)}"
            )

    def _check_keys(self, name: str, keys: torch.Tensor) -> None:
        if not isinstance(keys, torch.Tensor):
            raise InvalidTypeError(
                f"table {name!r}: keys must be a torch.Tensor, got {type(keys).__name__}"
            )
        if keys.dtype != torch.int64:
            raise InvalidTypeError(f"table {name!r}: keys must be int64, got {keys.dtype}")
        if keys.dim() != 1:
            raise InvalidInputError(
                f"table {name!r}: keys must be 1-D [n], got shape {tuple(keys.shape)}"
            )

    # -- SparseBackend ------------------------------------------------------------------

    def lookup(self, keys: Mapping[str, torch.Tensor], train: bool) -> dict[str, torch.Tensor]:
        for name, k in keys.items():
            self._check_name(name)
            self._check_keys(name, k)
        return {name: self._tables[name].lookup(k, train=train) for name, k in keys.items()}

    def apply_gradients(
        self, grads: Mapping[str, tuple[torch.Tensor, torch.Tensor]], now: int
    ) -> None:
        for name, (k, g) in grads.items():
            self._check_name(name)
            self._check_keys(name, k)
            dim = self._dims[name]
            if not isinstance(g, torch.Tensor) or g.shape != (k.shape[0], dim):
                got = tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
                raise InvalidInputError(
                    f"table {name!r}: gradients must have shape [{k.shape[0]}, {dim}], got {got}"
                )
            if g.numel() and not _finite(g):
                raise InvalidInputError(f"table {name!r}: gradients contain NaN/inf")
        for name, (k, g) in grads.items():
            if k.numel():
                self._tables[name].apply_gradients(k, g, now)

    def evict_expired(self, now: int) -> dict[str, int]:
        return {name: int(t.evict_expired(now).numel()) for name, t in self._tables.items()}

    def stats(self) -> dict[str, dict[str, Any]]:
        return {name: dict(t.stats()) for name, t in self._tables.items()}

    # -- state ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """``{table: table.state_dict()}``."""
        return {name: t.state_dict() for name, t in self._tables.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore every table from :meth:`state_dict` output (all names must match)."""
        missing = sorted(set(self._tables) - set(state))
        extra = sorted(set(state) - set(self._tables))
        if missing or extra:
            raise InvalidInputError(
                f"backend state does not match its tables: missing {missing}, unexpected {extra}"
            )
        for name, t in self._tables.items():
            t.load_state_dict(state[name])
