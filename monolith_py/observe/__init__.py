"""Observability: Prometheus metrics (and, later, heartbeats and straggler detection)."""

from monolith_py.observe.metrics import REGISTRY, counter, gauge, histogram, render, serve_metrics

__all__ = ["REGISTRY", "counter", "gauge", "histogram", "render", "serve_metrics"]
