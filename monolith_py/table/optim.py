"""Sparse optimizers: SGD, Adagrad, row-wise Adagrad, Adam and FTRL on the rows of a batch.

Each kernel receives the *unique* rows of a batch and their summed gradients (the table
sums the gradients of repeated keys first) and updates the rows and their optimizer slots
in place. Rows absent from a batch are not touched ("lazy" updates): Adam's bias
correction uses each row's own update count, so a row updated at every step follows
``torch.optim.Adam`` exactly.

Slots (float32, parallel to the row arena):

=================  ==============================================
``sgd``            none
``adagrad``        ``sum`` ``[rows, dim]`` (torch.optim.Adagrad's state_sum)
``rowwise_adagrad`` ``sum`` ``[rows, 1]`` (mean of the squared gradient over dim)
``adam``           ``exp_avg``, ``exp_avg_sq`` ``[rows, dim]``
``ftrl``           ``z``, ``n`` ``[rows, dim]`` (FTRL-Proximal, McMahan et al. 2013)
=================  ==============================================
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from monolith_py.table.config import OptimizerConfig

__all__ = ["slot_specs", "apply_optimizer"]


def slot_specs(cfg: OptimizerConfig, dim: int) -> dict[str, tuple[int, float]]:
    """``{slot name: (width, initial value)}`` of ``cfg``'s optimizer for rows of ``dim``."""
    acc = cfg.resolved_accumulator()
    if cfg.kind == "sgd":
        return {}
    if cfg.kind == "adagrad":
        return {"sum": (dim, acc)}
    if cfg.kind == "rowwise_adagrad":
        return {"sum": (1, acc)}
    if cfg.kind == "adam":
        return {"exp_avg": (dim, 0.0), "exp_avg_sq": (dim, 0.0)}
    return {"z": (dim, 0.0), "n": (dim, acc)}


@njit(cache=True)
def _sgd(w, rows, g, lr):  # type: ignore[no-untyped-def]
    dim = w.shape[1]
    for i in range(rows.shape[0]):
        r = rows[i]
        for j in range(dim):
            w[r, j] = np.float32(w[r, j] - lr * g[i, j])


@njit(cache=True)
def _adagrad(w, s, rows, g, lr, eps):  # type: ignore[no-untyped-def]
    dim = w.shape[1]
    for i in range(rows.shape[0]):
        r = rows[i]
        for j in range(dim):
            gj = np.float64(g[i, j])
            acc = np.float32(s[r, j] + gj * gj)
            s[r, j] = acc
            w[r, j] = np.float32(w[r, j] - lr * gj / (math.sqrt(acc) + eps))


@njit(cache=True)
def _rowwise_adagrad(w, s, rows, g, lr, eps):  # type: ignore[no-untyped-def]
    dim = w.shape[1]
    for i in range(rows.shape[0]):
        r = rows[i]
        sq = 0.0
        for j in range(dim):
            gj = np.float64(g[i, j])
            sq += gj * gj
        acc = np.float32(s[r, 0] + sq / dim)
        s[r, 0] = acc
        step = lr / (math.sqrt(acc) + eps)
        for j in range(dim):
            w[r, j] = np.float32(w[r, j] - step * g[i, j])


@njit(cache=True)
def _adam(w, m, v, steps, rows, g, lr, beta1, beta2, eps):  # type: ignore[no-untyped-def]
    dim = w.shape[1]
    for i in range(rows.shape[0]):
        r = rows[i]
        t = steps[r]
        bc1 = 1.0 - beta1**t
        bc2_sqrt = math.sqrt(1.0 - beta2**t)
        step_size = lr / bc1
        for j in range(dim):
            gj = np.float64(g[i, j])
            mj = np.float32(m[r, j] + (1.0 - beta1) * (gj - m[r, j]))
            vj = np.float32(beta2 * v[r, j] + (1.0 - beta2) * gj * gj)
            m[r, j] = mj
            v[r, j] = vj
            denom = math.sqrt(vj) / bc2_sqrt + eps
            w[r, j] = np.float32(w[r, j] - step_size * mj / denom)


@njit(cache=True)
def _ftrl(w, z, n, rows, g, lr, l1, l2, beta):  # type: ignore[no-untyped-def]
    dim = w.shape[1]
    for i in range(rows.shape[0]):
        r = rows[i]
        for j in range(dim):
            gj = np.float64(g[i, j])
            n_old = np.float64(n[r, j])
            n_new = n_old + gj * gj
            sigma = (math.sqrt(n_new) - math.sqrt(n_old)) / lr
            zj = z[r, j] + gj - sigma * w[r, j]
            z[r, j] = np.float32(zj)
            n[r, j] = np.float32(n_new)
            if abs(zj) <= l1:
                w[r, j] = 0.0
            else:
                sign = 1.0 if zj > 0 else -1.0
                w[r, j] = np.float32(-(zj - sign * l1) / ((beta + math.sqrt(n_new)) / lr + l2))


def apply_optimizer(
    cfg: OptimizerConfig,
    weights: np.ndarray,
    slots: dict[str, np.ndarray],
    update_count: np.ndarray,
    rows: np.ndarray,
    grads: np.ndarray,
) -> None:
    """Update ``weights[rows]`` (and slots) with the summed gradients ``grads`` ``[u, dim]``.

    ``rows`` must be unique; ``update_count[rows]`` must already include this update (it
    is Adam's step ``t``).
    """
    lr = float(cfg.lr)
    kind = cfg.kind
    if kind == "sgd":
        _sgd(weights, rows, grads, lr)
    elif kind == "adagrad":
        _adagrad(weights, slots["sum"], rows, grads, lr, cfg.resolved_eps())
    elif kind == "rowwise_adagrad":
        _rowwise_adagrad(weights, slots["sum"], rows, grads, lr, cfg.resolved_eps())
    elif kind == "adam":
        _adam(weights, slots["exp_avg"], slots["exp_avg_sq"], update_count, rows, grads, lr,
              float(cfg.beta1), float(cfg.beta2), cfg.resolved_eps())
    else:
        _ftrl(weights, slots["z"], slots["n"], rows, grads, lr, float(cfg.l1), float(cfg.l2),
              float(cfg.beta))
