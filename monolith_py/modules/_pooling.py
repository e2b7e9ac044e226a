"""Pooling of gathered unique rows, with a backward that yields per-unique-row gradients.

``pool_unique_rows(rows [U, d], inverse [N], offsets [n_bags + 1], weights [N] | None)``
returns ``[n_bags, d]``: bag ``b`` is ``sum_i weights[i] * rows[inverse[i]]`` over
``i in [offsets[b], offsets[b+1])``. On CPU both directions are compiled single-threaded
loops; the backward accumulates straight into ``[U, d]``, about 10x faster than
``embedding_bag``'s dense-weight backward. Elsewhere: ``embedding_bag`` / ``index_add_``.
The weights are treated as constants (no gradient flows to them).
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["pool_unique_rows"]


@numba.njit(cache=True, nogil=True)
def _pool_backward(
    grad_out: np.ndarray, offsets: np.ndarray, inverse: np.ndarray, weights: np.ndarray, u: int
) -> np.ndarray:
    d = grad_out.shape[1]
    out = np.zeros((u, d), np.float32)
    has_w = weights.shape[0] > 0
    for b in range(offsets.shape[0] - 1):
        for i in range(offsets[b], offsets[b + 1]):
            r = inverse[i]
            w = weights[i] if has_w else np.float32(1.0)
            for j in range(d):
                out[r, j] += w * grad_out[b, j]
    return out


@numba.njit(cache=True, nogil=True)
def _pool_forward(
    rows: np.ndarray, offsets: np.ndarray, inverse: np.ndarray, weights: np.ndarray
) -> np.ndarray:
    d = rows.shape[1]
    n_bags = offsets.shape[0] - 1
    out = np.zeros((n_bags, d), np.float32)
    has_w = weights.shape[0] > 0
    for b in range(n_bags):
        for i in range(offsets[b], offsets[b + 1]):
            r = inverse[i]
            w = weights[i] if has_w else np.float32(1.0)
            for j in range(d):
                out[b, j] += w * rows[r, j]
    return out


def _np_weights(weights: torch.Tensor | None) -> np.ndarray:
    if weights is None:
        return np.zeros(0, np.float32)
    return weights.detach().to(torch.float32).contiguous().numpy()


class _PoolUnique(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        rows: torch.Tensor,
        inverse: torch.Tensor,
        offsets: torch.Tensor,
        weights: torch.Tensor | None,
    ) -> torch.Tensor:
        ctx.save_for_backward(inverse, offsets, weights)
        ctx.num_rows = rows.shape[0]
        if rows.device.type == "cpu" and rows.dtype == torch.float32:
            # single-threaded compiled loop: as fast as embedding_bag here, and it does not
            # stall when another process holds the second core (OpenMP regions do)
            return torch.from_numpy(_pool_forward(
                rows.detach().contiguous().numpy(), offsets.numpy(), inverse.numpy(),
                _np_weights(weights),
            ))
        return F.embedding_bag(
            inverse, rows, offsets, mode="sum", per_sample_weights=weights,
            include_last_offset=True,
        )

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        inverse, offsets, weights = ctx.saved_tensors
        u = ctx.num_rows
        g = grad_out.detach().to(torch.float32).contiguous()
        if g.device.type == "cpu":
            grad = torch.from_numpy(_pool_backward(
                g.numpy(), offsets.numpy(), inverse.numpy(), _np_weights(weights), u
            ))
        else:
            lengths = offsets[1:] - offsets[:-1]
            per_value = g.repeat_interleave(lengths, dim=0)
            if weights is not None:
                per_value = per_value * weights.unsqueeze(1)
            grad = torch.zeros(u, g.shape[1], device=g.device).index_add_(0, inverse, per_value)
        return grad.to(grad_out.dtype), None, None, None


def pool_unique_rows(
    rows: torch.Tensor,
    inverse: torch.Tensor,
    offsets: torch.Tensor,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weighted sum pooling of ``rows`` ``[U, d]`` over bags; see the module docstring.

    Example::

        >>> rows = torch.tensor([[1.0, 0.0], [0.0, 2.0]], requires_grad=True)
        >>> out = pool_unique_rows(rows, torch.tensor([0, 1, 1]), torch.tensor([0, 2, 3]))
        >>> out.tolist()
        [[1.0, 2.0], [0.0, 2.0]]
        >>> out.sum().backward(); rows.grad.tolist()
        [[1.0, 1.0], [2.0, 2.0]]
    """
    out: torch.Tensor = _PoolUnique.apply(rows, inverse, offsets, weights)
    return out
