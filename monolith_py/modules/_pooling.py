"""Pooling of gathered unique rows straight from the KJT layout, with a backward that
yields per-unique-row gradients.

``pool_unique_rows(rows [U, d], inverse [N], bag_offsets [F * B + 1], members [F_g],
mean [F], weights [N] | None, base, batch)`` returns ``[B, F_g * d]``: example ``e``'s
slice ``j`` is the pooled bag of KJT key ``members[j]`` for example ``e``, i.e.
``sum_i w_i * rows[inverse[i] - base]`` over that bag's values (``w_i``: the KJT weight,
times ``1/len(bag)`` for mean-pooled keys). KJT values are feature-major; the output is
example-major, so no transpose is needed to build the ``KeyedTensor``.

On CPU both directions are compiled single-threaded loops (they do not stall the way
two-thread OpenMP regions do when another process holds a core); the backward
accumulates straight into ``[U, d]``, about 10x faster than ``embedding_bag``'s
dense-weight backward. On other devices the same result comes from ``embedding_bag`` and
``index_add_``. The weights are constants (no gradient flows to them).
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
import torch
import torch.nn.functional as F

from monolith_py.modules._dedup import example_major

__all__ = ["pool_unique_rows"]


@numba.njit(cache=True, nogil=True)
def _bag_scale(mean: np.ndarray, f: int, n: int) -> np.float32:
    if mean[f] and n > 0:
        return np.float32(1.0 / n)
    return np.float32(1.0)


@numba.njit(cache=True, nogil=True)
def _pool_forward(
    rows: np.ndarray, inverse: np.ndarray, bag_offsets: np.ndarray, members: np.ndarray,
    mean: np.ndarray, weights: np.ndarray, base: int, batch: int,
) -> np.ndarray:
    d = rows.shape[1]
    m = members.shape[0]
    out = np.empty((batch, m * d), np.float32)
    has_w = weights.shape[0] > 0
    for e in range(batch):
        for j in range(m):
            f = members[j]
            lo = bag_offsets[f * batch + e]
            hi = bag_offsets[f * batch + e + 1]
            scale = _bag_scale(mean, f, hi - lo)
            c0 = j * d
            for c in range(d):
                out[e, c0 + c] = 0.0
            for i in range(lo, hi):
                r = inverse[i] - base
                w = weights[i] * scale if has_w else scale
                for c in range(d):
                    out[e, c0 + c] += w * rows[r, c]
    return out


@numba.njit(cache=True, nogil=True)
def _pool_backward(
    grad_out: np.ndarray, inverse: np.ndarray, bag_offsets: np.ndarray, members: np.ndarray,
    mean: np.ndarray, weights: np.ndarray, base: int, batch: int, u: int,
) -> np.ndarray:
    m = members.shape[0]
    d = grad_out.shape[1] // m if m else 0
    grad = np.zeros((u, d), np.float32)
    has_w = weights.shape[0] > 0
    for e in range(batch):
        for j in range(m):
            f = members[j]
            lo = bag_offsets[f * batch + e]
            hi = bag_offsets[f * batch + e + 1]
            scale = _bag_scale(mean, f, hi - lo)
            c0 = j * d
            for i in range(lo, hi):
                r = inverse[i] - base
                w = weights[i] * scale if has_w else scale
                for c in range(d):
                    grad[r, c] += w * grad_out[e, c0 + c]
    return grad


class _PoolUnique(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        rows: torch.Tensor,
        inverse: np.ndarray,
        bag_offsets: np.ndarray,
        members: np.ndarray,
        mean: np.ndarray,
        weights: np.ndarray,
        base: int,
        batch: int,
    ) -> torch.Tensor:
        ctx.args = (inverse, bag_offsets, members, mean, weights, base, batch)
        ctx.num_rows = rows.shape[0]
        return torch.from_numpy(_pool_forward(
            rows.detach().contiguous().numpy(), inverse, bag_offsets, members, mean, weights,
            base, batch,
        ))

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        inverse, bag_offsets, members, mean, weights, base, batch = ctx.args
        g = grad_out.detach().to(torch.float32).contiguous().numpy()
        grad = _pool_backward(g, inverse, bag_offsets, members, mean, weights, base, batch,
                              ctx.num_rows)
        return torch.from_numpy(grad), None, None, None, None, None, None, None


def pool_unique_rows(
    rows: torch.Tensor,
    inverse: np.ndarray,
    lengths: np.ndarray,
    members: np.ndarray,
    mean: np.ndarray,
    weights: np.ndarray | None = None,
    base: int = 0,
) -> torch.Tensor:
    """Pool ``rows`` ``[U, d]`` over the bags of the KJT keys ``members``; see the module
    docstring.

    Args:
        rows: float32 ``[U, d]`` (an autograd leaf in training).
        inverse: int64 ``[N]``: row (plus ``base``) of each KJT value.
        lengths: int64 ``[F, B]`` KJT lengths (feature-major).
        members: int64 ``[F_g]`` KJT key positions, in output order.
        mean: bool ``[F]``: keys pooled by mean.
        weights: float32 ``[N]`` KJT weights, or ``None``.
        base: subtracted from ``inverse``.

    Returns:
        ``[B, F_g * d]``.

    Example::

        >>> import numpy as np, torch
        >>> rows = torch.tensor([[1.0, 0.0], [0.0, 2.0]], requires_grad=True)
        >>> out = pool_unique_rows(rows, np.array([0, 1, 1]), np.array([[2, 1]]),
        ...                        np.array([0]), np.array([False]))
        >>> out.tolist()
        [[1.0, 2.0], [0.0, 2.0]]
        >>> out.sum().backward(); rows.grad.tolist()
        [[1.0, 1.0], [2.0, 2.0]]
    """
    n_feat, batch = lengths.shape
    inv = np.ascontiguousarray(inverse, dtype=np.int64)
    mem = np.ascontiguousarray(members, dtype=np.int64)
    mn = np.ascontiguousarray(mean, dtype=np.bool_)
    w = np.zeros(0, np.float32) if weights is None else np.ascontiguousarray(weights, np.float32)
    if rows.device.type != "cpu":
        idx, offsets, psw = example_major(inv, lengths, mem, mn, weights, base)
        dev = rows.device
        return F.embedding_bag(
            idx.to(dev), rows, offsets.to(dev), mode="sum",
            per_sample_weights=None if psw is None else psw.to(dev), include_last_offset=True,
        ).view(batch, -1)
    bag_offsets = np.zeros(n_feat * batch + 1, dtype=np.int64)
    np.cumsum(lengths.reshape(-1), out=bag_offsets[1:])
    out: torch.Tensor = _PoolUnique.apply(rows, inv, bag_offsets, mem, mn, w, int(base), batch)
    return out
