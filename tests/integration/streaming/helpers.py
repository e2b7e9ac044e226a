"""Shared helpers for the streaming integration tests."""

from __future__ import annotations

import numpy as np

from streaming.columns import ExampleColumns

NAMES = ("user", "item", "tags")


def make_columns(first_id: int, n: int, seed: int = 0, dense: int = 2) -> ExampleColumns:
    """``n`` examples with ids ``first_id .. first_id + n - 1`` (variable-length tags)."""
    rng = np.random.default_rng(seed + first_id)
    lengths = np.ones((3, n), dtype=np.int32)
    lengths[2] = rng.integers(0, 4, size=n)
    total = int(lengths.sum())
    return ExampleColumns(
        names=NAMES,
        lengths=lengths,
        values=rng.integers(0, 1 << 40, size=total),
        weights=None,
        dense=rng.standard_normal((n, dense)).astype(np.float32),
        labels=(rng.random(n) < 0.3).astype(np.float32),
        timestamps=np.arange(first_id, first_id + n, dtype=np.int64) + 1_700_000_000,
        example_ids=np.arange(first_id, first_id + n, dtype=np.int64),
    )


def ids_of(batches: list) -> list[int]:
    """All example ids of a list of Batches or ExampleColumns, in order."""
    out: list[int] = []
    for b in batches:
        ids = b.example_ids
        out.extend(ids.tolist())
    return out
