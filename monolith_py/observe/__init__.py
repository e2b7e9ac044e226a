"""Observability: Prometheus metrics, heartbeats, straggler detection, time series."""

from monolith_py.observe.heartbeat import Heartbeat, is_hung
from monolith_py.observe.metrics import REGISTRY, counter, gauge, histogram, render, serve_metrics
from monolith_py.observe.stragglers import StragglerPolicy, find_stragglers

__all__ = ["REGISTRY", "counter", "gauge", "histogram", "render", "serve_metrics", "Heartbeat",
           "is_hung", "StragglerPolicy", "find_stragglers"]
