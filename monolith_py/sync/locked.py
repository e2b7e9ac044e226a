"""``LockedBackend``: a :class:`~monolith_py.table.backend.SparseBackend` whose every call
holds a lock, so a sync publisher can read the same tables from other threads.

In multi-process mode the PS shard serializes its tables itself; in single-process mode
(one trainer, tables in the same process as the sync service) wrap the trainer's backend:

Example::

    >>> import threading, torch
    >>> from monolith_py.table import EmbeddingTable, TableConfig
    >>> from monolith_py.table.backend import LocalBackend
    >>> from monolith_py.sync.publisher import ShardPublisher
    >>> tables = {"item": EmbeddingTable(TableConfig("item", dim=4))}
    >>> lock = threading.Lock()
    >>> backend = LockedBackend(LocalBackend(tables), lock)
    >>> publisher = ShardPublisher(0, tables, lock=lock)
    >>> backend.lookup({"item": torch.tensor([1])}, train=True)["item"].shape
    torch.Size([1, 4])
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import torch

from monolith_py.table.backend import SparseBackend

__all__ = ["LockedBackend"]


class LockedBackend:
    """Wraps ``backend``; each :class:`SparseBackend` call runs under ``lock``."""

    def __init__(self, backend: SparseBackend, lock: threading.Lock | threading.RLock) -> None:
        self.inner = backend
        self.lock = lock

    def lookup(self, keys: Mapping[str, torch.Tensor], train: bool) -> dict[str, torch.Tensor]:
        with self.lock:
            return self.inner.lookup(keys, train)

    def apply_gradients(self, grads: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                        now: int) -> None:
        with self.lock:
            self.inner.apply_gradients(grads, now)

    def evict_expired(self, now: int) -> dict[str, int]:
        with self.lock:
            return self.inner.evict_expired(now)

    def stats(self) -> dict[str, dict[str, Any]]:
        with self.lock:
            return self.inner.stats()

    def __getattr__(self, name: str) -> Any:  # dim(), tables, state_dict() of the inner one
        return getattr(self.inner, name)
