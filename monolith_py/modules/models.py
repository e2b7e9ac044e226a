"""Ranking models over (dense features, sparse KJT): DLRM-style and DeepFM-style.

Both take any embedding module that maps a ``KeyedJaggedTensor`` to a ``KeyedTensor``
(:class:`~monolith_py.modules.DynamicEmbeddingBagCollection`, or TorchRec's
``EmbeddingBagCollection`` for a like-for-like comparison) and return one logit per
example: ``model(dense [B, num_dense], kjt) -> logits [B]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from monolith_py.errors import ConfigError, InvalidInputError

__all__ = ["MLP", "DLRM", "DeepFM", "embedding_dims"]


def embedding_dims(embedding: nn.Module) -> list[int]:
    """Per-feature output widths of an embedding module, in output order.

    Works for :class:`~monolith_py.modules.DynamicEmbeddingBagCollection` and TorchRec's
    ``EmbeddingBagCollection``/``FusedEmbeddingBagCollection``."""
    fn = getattr(embedding, "embedding_dims", None)
    if callable(fn):
        return [int(d) for d in fn()]
    configs = getattr(embedding, "embedding_bag_configs", None)
    if callable(configs):
        return [int(c.embedding_dim) for c in configs() for _ in (c.feature_names or [c.name])]
    raise ConfigError(
        f"cannot tell the output widths of {type(embedding).__name__}; pass embedding_dims="
    )


# The models' constructors take an ``embedding_dims`` argument that shadows the function.
_dims: Callable[[nn.Module], list[int]] = embedding_dims


class MLP(nn.Sequential):
    """``Linear -> ReLU`` per entry of ``sizes``; ``[B, in_features] -> [B, sizes[-1]]``.

    ``final_activation=False`` leaves the last layer linear."""

    def __init__(self, in_features: int, sizes: Sequence[int], final_activation: bool = True):
        layers: list[nn.Module] = []
        prev = int(in_features)
        for i, s in enumerate(sizes):
            if int(s) <= 0:
                raise ConfigError(f"MLP layer sizes must be positive, got {list(sizes)}")
            layers.append(nn.Linear(prev, int(s)))
            if final_activation or i < len(sizes) - 1:
                layers.append(nn.ReLU())
            prev = int(s)
        super().__init__(*layers)
        self.out_features = prev


def _check_dense(dense: torch.Tensor, num_dense: int) -> None:
    if dense.dim() != 2 or dense.shape[1] != num_dense:
        raise InvalidInputError(
            f"dense features must have shape [B, {num_dense}], got {tuple(dense.shape)}"
        )


def _pooled(embedding: nn.Module, kjt: KeyedJaggedTensor) -> torch.Tensor:
    out = embedding(kjt)
    if isinstance(out, tuple):  # TorchRec managed-collision EBC returns (kt, remapped)
        out = out[0]
    if not isinstance(out, KeyedTensor):
        raise InvalidInputError(
            f"embedding module returned {type(out).__name__}, expected a KeyedTensor"
        )
    return out.values()


class DLRM(nn.Module):
    """DLRM-style ranking model.

    ``dense [B, num_dense] -> bottom MLP -> [B, d]``; every sparse feature pools to
    ``[B, d_f]``; the interaction either concatenates them (``"cat"``: ``[B, d + sum d_f]``)
    or takes the pairwise dot products of the ``F + 1`` vectors (``"dot"``, all widths equal:
    ``[B, d + (F + 1) F / 2]``); the top MLP maps that to one logit.

    Args:
        embedding: KJT -> KeyedTensor module.
        num_dense: number of dense features (0: no bottom MLP).
        bottom_mlp: hidden sizes of the bottom MLP; the last is ``d``.
        top_mlp: hidden sizes of the top MLP (a final ``Linear(., 1)`` is added).
        interaction: ``"cat"`` or ``"dot"``.

    Example::

        >>> import torch
        >>> from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
        >>> from monolith_py.modules import DynamicEmbeddingBagCollection
        >>> from monolith_py.table import TableConfig
        >>> ebc = DynamicEmbeddingBagCollection([TableConfig("item", dim=8)])
        >>> model = DLRM(ebc, num_dense=3, bottom_mlp=(16, 8), top_mlp=(16,))
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(
        ...     keys=["item"], values=torch.tensor([4, 5, 6]), lengths=torch.tensor([2, 1]))
        >>> model(torch.randn(2, 3), kjt).shape
        torch.Size([2])
    """

    def __init__(
        self,
        embedding: nn.Module,
        num_dense: int,
        bottom_mlp: Sequence[int],
        top_mlp: Sequence[int],
        interaction: str = "dot",
        embedding_dims: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if interaction not in ("cat", "dot"):
            raise ConfigError(f"interaction must be 'cat' or 'dot', got {interaction!r}")
        if num_dense < 0:
            raise ConfigError(f"num_dense must be >= 0, got {num_dense}")
        self.embedding = embedding
        self.num_dense = int(num_dense)
        self.interaction = interaction
        dims = list(embedding_dims) if embedding_dims is not None else _dims(embedding)
        self.bottom: nn.Module | None = None
        d_bottom = 0
        if num_dense:
            if not bottom_mlp:
                raise ConfigError("bottom_mlp needs at least one layer when num_dense > 0")
            mlp = MLP(num_dense, bottom_mlp)
            self.bottom = mlp
            d_bottom = mlp.out_features
        if interaction == "dot":
            widths = set(dims) | ({d_bottom} if d_bottom else set())
            if len(widths) != 1:
                raise ConfigError(
                    f"dot interaction needs one width for every feature and the bottom MLP "
                    f"output, got {sorted(widths)}; use interaction='cat' or equal dims"
                )
            n = len(dims) + (1 if d_bottom else 0)
            iu = torch.triu_indices(n, n, offset=1)
            self.register_buffer("_iu", iu, persistent=False)
            top_in = d_bottom + n * (n - 1) // 2
        else:
            top_in = d_bottom + sum(dims)
        self._dims = dims
        self.top = MLP(top_in, [*top_mlp, 1], final_activation=False)

    def forward(self, dense: torch.Tensor, kjt: KeyedJaggedTensor) -> torch.Tensor:
        """``dense [B, num_dense]``, KJT of stride ``B`` -> logits ``[B]``."""
        _check_dense(dense, self.num_dense)
        emb = _pooled(self.embedding, kjt)
        parts = [self.bottom(dense)] if self.bottom is not None else []
        if self.interaction == "cat":
            x = torch.cat([*parts, emb], dim=1)
        else:
            b = emb.shape[0]
            stacked = torch.cat([*(p.unsqueeze(1) for p in parts),
                                 emb.view(b, len(self._dims), -1)], dim=1)
            dots = torch.bmm(stacked, stacked.transpose(1, 2))
            iu: torch.Tensor = self._iu  # type: ignore[assignment]
            x = torch.cat([*parts, dots[:, iu[0], iu[1]]], dim=1)
        return self.top(x).squeeze(1)


class DeepFM(nn.Module):
    """DeepFM-style ranking model.

    The dense features are projected to one more field ``[B, d]``; with the ``F`` pooled
    sparse fields ``v_f`` (all width ``d``) the logit is

    ``linear(dense) + linear(concat v_f)`` (first order)
    ``+ 1/2 * sum_d((sum_f v_f)^2 - sum_f v_f^2)`` (factorization machine, second order)
    ``+ MLP(concat(dense field, v_f))`` (deep part).

    Example::

        >>> import torch
        >>> from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
        >>> from monolith_py.modules import DynamicEmbeddingBagCollection
        >>> from monolith_py.table import TableConfig
        >>> ebc = DynamicEmbeddingBagCollection([TableConfig("item", dim=8)])
        >>> model = DeepFM(ebc, num_dense=3, deep_mlp=(16,))
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(
        ...     keys=["item"], values=torch.tensor([4, 5, 6]), lengths=torch.tensor([2, 1]))
        >>> model(torch.randn(2, 3), kjt).shape
        torch.Size([2])
    """

    def __init__(
        self,
        embedding: nn.Module,
        num_dense: int,
        deep_mlp: Sequence[int],
        embedding_dims: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        dims = list(embedding_dims) if embedding_dims is not None else _dims(embedding)
        if len(set(dims)) != 1:
            raise ConfigError(f"DeepFM needs one embedding width for every feature, got {dims}")
        if num_dense < 0:
            raise ConfigError(f"num_dense must be >= 0, got {num_dense}")
        d = dims[0]
        self.embedding = embedding
        self.num_dense = int(num_dense)
        self._num_fields = len(dims)
        self.dense_field: nn.Module | None = nn.Linear(num_dense, d) if num_dense else None
        self.linear = nn.Linear(num_dense + sum(dims), 1)
        n_fields = len(dims) + (1 if num_dense else 0)
        self.deep = MLP(n_fields * d, [*deep_mlp, 1], final_activation=False)

    def forward(self, dense: torch.Tensor, kjt: KeyedJaggedTensor) -> torch.Tensor:
        """``dense [B, num_dense]``, KJT of stride ``B`` -> logits ``[B]``."""
        _check_dense(dense, self.num_dense)
        emb = _pooled(self.embedding, kjt)
        b = emb.shape[0]
        fields = emb.view(b, self._num_fields, -1)
        first = self.linear(torch.cat([dense, emb], dim=1)).squeeze(1)
        if self.dense_field is not None:
            fields = torch.cat([self.dense_field(dense).unsqueeze(1), fields], dim=1)
        s = fields.sum(dim=1)
        fm = 0.5 * (s * s - (fields * fields).sum(dim=1)).sum(dim=1)
        deep = self.deep(fields.reshape(b, -1)).squeeze(1)
        return first + fm + deep

