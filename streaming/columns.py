"""Columnar examples in numpy: the in-memory form between the wire bytes and a ``Batch``.

The codec decodes a message into :class:`ExampleColumns` (numpy views over one owned
copy of the bytes); the Kafka source concatenates the columns of several messages into
one batch, the joiner keeps pending impressions as columns and gathers rows out of them.
Only at the end is a :class:`~monolith_py.batch.Batch` built (``to_batch``), which costs a
few tensor wrappers and no copy of the ids.

Layout (the same as a TorchRec ``KeyedJaggedTensor``): ``lengths`` is ``int32 [F, B]``,
key-major, and ``values`` holds all ids of feature 0 (examples 0..B-1 in order), then
all ids of feature 1, and so on.

Example::

    >>> import numpy as np
    >>> cols = ExampleColumns(
    ...     names=("user", "item"), lengths=np.array([[1, 1], [2, 0]], dtype=np.int32),
    ...     values=np.array([7, 8, 100, 101]), weights=None,
    ...     dense=np.zeros((2, 0), np.float32), labels=np.array([1, 0], np.float32),
    ...     timestamps=np.array([5, 6]), example_ids=np.array([10, 11]))
    >>> take_rows(cols, np.array([1])).values.tolist()
    [8]
    >>> concat_columns([cols, cols]).lengths.tolist()
    [[1, 1, 1, 1], [2, 0, 2, 0]]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from monolith_py.errors import InvalidInputError

if TYPE_CHECKING:
    from monolith_py.batch import Batch

__all__ = [
    "ExampleColumns",
    "check_columns",
    "concat_columns",
    "take_rows",
    "from_batch",
    "to_batch",
    "empty_like",
]


@dataclass(frozen=True)
class ExampleColumns:
    """``B`` examples with ``F`` sparse features and ``D`` dense features, as numpy arrays.

    Attributes:
        names: the ``F`` sparse feature names (KJT keys), in order.
        lengths: int32 ``[F, B]``, ids per (feature, example), key-major.
        values: int64 ``[N]`` with ``N == lengths.sum()``.
        weights: float32 ``[N]`` or ``None``.
        dense: float32 ``[B, D]``.
        labels: float32 ``[B]`` in ``[0, 1]``.
        timestamps: int64 ``[B]``, event time in seconds.
        example_ids: int64 ``[B]`` (request ids in the joiner's input).
    """

    names: tuple[str, ...]
    lengths: np.ndarray
    values: np.ndarray
    weights: np.ndarray | None
    dense: np.ndarray
    labels: np.ndarray
    timestamps: np.ndarray
    example_ids: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def schema(self) -> tuple[tuple[str, ...], int, bool]:
        """What two column sets must share to be concatenated: names, D, weights."""
        return (self.names, int(self.dense.shape[1]), self.weights is not None)

    @property
    def nbytes(self) -> int:
        """Bytes held by the arrays (what a memory bound counts)."""
        total = sum(
            a.nbytes for a in (self.lengths, self.values, self.dense, self.labels,
                               self.timestamps, self.example_ids)
        )
        return total + (self.weights.nbytes if self.weights is not None else 0)


def check_columns(cols: ExampleColumns, error: type[Exception] = InvalidInputError) -> None:
    """Validate shapes, dtypes and values with vectorized checks; raise ``error``.

    Checks: dtypes; ``lengths`` is ``[F, B]`` and non-negative and sums to ``N``;
    ``weights``/``dense`` finite; labels in ``[0, 1]``; timestamps ``>= 0``; feature
    names non-empty and unique.
    """
    f, b = len(cols.names), len(cols)
    expect = (
        ("lengths", cols.lengths, np.int32, 2),
        ("values", cols.values, np.int64, 1),
        ("dense", cols.dense, np.float32, 2),
        ("labels", cols.labels, np.float32, 1),
        ("timestamps", cols.timestamps, np.int64, 1),
        ("example_ids", cols.example_ids, np.int64, 1),
    )
    for name, arr, dtype, ndim in expect:
        if arr.dtype != dtype or arr.ndim != ndim:
            raise error(f"{name} must be {np.dtype(dtype).name} with {ndim} dims, "
                        f"got {arr.dtype} with shape {arr.shape}")
    if cols.lengths.shape != (f, b):
        raise error(f"lengths must have shape [F={f}, B={b}], got {cols.lengths.shape}")
    if cols.dense.shape[0] != b or cols.timestamps.shape != (b,) \
            or cols.example_ids.shape != (b,):
        raise error(f"dense/timestamps/example_ids must have {b} rows, got "
                    f"{cols.dense.shape}, {cols.timestamps.shape}, {cols.example_ids.shape}")
    if len(set(cols.names)) != f or any(not n for n in cols.names):
        raise error(f"feature names must be non-empty and unique, got {list(cols.names)[:16]}")
    if cols.lengths.size:
        if int(cols.lengths.min()) < 0:
            raise error("lengths must be >= 0 (found a negative length)")
        total = int(cols.lengths.sum(dtype=np.int64))
    else:
        total = 0
    if total != cols.values.shape[0]:
        raise error(f"lengths sum to {total} but there are {cols.values.shape[0]} ids")
    if cols.weights is not None:
        if cols.weights.dtype != np.float32 or cols.weights.shape != cols.values.shape:
            raise error(f"weights must be float32 [{cols.values.shape[0]}], got "
                        f"{cols.weights.dtype} {cols.weights.shape}")
        if not bool(np.isfinite(cols.weights).all()):
            raise error("weights contain NaN/inf")
    if cols.dense.size and not bool(np.isfinite(cols.dense).all()):
        raise error("dense features contain NaN/inf")
    if b:
        if not bool(((cols.labels >= 0) & (cols.labels <= 1)).all()):
            raise error("labels must lie in [0, 1] (found values outside, or NaN)")
        if int(cols.timestamps.min()) < 0:
            raise error("timestamps must be >= 0 (seconds since the epoch)")


def _segment_gather(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Indices of the concatenated ranges ``[starts[i], starts[i] + lens[i])`` (int64)."""
    lens = lens.astype(np.int64, copy=False)
    total = int(lens.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    ends = np.cumsum(lens)
    shift = np.repeat(starts.astype(np.int64, copy=False) - (ends - lens), lens)
    return np.arange(total, dtype=np.int64) + shift


def take_rows(cols: ExampleColumns, rows: np.ndarray) -> ExampleColumns:
    """The examples ``rows`` (int index array, any order, repeats allowed) of ``cols``.

    Vectorized jagged gather: one ``np.repeat`` over all (feature, row) segments.
    """
    rows = np.asarray(rows, dtype=np.int64)
    f = len(cols.names)
    flat = cols.lengths.reshape(-1).astype(np.int64)
    starts = np.zeros(flat.shape[0], dtype=np.int64)
    if flat.shape[0] > 1:
        np.cumsum(flat[:-1], out=starts[1:])
    b = len(cols)
    seg = (np.arange(f, dtype=np.int64)[:, None] * b + rows[None, :]).reshape(-1)
    idx = _segment_gather(starts[seg], flat[seg])
    return ExampleColumns(
        names=cols.names,
        lengths=cols.lengths[:, rows],
        values=cols.values[idx],
        weights=None if cols.weights is None else cols.weights[idx],
        dense=cols.dense[rows],
        labels=cols.labels[rows],
        timestamps=cols.timestamps[rows],
        example_ids=cols.example_ids[rows],
    )


def concat_columns(parts: Sequence[ExampleColumns]) -> ExampleColumns:
    """Concatenate along the example axis. Every part must share ``schema``."""
    if not parts:
        raise InvalidInputError("concat_columns needs at least one part")
    if len(parts) == 1:
        return parts[0]
    schema = parts[0].schema
    for p in parts[1:]:
        if p.schema != schema:
            raise InvalidInputError(
                f"cannot concatenate examples with different schemas: {schema} vs {p.schema}"
            )
    f = len(schema[0])
    # Per part, the start of each feature's ids; gather values feature by feature so the
    # result stays key-major. The loop runs over (feature, part), never over examples.
    per_key = [np.concatenate(([0], np.cumsum(p.lengths.sum(axis=1, dtype=np.int64))))
               for p in parts]
    values = np.concatenate(
        [p.values[s[k]:s[k + 1]] for k in range(f) for p, s in zip(parts, per_key)]
    ) if f else np.zeros(0, dtype=np.int64)
    weights = None
    if schema[2]:
        weights = np.concatenate(
            [p.weights[s[k]:s[k + 1]]  # type: ignore[index]
             for k in range(f) for p, s in zip(parts, per_key)]
        ) if f else np.zeros(0, dtype=np.float32)
    return ExampleColumns(
        names=schema[0],
        lengths=np.concatenate([p.lengths for p in parts], axis=1),
        values=values.astype(np.int64, copy=False),
        weights=weights,
        dense=np.concatenate([p.dense for p in parts], axis=0),
        labels=np.concatenate([p.labels for p in parts]),
        timestamps=np.concatenate([p.timestamps for p in parts]),
        example_ids=np.concatenate([p.example_ids for p in parts]),
    )


def empty_like(cols: ExampleColumns) -> ExampleColumns:
    """Zero examples with the schema of ``cols``."""
    return take_rows(cols, np.zeros(0, dtype=np.int64))


def from_batch(batch: Batch) -> ExampleColumns:
    """Convert a :class:`Batch` (CPU tensors) to columns; raises ``InvalidInputError``."""
    kjt = batch.sparse
    names = tuple(kjt.keys())
    b = len(batch)
    stride_per_key = kjt.stride_per_key() if names else []
    if any(s != b for s in stride_per_key):
        raise InvalidInputError(
            f"every sparse feature must have one length per example ({b}), got strides "
            f"{stride_per_key}; variable-stride KJTs cannot be encoded"
        )
    lengths64 = kjt.lengths().detach().cpu().numpy().reshape(len(names), b) if names \
        else np.zeros((0, b), dtype=np.int64)
    if lengths64.size and int(lengths64.max()) > np.iinfo(np.int32).max:
        raise InvalidInputError("a single (feature, example) has more than 2^31 ids")
    weights_t = kjt.weights_or_none()
    cols = ExampleColumns(
        names=names,
        lengths=lengths64.astype(np.int32),
        values=kjt.values().detach().cpu().numpy().astype(np.int64, copy=False),
        weights=None if weights_t is None
        else weights_t.detach().cpu().numpy().astype(np.float32, copy=False),
        dense=np.ascontiguousarray(batch.dense.detach().cpu().numpy(), dtype=np.float32),
        labels=batch.labels.detach().cpu().numpy().astype(np.float32, copy=False),
        timestamps=batch.timestamps.detach().cpu().numpy().astype(np.int64, copy=False),
        example_ids=batch.example_ids.detach().cpu().numpy().astype(np.int64, copy=False),
    )
    check_columns(cols)
    return cols


def to_batch(cols: ExampleColumns) -> Batch:
    """Wrap columns as a :class:`Batch` without copying ids, dense or labels.

    The KJT gets int64 lengths (one small copy) and ``length_per_key``, so the trainer
    never needs a sync to learn the per-key sizes. Arrays must be writable (the codec's
    are: they view a private copy of the message).
    """
    import torch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from monolith_py.batch import Batch

    b = len(cols)
    lengths = cols.lengths.astype(np.int64)
    per_key = lengths.sum(axis=1).tolist() if len(cols.names) else []
    kjt = KeyedJaggedTensor(
        keys=list(cols.names),
        values=torch.from_numpy(cols.values),
        weights=None if cols.weights is None else torch.from_numpy(cols.weights),
        lengths=torch.from_numpy(lengths.reshape(-1)),
        stride=b,
        length_per_key=per_key,
    )
    return Batch(
        sparse=kjt,
        dense=torch.from_numpy(cols.dense),
        labels=torch.from_numpy(cols.labels),
        timestamps=torch.from_numpy(cols.timestamps),
        example_ids=torch.from_numpy(cols.example_ids),
    )
