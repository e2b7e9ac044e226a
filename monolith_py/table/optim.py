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

from monolith_py.table._kernels import prefetch_row
from monolith_py.table.config import OptimizerConfig

__all__ = ["slot_specs", "apply_optimizer", "new_scratch"]


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


_PF = 6  # rows prefetched ahead


@njit(inline="always")
def _touch(meta, r, now, version):  # type: ignore[no-untyped-def]
    """Per-row metadata of an update: count, last update (event time), version."""
    meta[r, 2] += 1
    if meta[r, 1] < now:
        meta[r, 1] = now
    meta[r, 3] = version


@njit(inline="always")
def _ahead(rows, i, w, meta):  # type: ignore[no-untyped-def]
    if i + _PF < rows.shape[0]:
        r = rows[i + _PF]
        prefetch_row(w, r)
        prefetch_row(meta, r)
        return r
    return -1


@njit(cache=True, error_model="numpy")
def _sgd(w, meta, rows, g, lr, now, version):  # type: ignore[no-untyped-def]
    dim = w.shape[1]
    lr32 = np.float32(lr)
    for i in range(rows.shape[0]):
        _ahead(rows, i, w, meta)
        r = rows[i]
        _touch(meta, r, now, version)
        for j in range(dim):
            w[r, j] = w[r, j] - lr32 * g[i, j]


@njit(cache=True, error_model="numpy")
def _adagrad(w, s, meta, rows, g, lr, eps, now, version):  # type: ignore[no-untyped-def]
    dim = w.shape[1]
    lr32 = np.float32(lr)
    eps32 = np.float32(eps)
    for i in range(rows.shape[0]):
        ra = _ahead(rows, i, w, meta)
        if ra >= 0:
            prefetch_row(s, ra)
        r = rows[i]
        _touch(meta, r, now, version)
        for j in range(dim):
            gj = g[i, j]
            acc = s[r, j] + gj * gj
            s[r, j] = acc
            w[r, j] = w[r, j] - lr32 * (gj / (np.sqrt(acc) + eps32))


@njit(cache=True, error_model="numpy")
def _rowwise_adagrad(w, s, meta, rows, g, lr, eps, now, version):  # type: ignore[no-untyped-def]
    dim = w.shape[1]
    inv_dim = np.float32(1.0 / dim)
    lr32 = np.float32(lr)
    eps32 = np.float32(eps)
    for i in range(rows.shape[0]):
        ra = _ahead(rows, i, w, meta)
        if ra >= 0:
            prefetch_row(s, ra)
        r = rows[i]
        _touch(meta, r, now, version)
        sq = np.float32(0.0)
        for j in range(dim):
            sq += g[i, j] * g[i, j]
        acc = s[r, 0] + sq * inv_dim
        s[r, 0] = acc
        step = lr32 / (np.sqrt(acc) + eps32)
        for j in range(dim):
            w[r, j] = w[r, j] - step * g[i, j]


@njit(cache=True, error_model="numpy")
def _adam(w, m, v, meta, rows, g, lr, beta1, beta2, eps, now, version, bc_t, bc):  # type: ignore[no-untyped-def]
    dim = w.shape[1]
    log_b1 = math.log(beta1)
    log_b2 = math.log(beta2)
    w1 = np.float32(1.0 - beta1)
    b2 = np.float32(beta2)
    w2 = np.float32(1.0 - beta2)
    eps32 = np.float32(eps)
    mask = bc_t.shape[0] - 1
    for i in range(rows.shape[0]):
        ra = _ahead(rows, i, w, meta)
        if ra >= 0:
            prefetch_row(m, ra)
            prefetch_row(v, ra)
        r = rows[i]
        _touch(meta, r, now, version)
        t = meta[r, 2]
        # bias corrections depend on the row's step only: a small direct-mapped cache
        # avoids two exp() per row (few distinct steps per batch)
        c = t & mask
        if bc_t[c] != t:
            bc_t[c] = t
            bc[c, 0] = lr / (1.0 - math.exp(np.float64(t) * log_b1))
            bc[c, 1] = math.sqrt(1.0 - math.exp(np.float64(t) * log_b2))
        step_size = np.float32(bc[c, 0])
        bc2_sqrt = np.float32(bc[c, 1])
        for j in range(dim):
            gj = g[i, j]
            mj = m[r, j] + w1 * (gj - m[r, j])
            vj = v[r, j] * b2 + w2 * (gj * gj)
            m[r, j] = mj
            v[r, j] = vj
            w[r, j] = w[r, j] - step_size * (mj / (np.sqrt(vj) / bc2_sqrt + eps32))


@njit(cache=True, error_model="numpy")
def _ftrl(w, z, n, meta, rows, g, lr, l1, l2, beta, now, version):  # type: ignore[no-untyped-def]
    dim = w.shape[1]
    for i in range(rows.shape[0]):
        ra = _ahead(rows, i, w, meta)
        if ra >= 0:
            prefetch_row(z, ra)
            prefetch_row(n, ra)
        r = rows[i]
        _touch(meta, r, now, version)
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


def new_scratch(cfg: OptimizerConfig) -> dict[str, np.ndarray]:
    """Per-table scratch of the optimizer kernels (not state: rebuilt on load)."""
    if cfg.kind != "adam":
        return {}
    return {"bc_t": np.full(4096, -1, dtype=np.int64), "bc": np.zeros((4096, 2), np.float64)}


def apply_optimizer(
    cfg: OptimizerConfig,
    weights: np.ndarray,
    slots: dict[str, np.ndarray],
    meta: np.ndarray,
    rows: np.ndarray,
    grads: np.ndarray,
    now: int,
    version: int,
    scratch: dict[str, np.ndarray] | None = None,
) -> None:
    """Update ``weights[rows]`` and their slots with the summed gradients ``grads``
    ``[u, dim]``, and their metadata ``meta[rows]`` (update count + 1, last update
    ``max(last, now)``, version). ``rows`` must be unique. ``scratch`` (from
    :func:`new_scratch`) caches per-step constants across calls."""
    lr = float(cfg.lr)
    kind = cfg.kind
    t = np.int64(now)
    v = np.int64(version)
    if kind == "sgd":
        _sgd(weights, meta, rows, grads, lr, t, v)
    elif kind == "adagrad":
        _adagrad(weights, slots["sum"], meta, rows, grads, lr, cfg.resolved_eps(), t, v)
    elif kind == "rowwise_adagrad":
        _rowwise_adagrad(weights, slots["sum"], meta, rows, grads, lr, cfg.resolved_eps(), t, v)
    elif kind == "adam":
        sc = scratch if scratch is not None else new_scratch(cfg)
        _adam(weights, slots["exp_avg"], slots["exp_avg_sq"], meta, rows, grads, lr,
              float(cfg.beta1), float(cfg.beta2), cfg.resolved_eps(), t, v, sc["bc_t"], sc["bc"])
    else:
        _ftrl(weights, slots["z"], slots["n"], meta, rows, grads, lr, float(cfg.l1),
              float(cfg.l2), float(cfg.beta), t, v)
