"""Time series from Prometheus scrapes: parse, select, store (bounded), rate.

The supervisor scrapes every role's ``/metrics`` about once a second and keeps a bounded
history per series for the status page and for the detectors (heartbeats, stragglers).

* :func:`parse_metrics` turns the text exposition into ``{sample name: [(labels, value)]}``
  (histogram and counter sample names as exposed: ``x_bucket``, ``x_sum``, ``x_total``).
* :func:`select` sums the samples of one name whose labels match.
* :class:`SeriesStore` holds ``(t, value)`` points per series name (``maxlen`` each;
  thread-safe), and :func:`rate` turns a counter's points into a per-second rate.

Example::

    >>> text = 'monolith_steps_total{role="trainer/0"} 10.0\\nup 1.0\\n'
    >>> samples = parse_metrics(text)
    >>> select(samples, "monolith_steps_total", role="trainer/0")
    10.0
    >>> store = SeriesStore(maxlen=3)
    >>> for t, v in [(0, 0.0), (1, 10.0), (2, 30.0), (3, 60.0)]:
    ...     store.add("steps", t, v)
    >>> store.points("steps")                       # the oldest point fell off
    [(1, 10.0), (2, 30.0), (3, 60.0)]
    >>> rate(store.points("steps"))
    25.0
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Iterable, Mapping, Sequence

from monolith_py.errors import ConfigError, DecodeError

__all__ = ["Samples", "parse_metrics", "select", "select_by", "SeriesStore", "rate",
           "interval_mean"]

Samples = dict[str, list[tuple[dict[str, str], float]]]
"""Sample name -> ``[(labels, value), ...]``."""


def parse_metrics(text: str) -> Samples:
    """Parse a Prometheus text exposition; raises :class:`DecodeError` on bad text."""
    from prometheus_client.parser import text_string_to_metric_families

    out: Samples = {}
    try:
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                out.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
    except (ValueError, TypeError, IndexError) as exc:
        raise DecodeError(f"not a Prometheus text exposition: {exc}") from None
    return out


def select(samples: Samples, name: str, **labels: str) -> float | None:
    """Sum of the samples named ``name`` whose labels include ``labels`` (``None`` when
    there is none)."""
    found = [v for lab, v in samples.get(name, ()) if all(lab.get(k) == w for k, w in
                                                          labels.items())]
    return float(sum(found)) if found else None


def select_by(samples: Samples, name: str, label: str, **labels: str) -> dict[str, float]:
    """``{value of label: sum}`` over the samples named ``name`` matching ``labels``."""
    out: dict[str, float] = {}
    for lab, v in samples.get(name, ()):
        if all(lab.get(k) == w for k, w in labels.items()) and label in lab:
            out[lab[label]] = out.get(lab[label], 0.0) + v
    return out


class SeriesStore:
    """Bounded ``(t, value)`` histories by series name (thread-safe)."""

    def __init__(self, maxlen: int = 900) -> None:
        if maxlen < 2:
            raise ConfigError(f"SeriesStore maxlen must be >= 2, got {maxlen}")
        self.maxlen = maxlen
        self._lock = threading.Lock()
        self._series: dict[str, deque[tuple[float, float]]] = {}

    def add(self, name: str, t: float, value: float | None) -> None:
        """Append a point (``None``/NaN/inf values are skipped)."""
        if value is None or not math.isfinite(value):
            return
        with self._lock:
            d = self._series.get(name)
            if d is None:
                d = self._series[name] = deque(maxlen=self.maxlen)
            d.append((t, float(value)))

    def points(self, name: str) -> list[tuple[float, float]]:
        with self._lock:
            return list(self._series.get(name, ()))

    def last(self, name: str) -> float | None:
        with self._lock:
            d = self._series.get(name)
            return d[-1][1] if d else None

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._series)

    def to_json(self, names: Iterable[str] | None = None, since: float | None = None,
                ndigits: int = 4) -> dict[str, list[list[float]]]:
        """``{name: [[t, v], ...]}`` (optionally only points after ``since``)."""
        with self._lock:
            keys = list(self._series) if names is None else [n for n in names
                                                              if n in self._series]
            return {k: [[round(t, 2), round(v, ndigits)] for t, v in self._series[k]
                         if since is None or t > since] for k in keys}


def rate(points: Sequence[tuple[float, float]], window_s: float | None = None) -> float | None:
    """Per-second increase of a counter over its points (the last ``window_s`` seconds
    when given). Counter resets (a restarted process) count from zero."""
    if window_s is not None and points:
        t_end = points[-1][0]
        points = [p for p in points if p[0] >= t_end - window_s]
    if len(points) < 2:
        return None
    inc = 0.0
    for (_, a), (_, b) in zip(points, points[1:]):
        inc += b - a if b >= a else b
    dt = points[-1][0] - points[0][0]
    return inc / dt if dt > 0 else None


def interval_mean(prev: Mapping[str, float] | None, cur: Mapping[str, float],
                  sum_key: str, count_key: str) -> float | None:
    """Mean over one interval from two cumulative (sum, count) readings, e.g. a
    histogram's ``_sum``/``_count``: ``(Δsum / Δcount)``; ``None`` with no new count."""
    if prev is None:
        return None
    try:
        dc = cur[count_key] - prev[count_key]
        ds = cur[sum_key] - prev[sum_key]
    except KeyError:
        return None
    if dc <= 0 or ds < 0:
        return None
    return ds / dc
