"""Straggler detection: a pure function over per-interval step times.

A member of a group of peers (trainers, PS shards) is a **straggler** when its step time
stays above ``factor`` x the group's median for ``k`` consecutive intervals. The input is
one value per scrape interval per member (the mean step time in that interval; ``None``
or NaN where a member did no step), aligned on the same intervals, newest last. The
median of an interval is taken over the members that have a value in it, and needs at
least two of them -- one member alone is never a straggler.

Example::

    >>> times = {"trainer/0": [0.10, 0.11, 0.10, 0.10],
    ...          "trainer/1": [0.10, 0.30, 0.31, 0.29],
    ...          "trainer/2": [0.11, 0.10, 0.12, 0.10]}
    >>> find_stragglers(times, factor=1.5, k=3)
    ['trainer/1']
    >>> find_stragglers(times, factor=1.5, k=4)      # the first interval was fine
    []
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from monolith_py.errors import ConfigError

__all__ = ["StragglerPolicy", "find_stragglers", "straggler_ratios"]


@dataclass(frozen=True)
class StragglerPolicy:
    """``factor``: how much slower than the median; ``k``: for how many intervals."""

    factor: float = 1.5
    k: int = 5

    def __post_init__(self) -> None:
        if not (self.factor > 1.0 and math.isfinite(self.factor)):
            raise ConfigError(f"straggler factor must be a finite number > 1, got "
                              f"{self.factor!r} (1.5 flags a member 50% slower than the median)")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ConfigError(f"straggler k must be an int >= 1 (intervals), got {self.k!r}")


def _matrix(series: Mapping[str, Sequence[float | None]], k: int) -> tuple[list[str], np.ndarray]:
    names = sorted(series)
    out = np.full((len(names), k), np.nan, dtype=np.float64)
    for i, name in enumerate(names):
        tail = list(series[name])[-k:]
        vals = [np.nan if v is None else float(v) for v in tail]
        if vals:
            out[i, k - len(vals):] = vals
    return names, out


def straggler_ratios(series: Mapping[str, Sequence[float | None]],
                     k: int) -> dict[str, list[float]]:
    """Each member's step time divided by its interval's median, for the last ``k``
    intervals (NaN where undefined). Shapes: ``len(series)`` lists of ``k`` floats."""
    names, m = _matrix(series, k)
    if not names:
        return {}
    present = np.isfinite(m)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN intervals
        med = np.nanmedian(m, axis=0)
        med = np.where(present.sum(axis=0) >= 2, med, np.nan)
        ratios = m / med[None, :]
    return {n: ratios[i].tolist() for i, n in enumerate(names)}


def find_stragglers(series: Mapping[str, Sequence[float | None]], *, factor: float = 1.5,
                    k: int = 5) -> list[str]:
    """Members whose step time exceeded ``factor`` x the median in each of the last ``k``
    intervals (sorted names). See the module docstring for the input."""
    StragglerPolicy(factor, k)  # validates
    out = []
    for name, ratios in straggler_ratios(series, k).items():
        r = np.asarray(ratios)
        if r.shape[0] == k and np.all(np.isfinite(r)) and np.all(r > factor):
            out.append(name)
    return out
