"""OpenAPI-driven fuzzing of a running worker (schemathesis) and property-based valid
bodies: never a 5xx. ``monolith serve`` as a real process, stopped by SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from serving.worker import ServingWorker
from tests.integration.serving.conftest import Cluster, poll
from tests.unit.sync.cluster import FEATURES, NUM_DENSE

pytestmark = pytest.mark.integration


def test_schemathesis_finds_no_server_error(worker: ServingWorker) -> None:
    base = f"http://127.0.0.1:{worker.port}"
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    checks = [not_a_server_error, status_code_conformance, content_type_conformance,
              response_schema_conformance]
    ran = 0
    for result in schema.get_all_operations():
        op = result.ok()
        n = 150 if op.path == "/v1/predict" else 10

        @settings(max_examples=n, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy())
        def run(case: schemathesis.Case) -> None:
            case.call_and_validate(base_url=base, checks=checks)

        run()
        ran += 1
    assert ran == 5


ids = st.lists(st.integers(-(2**63) + 1, 2**63 - 1), max_size=6)
valid_example = st.fixed_dictionaries(
    {"features": st.dictionaries(st.sampled_from(FEATURES), ids),
     "dense": st.lists(st.floats(-1e30, 1e30, allow_nan=False), min_size=NUM_DENSE,
                       max_size=NUM_DENSE)})


def test_valid_bodies_always_score(worker: ServingWorker) -> None:
    with httpx.Client(base_url=f"http://127.0.0.1:{worker.port}", timeout=30) as c:

        @settings(max_examples=150, deadline=None, derandomize=True, database=None)
        @given(st.lists(valid_example, min_size=1, max_size=20))
        def run(examples: list[dict]) -> None:
            r = c.post("/v1/predict", json={"examples": examples})
            assert r.status_code == 200, r.text
            scores = r.json()["scores"]
            assert len(scores) == len(examples)
            assert all(0.0 <= s <= 1.0 for s in scores)

        run()


def test_monolith_serve_process(cluster: Cluster) -> None:
    import socket

    with socket.socket() as s:  # a free port for the child (it binds it right away)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "monolith_py.cli", "--log-level", "WARNING", "serve",
         "--ps", cluster.address, "--port", str(port), "--sync-interval", "0.2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        base = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            try:
                return httpx.get(f"{base}/readyz", timeout=5).status_code == 200
            except httpx.HTTPError:
                assert proc.poll() is None, proc.stdout.read().decode()  # type: ignore[union-attr]
                return False

        poll(ready, timeout=120, every=0.2)
        r = httpx.post(f"{base}/v1/predict", json={"examples": [
            {"features": {"user": [1], "item": [2]}, "dense": [0.0] * NUM_DENSE}]}, timeout=30)
        assert r.status_code == 200 and len(r.json()["scores"]) == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)
            raise
    assert rc == 0, proc.stdout.read().decode()  # type: ignore[union-attr]
