"""Gauges from the stats dictionaries roles already compute (training, tables, joiner).

Roles call these every second or so from their main loop; the supervisor scrapes the
result. Values are *gauges* even where they count (a restored process starts from its
snapshot's counters, not from zero, so they are levels rather than Prometheus counters).

Example::

    >>> export_training({"auc": 0.71, "examples": 1000, "examples_per_s": 5e3}, "trainer/0")
    >>> export_tables({"user": {"size": 10, "admitted": 12, "filtered": 3}}, "ps/0")
    >>> from monolith_py.observe.metrics import render
    >>> 'monolith_table_rows{role="ps/0",table="user"} 10.0' in render().decode()
    True
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from monolith_py.observe.metrics import gauge

__all__ = ["export_training", "export_tables", "export_values", "TRAINING_KEYS", "TABLE_KEYS"]

TRAINING_KEYS = {
    "auc": "monolith_train_auc",
    "window_auc": "monolith_train_window_auc",
    "log_loss": "monolith_train_log_loss",
    "calibration": "monolith_train_calibration",
    "examples": "monolith_train_examples",
    "trained_examples": "monolith_train_trained_examples",
    "steps": "monolith_train_steps",
    "bad_batches": "monolith_train_bad_batches",
    "examples_per_s": "monolith_train_examples_per_second",
    "event_time": "monolith_train_event_time_seconds",
    "expired": "monolith_train_expired",
}
"""``OnlineTrainer.metrics()`` key -> gauge name (label ``role``)."""

TABLE_KEYS = {
    "size": "monolith_table_rows",
    "admitted": "monolith_table_admitted",
    "filtered": "monolith_table_filtered",
    "evicted": "monolith_table_expired",
    "memory_bytes": "monolith_table_memory_bytes",
}
"""``EmbeddingTable.stats()`` key -> gauge name (labels ``role``, ``table``)."""


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def export_values(values: Mapping[str, Any], names: Mapping[str, str], role: str,
                  doc: str = "Role statistic.") -> None:
    """Set gauge ``names[k]{role}`` to ``values[k]`` for every numeric, finite value."""
    for key, metric in names.items():
        v = _num(values.get(key))
        if v is not None:
            gauge(metric, doc, ["role"]).labels(role=role).set(v)


def export_training(m: Mapping[str, Any], role: str) -> None:
    """Export an ``OnlineTrainer.metrics()`` dict (AUC, log loss, examples, speed...)."""
    export_values(m, TRAINING_KEYS, role, "Online training statistic (progressive).")


def export_tables(stats: Mapping[str, Mapping[str, Any]], role: str) -> None:
    """Export ``{table: EmbeddingTable.stats()}`` (rows, admitted, filtered, expired,
    memory) with labels ``role`` and ``table``."""
    for table, st in stats.items():
        for key, metric in TABLE_KEYS.items():
            v = _num(st.get(key))
            if v is not None:
                gauge(metric, "Embedding table statistic.", ["role", "table"]).labels(
                    role=role, table=table).set(v)
