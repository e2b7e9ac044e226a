"""Collisionless embedding tables: cuckoo index, rows, admission, expiry, sparse optimizers.

Public API (see ``docs/design/0001-architecture-and-contracts.md``, seam 1)::

    from monolith_py.table import CuckooHashMap, EmbeddingTable, TableConfig, OptimizerConfig
"""

from monolith_py.table.admission import CountMinSketch, admit, merge_counters
from monolith_py.table.changes import TableDelta
from monolith_py.table.config import OptimizerConfig, TableConfig
from monolith_py.table.cuckoo import CuckooHashMap
from monolith_py.table.embedding import EmbeddingTable
from monolith_py.table.expiry import expired
from monolith_py.table.init import initial_rows
from monolith_py.table.staging import StagedState

__all__ = [
    "CuckooHashMap",
    "CountMinSketch",
    "EmbeddingTable",
    "OptimizerConfig",
    "StagedState",
    "TableConfig",
    "TableDelta",
    "admit",
    "expired",
    "initial_rows",
    "merge_counters",
]
