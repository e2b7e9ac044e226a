"""Progressive-validation metrics: AUC, log loss and calibration, windowed and cumulative.

Online systems are judged on each example *before* training on it. The trainer feeds
every batch's predictions (probabilities) and labels here, then trains.

* **Windowed** metrics cover the last ``window`` examples and are exact: predictions and
  labels are kept in a ring buffer and the AUC is computed by sorting (ties count 1/2).
* **Cumulative** metrics cover everything seen. Log loss and calibration are exact
  running sums. The cumulative AUC is a histogram AUC over ``bins`` equal-width
  probability bins (default 2**16): two predictions in one bin count as a tie, so the
  error is at most half the fraction of positive/negative pairs that share a bin;
  :meth:`ProgressiveMetrics.compute` reports that bound as ``auc_error_bound`` (typically
  below 1e-4).

Calibration is ``mean prediction / mean label`` (1.0 is perfectly calibrated).

All state is tensors and ints (:meth:`state_dict`), so trainer snapshots can hold it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from monolith_py.errors import ConfigError, InvalidInputError

__all__ = ["ProgressiveMetrics", "binary_auc", "histogram_auc"]

_EPS = 1e-7


def binary_auc(preds: torch.Tensor, labels: torch.Tensor) -> float:
    """Exact ROC AUC of ``preds`` [n] against 0/1 ``labels`` [n] (ties count 1/2);
    NaN when only one class is present. O(n log n).

    Example::

        >>> binary_auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0., 0., 1., 1.]))
        0.75
    """
    p = preds.detach().reshape(-1).cpu().numpy().astype(np.float64)
    y = labels.detach().reshape(-1).cpu().numpy() >= 0.5
    n_pos = int(y.sum())
    n_neg = int(y.size) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    # Mid-ranks handle ties: a tie group's rank is the mean of its 1-based positions.
    order = np.argsort(p, kind="stable")
    sp = p[order]
    starts = np.ones(sp.size, dtype=bool)
    starts[1:] = sp[1:] != sp[:-1]
    group = np.cumsum(starts) - 1
    first = np.flatnonzero(starts)
    last = np.append(first[1:], sp.size) - 1
    mid = (first + last) / 2.0 + 1.0
    pos_rank_sum = float(mid[group][y[order]].sum())
    return (pos_rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def histogram_auc(pos_hist: torch.Tensor, neg_hist: torch.Tensor) -> tuple[float, float]:
    """AUC from per-bin positive/negative counts (bins in increasing score order), with
    same-bin pairs counted 1/2. Returns ``(auc, error_bound)``; NaN when a class is absent."""
    # numpy: single-threaded, so it does not stall on a busy machine the way a 2-thread
    # OpenMP region does.
    pos = pos_hist.numpy().astype(np.float64)
    neg = neg_hist.numpy().astype(np.float64)
    n_pos = float(pos.sum())
    n_neg = float(neg.sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan, math.nan
    neg_below = np.cumsum(neg) - neg
    pairs = n_pos * n_neg
    auc = float((pos * (neg_below + 0.5 * neg)).sum()) / pairs
    bound = float((pos * neg).sum()) / (2 * pairs)
    return auc, bound


class ProgressiveMetrics:
    """Accumulates predictions and labels; computes windowed and cumulative metrics.

    Args:
        window: examples in the windowed metrics.
        bins: histogram bins of the cumulative AUC.

    Example::

        >>> m = ProgressiveMetrics(window=4)
        >>> m.update(torch.tensor([0.2, 0.7, 0.6, 0.1]), torch.tensor([0., 1., 1., 0.]))
        >>> r = m.compute()
        >>> r["auc"], r["window_auc"], r["examples"]
        (1.0, 1.0, 4)
    """

    def __init__(self, window: int = 10_000, bins: int = 1 << 16) -> None:
        if window <= 0:
            raise ConfigError(f"metrics window must be positive, got {window}")
        if bins < 2:
            raise ConfigError(f"AUC histogram needs at least 2 bins, got {bins}")
        self.window = int(window)
        self.bins = int(bins)
        self.reset()

    def reset(self) -> None:
        """Forget everything."""
        self._pos_hist = torch.zeros(self.bins, dtype=torch.int64)
        self._neg_hist = torch.zeros(self.bins, dtype=torch.int64)
        self._count = 0
        self._sum_pred = 0.0
        self._sum_label = 0.0
        self._sum_logloss = 0.0
        self._ring_pred = torch.zeros(self.window, dtype=torch.float32)
        self._ring_label = torch.zeros(self.window, dtype=torch.float32)
        self._ring_pos = 0  # next slot to write
        self._ring_fill = 0

    def update(self, preds: torch.Tensor, labels: torch.Tensor) -> None:
        """Add probabilities ``preds`` [n] in [0, 1] and labels ``labels`` [n] in [0, 1]
        (soft labels allowed for log loss/calibration; AUC thresholds them at 0.5)."""
        p = preds.detach().reshape(-1).to(torch.float32).cpu()
        y = labels.detach().reshape(-1).to(torch.float32).cpu()
        if p.shape != y.shape:
            raise InvalidInputError(
                f"preds and labels differ in size: {p.numel()} vs {y.numel()}"
            )
        n = int(p.numel())
        if n == 0:
            return
        if not bool(torch.isfinite(p).all()) or bool(((p < 0) | (p > 1)).any()):
            raise InvalidInputError("predictions must be finite probabilities in [0, 1]")
        pc = p.clamp(_EPS, 1 - _EPS).to(torch.float64)
        y64 = y.to(torch.float64)
        self._sum_logloss += float(-(y64 * pc.log() + (1 - y64) * (1 - pc).log()).sum())
        self._sum_pred += float(p.sum(dtype=torch.float64))
        self._sum_label += float(y.sum(dtype=torch.float64))
        self._count += n
        idx = (p.to(torch.float64) * self.bins).to(torch.int64).clamp_(0, self.bins - 1)
        is_pos = y >= 0.5
        ones = torch.ones(n, dtype=torch.int64)
        self._pos_hist.index_add_(0, idx[is_pos], ones[: int(is_pos.sum())])
        self._neg_hist.index_add_(0, idx[~is_pos], ones[: n - int(is_pos.sum())])
        # ring buffer: keep the newest `window` examples
        if n >= self.window:
            self._ring_pred.copy_(p[-self.window:])
            self._ring_label.copy_(y[-self.window:])
            self._ring_pos = 0
            self._ring_fill = self.window
            return
        end = self._ring_pos + n
        if end <= self.window:
            self._ring_pred[self._ring_pos:end] = p
            self._ring_label[self._ring_pos:end] = y
        else:
            first = self.window - self._ring_pos
            self._ring_pred[self._ring_pos:] = p[:first]
            self._ring_label[self._ring_pos:] = y[:first]
            self._ring_pred[: n - first] = p[first:]
            self._ring_label[: n - first] = y[first:]
        self._ring_pos = end % self.window
        self._ring_fill = min(self.window, self._ring_fill + n)

    @property
    def count(self) -> int:
        return self._count

    def compute(self) -> dict[str, float | int]:
        """``auc``, ``auc_error_bound``, ``log_loss``, ``calibration``, ``mean_pred``,
        ``mean_label``, ``examples`` (cumulative) and ``window_auc``, ``window_log_loss``,
        ``window_calibration``, ``window_examples``. NaN where undefined (no examples, one
        class only, no positive labels)."""
        auc, bound = histogram_auc(self._pos_hist, self._neg_hist)
        n = self._count
        out: dict[str, float | int] = {
            "examples": n,
            "auc": auc,
            "auc_error_bound": bound,
            "log_loss": self._sum_logloss / n if n else math.nan,
            "mean_pred": self._sum_pred / n if n else math.nan,
            "mean_label": self._sum_label / n if n else math.nan,
            "calibration": self._sum_pred / self._sum_label if self._sum_label > 0 else math.nan,
        }
        k = self._ring_fill
        wp = self._ring_pred[:k] if k < self.window else self._ring_pred
        wy = self._ring_label[:k] if k < self.window else self._ring_label
        out["window_examples"] = k
        out["window_auc"] = binary_auc(wp, wy) if k else math.nan
        if k:
            wp64 = wp.numpy().astype(np.float64)
            y64 = wy.numpy().astype(np.float64)
            pc = np.clip(wp64, _EPS, 1 - _EPS)
            out["window_log_loss"] = float(-(y64 * np.log(pc) + (1 - y64) * np.log1p(-pc)).mean())
            s_label = float(y64.sum())
            out["window_calibration"] = float(wp64.sum()) / s_label if s_label > 0 else math.nan
        else:
            out["window_log_loss"] = math.nan
            out["window_calibration"] = math.nan
        return out

    # -- state ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Tensors and numbers only."""
        return {
            "window": self.window,
            "bins": self.bins,
            "pos_hist": self._pos_hist.clone(),
            "neg_hist": self._neg_hist.clone(),
            "count": self._count,
            "sums": torch.tensor(
                [self._sum_pred, self._sum_label, self._sum_logloss], dtype=torch.float64
            ),
            "ring_pred": self._ring_pred.clone(),
            "ring_label": self._ring_label.clone(),
            "ring_pos": self._ring_pos,
            "ring_fill": self._ring_fill,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict` output (window and bins must match)."""
        if int(state["window"]) != self.window or int(state["bins"]) != self.bins:
            raise InvalidInputError(
                f"metrics state is for window={state['window']}, bins={state['bins']}; this "
                f"instance has window={self.window}, bins={self.bins}"
            )
        for name, size in (("pos_hist", self.bins), ("neg_hist", self.bins),
                           ("ring_pred", self.window), ("ring_label", self.window)):
            if tuple(state[name].shape) != (size,):
                raise InvalidInputError(f"metrics state {name!r} must have shape [{size}]")
        sums = state["sums"]
        self._pos_hist = state["pos_hist"].to(torch.int64).clone()
        self._neg_hist = state["neg_hist"].to(torch.int64).clone()
        self._count = int(state["count"])
        self._sum_pred, self._sum_label, self._sum_logloss = (float(v) for v in sums.tolist())
        self._ring_pred = state["ring_pred"].to(torch.float32).clone()
        self._ring_label = state["ring_label"].to(torch.float32).clone()
        self._ring_pos = int(state["ring_pos"])
        self._ring_fill = int(state["ring_fill"])
