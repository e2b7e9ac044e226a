"""Prometheus metrics for every role.

All roles export through ``prometheus_client``. Metric objects are process-wide and
created on first use by name (``counter``, ``gauge``, ``histogram`` are get-or-create),
so several instances of a component in one process (tests, single-process mode) share
them and distinguish themselves by labels (``shard="0"``, ``table="user"``...).

Names follow ``monolith_<role>_<what>_<unit>``, e.g. ``monolith_ps_pull_seconds``.

Example::

    >>> c = counter("monolith_doc_example_total", "Example counter.", ["table"])
    >>> c.labels(table="user").inc(3)
    >>> "monolith_doc_example_total" in render().decode()
    True
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)

from monolith_py.errors import ConfigError

__all__ = [
    "REGISTRY",
    "CONTENT_TYPE_LATEST",
    "counter",
    "gauge",
    "histogram",
    "render",
    "serve_metrics",
    "LATENCY_BUCKETS",
]

REGISTRY = CollectorRegistry(auto_describe=True)
"""The registry every monolith-py metric lives in (not the global default registry, so
users' own metrics and ours never collide)."""

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)

_lock = threading.Lock()
_metrics: dict[str, tuple[type, tuple[str, ...], Any]] = {}


def _get_or_create(kind: type, name: str, doc: str, labels: Sequence[str], **kw: Any) -> Any:
    labels = tuple(labels)
    with _lock:
        found = _metrics.get(name)
        if found is not None:
            found_kind, found_labels, metric = found
            if found_kind is not kind or found_labels != labels:
                raise ConfigError(
                    f"metric {name!r} already exists as {found_kind.__name__}{list(found_labels)}, "
                    f"requested {kind.__name__}{list(labels)}; use one definition"
                )
            return metric
        metric = kind(name, doc, labels, registry=REGISTRY, **kw)
        _metrics[name] = (kind, labels, metric)
        return metric


def counter(name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
    """Get or create a counter (``name`` should end in ``_total``)."""
    return _get_or_create(Counter, name, doc, labels)  # type: ignore[no-any-return]


def gauge(name: str, doc: str, labels: Sequence[str] = ()) -> Gauge:
    """Get or create a gauge."""
    return _get_or_create(Gauge, name, doc, labels)  # type: ignore[no-any-return]


def histogram(
    name: str, doc: str, labels: Sequence[str] = (), buckets: Sequence[float] = LATENCY_BUCKETS
) -> Histogram:
    """Get or create a histogram (default buckets suit latencies in seconds)."""
    return _get_or_create(Histogram, name, doc, labels, buckets=tuple(buckets))  # type: ignore[no-any-return]


def render() -> bytes:
    """The Prometheus text exposition of every monolith-py metric in this process."""
    return generate_latest(REGISTRY)


def serve_metrics(port: int, host: str = "127.0.0.1") -> Any:
    """Serve ``/metrics`` on ``host:port`` from a daemon thread (port 0 picks a free
    port). Returns ``(server, thread)``; ``server.server_address[1]`` is the port."""
    return start_http_server(port, addr=host, registry=REGISTRY)


def proc_cpu_s(stat_path: str) -> float | None:
    """User + system CPU seconds of the process or thread whose ``/proc/.../stat`` file
    this is; ``None`` when it cannot be read (gone, or not Linux)."""
    try:
        with open(stat_path) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None
