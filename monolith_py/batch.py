"""The unit of training and scoring: a batch of examples.

Produced by every source (the Kafka codec in ``streaming/``, the MovieLens replay, the
synthetic generator, in-memory test data) and consumed by the trainer and the models.
It lives below ``training``/``modules`` because all of them share it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from monolith_py.errors import InvalidInputError

__all__ = ["Batch"]


@dataclass(frozen=True)
class Batch:
    """A batch of ``B`` examples.

    Attributes:
        sparse: ``KeyedJaggedTensor`` with one key per sparse feature; int64 ids, lengths
            of size ``B`` per key (optionally ``weights``).
        dense: float32 ``[B, num_dense]`` (``num_dense`` may be 0).
        labels: float32 ``[B]`` in ``[0, 1]``.
        timestamps: int64 ``[B]``, event time in seconds since the epoch (drives expiry).
        example_ids: int64 ``[B]``, unique per example (used for exactly-once accounting).

    Example::

        >>> import torch
        >>> from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(
        ...     keys=["user", "item"], values=torch.tensor([1, 2, 3]),
        ...     lengths=torch.tensor([1, 0, 1, 1]))
        >>> b = Batch(kjt, torch.zeros(2, 0), torch.tensor([1.0, 0.0]),
        ...           torch.tensor([10, 11]), torch.tensor([7, 8]))
        >>> len(b)
        2
    """

    sparse: KeyedJaggedTensor
    dense: torch.Tensor
    labels: torch.Tensor
    timestamps: torch.Tensor
    example_ids: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def validate(self) -> None:
        """Check shapes, dtypes and value ranges; raise :class:`InvalidInputError`
        naming the field (and feature) at fault. Cheap: vectorized checks only."""
        b = len(self)
        if self.labels.dim() != 1:
            raise InvalidInputError(f"labels must be 1-D [B], got shape {tuple(self.labels.shape)}")
        for name, t in (("timestamps", self.timestamps), ("example_ids", self.example_ids)):
            if t.shape != (b,):
                raise InvalidInputError(f"{name} must have shape [{b}], got {tuple(t.shape)}")
        if self.dense.dim() != 2 or self.dense.shape[0] != b:
            raise InvalidInputError(
                f"dense must have shape [{b}, num_dense], got {tuple(self.dense.shape)}"
            )
        if self.dense.numel() and not bool(torch.isfinite(self.dense).all()):
            bad = (~torch.isfinite(self.dense)).any(dim=0).nonzero().flatten().tolist()
            raise InvalidInputError(f"dense features contain NaN/inf (columns {bad[:8]})")
        if b and not bool(((self.labels >= 0) & (self.labels <= 1)).all()):
            raise InvalidInputError("labels must lie in [0, 1] (found values outside, or NaN)")
        kjt = self.sparse
        if kjt.values().dtype not in (torch.int64, torch.int32):
            raise InvalidInputError(f"sparse ids must be int64, got {kjt.values().dtype}")
        lengths = kjt.lengths()
        keys = kjt.keys()
        if lengths.numel() != len(keys) * b:
            raise InvalidInputError(
                f"KJT lengths has {lengths.numel()} entries, expected {len(keys)} keys x {b} "
                "examples"
            )
        if int(lengths.sum()) != kjt.values().numel():
            raise InvalidInputError(
                f"KJT lengths sum to {int(lengths.sum())} but there are "
                f"{kjt.values().numel()} values"
            )
