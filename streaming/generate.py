"""A synthetic CTR stream with a hidden ground-truth model (``monolith generate``).

Every example has ``F`` sparse features (one id each) and ``D`` dense features. Ids follow
a Zipf law over each feature's cardinality (a few ids are very popular, most are rare),
and are scrambled into the int64 range so they look like hashed production ids. The click
probability comes from a hidden logistic model::

    logit = bias + sum_f w_f(id_f, t) + v . dense

where each id's weight ``w_f(id, t) = s_f * (cos(phi(t)) * g1(id) + sin(phi(t)) * g2(id))``
is computed from a hash of ``(seed, feature, id)`` (no table is stored, so cardinalities
can be huge), ``g1, g2 ~ N(0, 1)`` and ``phi(t) = 2 pi t / drift_period_s`` rotates every
weight over time (concept drift; the variance stays constant). Labels are drawn from
that probability, so the **best achievable AUC** -- the AUC of the true probabilities --
is known and tracked (:class:`AUCTracker`).

Everything is a pure function of ``(config, batch index)``: generation is reproducible
and can resume at any batch.

Example::

    >>> gen = SyntheticCTR(SyntheticConfig(cardinalities=(1000, 50), num_dense=2))
    >>> cols, probs = gen.batch(0, 4)
    >>> cols.lengths.shape, cols.dense.shape, probs.shape
    ((2, 4), (4, 2), (4,))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from monolith_py.errors import ConfigError
from streaming.columns import ExampleColumns

__all__ = ["SyntheticConfig", "SyntheticCTR", "AUCTracker", "splitmix64"]

_MASK62 = np.uint64((1 << 62) - 1)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The SplitMix64 finalizer on uint64 (vectorized, wrapping): a good 64-bit mix."""
    z = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        z += np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _unit(h: np.ndarray) -> np.ndarray:
    """uint64 hash -> float64 uniform in (0, 1)."""
    return ((h >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)


@dataclass(frozen=True)
class SyntheticConfig:
    """The stream's shape and its hidden model.

    Attributes:
        cardinalities: distinct ids per sparse feature (one feature per entry).
        num_dense: dense features per example.
        zipf_a: Zipf exponent (> 0; 1.0-1.3 is typical of ids in recommendation).
        base_ctr: click rate when every weight is 0 (sets the bias).
        signal: standard deviation of the hidden logit around the bias (higher: easier).
        dense_share: fraction of the logit variance carried by the dense features.
        drift_period_s: event-time seconds of one full rotation of the id weights
            (0: no drift).
        events_per_s: event-time rate (example ``i`` happens at ``start_time + i / rate``).
        start_time: event time of the first example (seconds since the epoch).
        seed: everything derives from it.
    """

    cardinalities: tuple[int, ...] = (1_000_000, 100_000, 10_000, 1_000, 100)
    num_dense: int = 4
    zipf_a: float = 1.1
    base_ctr: float = 0.1
    signal: float = 1.5
    dense_share: float = 0.2
    drift_period_s: float = 0.0
    events_per_s: float = 1000.0
    start_time: int = 1_700_000_000
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.cardinalities or any(int(c) < 1 for c in self.cardinalities):
            raise ConfigError(f"cardinalities must be positive ints, got {self.cardinalities}")
        if max(self.cardinalities) > 50_000_000:
            raise ConfigError("cardinalities above 50 M would need a huge Zipf table; got "
                              f"{max(self.cardinalities)}")
        if self.num_dense < 0:
            raise ConfigError(f"num_dense must be >= 0, got {self.num_dense}")
        if self.zipf_a <= 0:
            raise ConfigError(f"zipf_a must be > 0, got {self.zipf_a}")
        if not 0 < self.base_ctr < 1:
            raise ConfigError(f"base_ctr must be in (0, 1), got {self.base_ctr}")
        if self.signal < 0 or not 0 <= self.dense_share <= 1:
            raise ConfigError("signal must be >= 0 and dense_share in [0, 1], got "
                              f"{self.signal}, {self.dense_share}")
        if self.drift_period_s < 0 or self.events_per_s <= 0 or self.start_time < 0:
            raise ConfigError("drift_period_s >= 0, events_per_s > 0 and start_time >= 0 "
                              "are required")


class SyntheticCTR:
    """Generates batches of the synthetic stream (see the module docstring)."""

    def __init__(self, config: SyntheticConfig = SyntheticConfig()) -> None:
        self.config = config
        self.names = tuple(f"f{i}" for i in range(len(config.cardinalities)))
        # Zipf inverse-CDF tables, one per feature (float64 [cardinality]).
        self._cdf = []
        for card in config.cardinalities:
            w = np.arange(1, int(card) + 1, dtype=np.float64) ** (-config.zipf_a)
            c = np.cumsum(w)
            self._cdf.append(c / c[-1])
        f = len(config.cardinalities)
        share = 0.0 if config.num_dense == 0 else config.dense_share
        self._sparse_scale = config.signal * math.sqrt((1 - share) / f)
        rng = np.random.default_rng([config.seed, 0xD15E])
        v = rng.standard_normal(config.num_dense)
        self._dense_w = v * (config.signal * math.sqrt(share) / max(np.linalg.norm(v), 1e-12)) \
            if config.num_dense else v
        self.bias = math.log(config.base_ctr / (1 - config.base_ctr))

    def _ids(self, f: int, ranks: np.ndarray) -> np.ndarray:
        """Zipf rank (0 = most popular) -> a scrambled positive int64 id (a bijection)."""
        salt = np.uint64((self.config.seed * 1_000_003 + f) & 0xFFFFFFFF)
        with np.errstate(over="ignore"):
            h = (ranks.astype(np.uint64) + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15) + salt
        return (h & _MASK62).astype(np.int64)

    def weights(self, f: int, ids: np.ndarray, t: np.ndarray) -> np.ndarray:
        """The hidden weight of feature ``f``'s ``ids`` at event times ``t``."""
        base = ids.astype(np.uint64) ^ np.uint64((self.config.seed << 8) + f)
        h1 = splitmix64(base)
        h2 = splitmix64(h1)
        # Box-Muller: two independent normals per id
        r = np.sqrt(-2.0 * np.log(_unit(h1)))
        g1 = r * np.cos(2 * np.pi * _unit(h2))
        g2 = r * np.sin(2 * np.pi * _unit(h2))
        if self.config.drift_period_s > 0:
            phi = 2 * np.pi * (t - self.config.start_time) / self.config.drift_period_s
            g = np.cos(phi) * g1 + np.sin(phi) * g2
        else:
            g = g1
        return self._sparse_scale * g

    def batch(self, index: int, size: int) -> tuple[ExampleColumns, np.ndarray]:
        """Batch ``index`` of ``size`` examples: ``(columns, true click probabilities)``.

        Example ids are ``index * size + arange(size)`` (unique for a fixed ``size``).
        """
        cfg = self.config
        if index < 0 or size < 1:
            raise ConfigError(f"index must be >= 0 and size >= 1, got {index}, {size}")
        rng = np.random.default_rng([cfg.seed, 1, index])
        first = index * size
        ex_ids = np.arange(first, first + size, dtype=np.int64)
        t = cfg.start_time + (ex_ids / cfg.events_per_s).astype(np.int64)
        values = np.empty((len(self._cdf), size), dtype=np.int64)
        logit = np.full(size, self.bias)
        for f, cdf in enumerate(self._cdf):  # per feature, vectorized over examples
            ranks = np.minimum(np.searchsorted(cdf, rng.random(size)), cdf.shape[0] - 1)
            values[f] = self._ids(f, ranks)
            logit += self.weights(f, values[f], t)
        dense = rng.standard_normal((size, cfg.num_dense)).astype(np.float32)
        if cfg.num_dense:
            logit += dense.astype(np.float64) @ self._dense_w
        prob = 1.0 / (1.0 + np.exp(-logit))
        labels = (rng.random(size) < prob).astype(np.float32)
        cols = ExampleColumns(
            names=self.names,
            lengths=np.ones((len(self._cdf), size), dtype=np.int32),
            values=values.reshape(-1),
            weights=None,
            dense=dense,
            labels=labels,
            timestamps=t,
            example_ids=ex_ids,
        )
        return cols, prob


class AUCTracker:
    """Streaming AUC of scores against labels with fixed memory (a histogram of
    ``bins`` score buckets per class; exact up to ties within a bucket).

    >>> tr = AUCTracker(); tr.update(np.array([0.9, 0.1]), np.array([1.0, 0.0]))
    >>> tr.auc()
    1.0
    """

    def __init__(self, bins: int = 1 << 16) -> None:
        self.bins = bins
        self.pos = np.zeros(bins, dtype=np.int64)
        self.neg = np.zeros(bins, dtype=np.int64)

    def update(self, scores: np.ndarray, labels: np.ndarray) -> None:
        idx = np.clip((np.asarray(scores) * self.bins).astype(np.int64), 0, self.bins - 1)
        pos = np.asarray(labels) > 0.5
        self.pos += np.bincount(idx[pos], minlength=self.bins)
        self.neg += np.bincount(idx[~pos], minlength=self.bins)

    def auc(self) -> float:
        """Probability a random positive outscores a random negative (ties count 1/2);
        NaN until both classes were seen."""
        n_pos, n_neg = int(self.pos.sum()), int(self.neg.sum())
        if n_pos == 0 or n_neg == 0:
            return float("nan")
        neg_below = np.cumsum(self.neg) - self.neg
        wins = float((self.pos * neg_below).sum()) + 0.5 * float((self.pos * self.neg).sum())
        return wins / (n_pos * n_neg)
