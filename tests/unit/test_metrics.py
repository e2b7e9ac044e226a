from __future__ import annotations

import urllib.request

import pytest

from monolith_py.errors import ConfigError
from monolith_py.observe import metrics


def test_get_or_create_shares_one_metric() -> None:
    a = metrics.counter("monolith_test_shared_total", "doc", ["table"])
    b = metrics.counter("monolith_test_shared_total", "doc", ["table"])
    assert a is b
    a.labels(table="t").inc(2)
    assert 'monolith_test_shared_total{table="t"} 2.0' in metrics.render().decode()


def test_conflicting_definition_is_a_config_error() -> None:
    metrics.gauge("monolith_test_conflict", "doc", ["a"])
    with pytest.raises(ConfigError, match="already exists"):
        metrics.gauge("monolith_test_conflict", "doc", ["b"])


def test_serve_metrics_over_http() -> None:
    metrics.histogram("monolith_test_latency_seconds", "doc").observe(0.003)
    server, thread = metrics.serve_metrics(0)
    try:
        port = server.server_address[1]
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read()
        assert b"monolith_test_latency_seconds_bucket" in body
    finally:
        server.shutdown()
        server.server_close()
