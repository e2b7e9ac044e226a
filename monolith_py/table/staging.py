"""``StagedState``: a table state whose rows are written in place into a new row arena, so
that loading it moves no row (restores write each byte of the state once).

:meth:`EmbeddingTable.staged_state(n) <monolith_py.table.EmbeddingTable.staged_state>`
returns one; the caller fills its row arrays, sets the scalar entries, and passes it to
:meth:`~monolith_py.table.EmbeddingTable.load_state_dict` (directly, or inside a PS shard
state), which validates it like any state and then adopts the arena instead of copying
it. Anything else, or a staged state that was changed in a way adoption cannot trust (an
array replaced, another table's, already loaded), is loaded by copying, as any state.

Example::

    >>> import numpy as np
    >>> from monolith_py.table import EmbeddingTable, OptimizerConfig, TableConfig
    >>> t = EmbeddingTable(TableConfig("t", dim=2, optimizer=OptimizerConfig("adagrad")))
    >>> st = t.staged_state(3)
    >>> st.meta[:, 0] = [5, 7, 9]                 # keys (strictly increasing)
    >>> st.meta[:, 1:] = 0                        # last_update, update_count, row_version
    >>> st.weights[:] = 1.0
    >>> st.slots["sum"][:] = 0.1                  # Adagrad accumulators
    >>> st.update(version=0, clock=0, pending=np.zeros(0, np.int64),
    ...           deleted_keys=np.zeros(0, np.int64), deleted_versions=np.zeros(0, np.int64),
    ...           **{"stat.admitted": 3, "stat.filtered": 0, "stat.evicted": 0, "stat.erased": 0})
    >>> t.load_state_dict(st)
    >>> len(t), t.lookup(np.array([7])).tolist()
    (3, [[1.0, 1.0]])
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["StagedState"]


class StagedState(dict):  # type: ignore[type-arg]
    """A state dict (``EmbeddingTable.state_dict()`` layout) of ``rows`` rows whose arrays
    are views of a row arena not yet in use.

    Attributes:
        rows: number of rows ``n``.
        meta: int64 ``[n, 4]``, one record per row: ``(key, last_update, update_count,
            row_version)``; the entries ``keys``, ``last_update``, ``update_count`` and
            ``row_version`` are its columns.
        weights: float32 ``[n, dim]`` (the entry ``weights``).
        slots: ``{name: float32 [n, width]}`` (the entries ``slot.<name>``).

    Fill the arrays in place (keys strictly increasing), then set ``version``, ``clock``,
    ``pending``, ``deleted_keys``, ``deleted_versions``, ``stat.<counter>`` and, for a
    table with an admission filter, ``filter.counters``. ``keys`` may be replaced by an
    equal contiguous array (it is checked against the key column).
    """

    def __init__(self, owner: Any, arena: Any, rows: int, fixed: dict[str, Any]) -> None:
        super().__init__(fixed)
        self.rows = int(rows)
        self.meta: np.ndarray = arena.meta[: self.rows]
        self.weights: np.ndarray = arena.weights[: self.rows]
        self.slots: dict[str, np.ndarray] = {n: a[: self.rows] for n, a in arena.slots.items()}
        self._owner = owner
        self._arena: Any = arena
        self._views: dict[str, np.ndarray] = {
            "weights": self.weights,
            "last_update": self.meta[:, 1], "update_count": self.meta[:, 2],
            "row_version": self.meta[:, 3],
            **{f"slot.{n}": a for n, a in self.slots.items()},
        }
        self._keys = self.meta[:, 0]
        self.update(self._views)
        self["keys"] = self._keys

    def take_arena(self, owner: Any) -> Any:
        """The arena, if this state may be adopted by ``owner`` as it stands (once);
        ``None`` otherwise (the state is then loaded by copying)."""
        if owner is not self._owner or self._arena is None:
            return None
        if any(self.get(k) is not v for k, v in self._views.items()):
            return None
        keys = self.get("keys")
        if keys is not self._keys and not (
                isinstance(keys, np.ndarray) and np.array_equal(keys, self._keys)):
            return None
        arena, self._arena = self._arena, None
        return arena
