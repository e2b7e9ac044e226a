"""The HTTP app in-process (ASGI transport, no sockets): validation, limits, readiness,
metrics, the OpenAPI document (and that docs/openapi.json is current); the model spec;
the micro-batcher."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from monolith_py.errors import ConfigError
from monolith_py.modules.spec import ModelSpec
from monolith_py.sync import sync_once
from monolith_py.table import TableConfig
from serving.app import create_app
from serving.batcher import MicroBatcher, OverloadedError
from serving.cli import openapi_document
from serving.schema import ApiLimits
from serving.store import ServingStore
from tests.unit.sync.cluster import MiniTrainer, example

ROOT = Path(__file__).resolve().parents[3]


async def _requests(app: Any, calls: list[tuple[str, str, Any]]) -> list[httpx.Response]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        out = []
        for method, path, body in calls:
            if isinstance(body, bytes):
                out.append(await c.request(method, path, content=body,
                                           headers={"content-type": "application/json"}))
            else:
                out.append(await c.request(method, path, json=body))
        return out


def _run(app: Any, *calls: tuple[str, str, Any]) -> list[httpx.Response]:
    return asyncio.run(_requests(app, list(calls)))


@pytest.fixture()
def served() -> Any:
    trainer = MiniTrainer()
    trainer.random_steps(3)
    trainer.publish_dense()
    store = ServingStore(shards=1)
    batcher = MicroBatcher(store.predict, size=lambda p: p.n)
    app = create_app(store, batcher, ApiLimits(max_examples=8, max_ids_per_feature=4,
                                               max_body_bytes=4096))
    yield trainer, store, app
    batcher.close()


def test_not_ready_then_ready(served: Any) -> None:
    trainer, store, app = served
    ready, pred, health = _run(app, ("GET", "/readyz", None),
                               ("POST", "/v1/predict", {"examples": [example(1)]}),
                               ("GET", "/healthz", None))
    assert ready.status_code == 503 and "no dense model" in ready.json()["detail"]
    assert pred.status_code == 503
    assert health.status_code == 200
    sync_once(trainer.publisher, store, board=trainer.board)
    exs = [example(1, 2), example(5), example(7, 8, (1.0, 2.0, 3.0))]
    ready, pred, model, metrics = _run(app, ("GET", "/readyz", None),
                                       ("POST", "/v1/predict", {"examples": exs}),
                                       ("GET", "/v1/model", None), ("GET", "/metrics", None))
    assert ready.status_code == 200
    assert pred.status_code == 200, pred.text
    body = pred.json()
    np.testing.assert_allclose(body["scores"], trainer.expected(exs), atol=1e-6)
    assert body["model_version"].startswith("d1-s0.")
    info = model.json()
    assert info["ready"] and info["model"]["features"] == ["user", "item"]
    assert info["tables"]["user"]["size"] == len(trainer.tables["user"])
    assert "monolith_serving_requests_total" in metrics.text


@pytest.mark.parametrize("body,status,match", [
    ({"examples": []}, 422, "at least 1"),
    ({"examples": [example(1)] * 9}, 422, "at most 8"),
    ({"examples": [{"features": {"user": [1, 2, 3, 4, 5]}, "dense": [0, 0, 0]}]}, 422,
     "at most 4"),
    ({"examples": [{"features": {"user": [2**63]}, "dense": [0, 0, 0]}]}, 422, "less than"),
    ({"examples": [{"features": {"user": ["1"]}, "dense": [0, 0, 0]}]}, 422, "integer"),
    ({"examples": [{"features": {"user": [1.5]}, "dense": [0, 0, 0]}]}, 422, "integer"),
    ({"examples": [{"features": {"nope": [1]}, "dense": [0, 0, 0]}]}, 422, "unknown feature"),
    ({"examples": [{"features": {"user": [1]}, "dense": [0, 0]}]}, 422, "dense has 2"),
    ({"examples": [{"features": {}, "dense": [0, 0, 0], "x": 1}]}, 422, "Extra inputs"),
    ({"examples": [{"features": {"": [1]}, "dense": [0, 0, 0]}]}, 422, "at least 1"),
    ({"rows": []}, 422, "Field required"),
    (b'{"examples": [{"dense": [NaN, 0, 0]}]}', 422, ""),
    (b"not json", 422, "JSON"),
    (b"x" * 5000, 413, "larger than 4096"),
])
def test_bad_requests_are_4xx(served: Any, body: Any, status: int, match: str) -> None:
    trainer, store, app = served
    sync_once(trainer.publisher, store, board=trainer.board)
    (r,) = _run(app, ("POST", "/v1/predict", body))
    assert r.status_code == status, r.text
    assert match in r.text


def test_openapi_document_is_current() -> None:
    doc = openapi_document()
    assert set(doc["paths"]) == {"/v1/predict", "/v1/model", "/healthz", "/readyz", "/metrics"}
    schema = doc["components"]["schemas"]["PredictRequest"]["properties"]["examples"]
    assert schema["maxItems"] == ApiLimits().max_examples
    stored = json.loads((ROOT / "docs" / "openapi.json").read_text())
    assert stored == json.loads(json.dumps(doc)), (
        "docs/openapi.json is stale; regenerate it with "
        "`monolith serve --openapi docs/openapi.json`")


def test_model_spec_round_trip_and_validation() -> None:
    tables = [TableConfig("a", dim=4), TableConfig("b", dim=4, feature_names=("b1", "b2"))]
    for spec in (ModelSpec.dlrm(tables, 2, (8, 4), (8,)), ModelSpec.deepfm(tables, 0, (8,))):
        again = ModelSpec.from_json(spec.to_json())
        assert again == spec and again.feature_names == ("a", "b1", "b2")
        assert set(again.build(seed=1).state_dict()) == set(spec.build(seed=1).state_dict())
    good = ModelSpec.dlrm(tables, 2, (8, 4), (8,)).to_dict()
    for bad in ({**good, "kind": "gpt"}, {**good, "extra": 1}, {**good, "num_dense": -1},
                {**good, "args": {"bottom_mlp": [0]}}, {**good, "args": {"top_mlp": "8"}},
                {**good, "args": {"interaction": "cross"}}, {**good, "tables": []},
                {**good, "tables": [{"name": "a"}]}, {**good, "tables": [{"dim": 4}]},
                {**good, "tables": [{**good["tables"][0], "optimizer": {"kind": "x"}}]},
                {**good, "tables": [{**good["tables"][0], "zzz": 1}]}, {**good, "format": 9},
                {**good, "args": {"bottom_mlp": [8] * 40}}, []):
        with pytest.raises(ConfigError):
            ModelSpec.from_dict(bad)
    with pytest.raises(ConfigError):
        ModelSpec.from_json(b"{")


@pytest.mark.parametrize("inline", [False, True])
def test_batcher_merges_concurrent_requests_and_reports_errors(inline: bool) -> None:
    calls: list[int] = []

    def run(items: list[int]) -> tuple[list[int], str]:
        calls.append(len(items))
        if -1 in items:
            raise ValueError("boom")
        return [x + 1 for x in items], "v"

    inits: list[int] = []
    b = MicroBatcher(run, size=lambda x: 1, max_examples=64, max_wait_s=0.05, inline=inline,
                     thread_init=lambda: inits.append(1))

    async def main() -> list[Any]:
        ok = await asyncio.gather(*(b.submit(i) for i in range(20)))
        with pytest.raises(ValueError, match="boom"):
            await b.submit(-1)
        return ok

    try:
        assert asyncio.run(main()) == [(i + 1, "v") for i in range(20)]
        assert sum(calls[:-1]) == 20 and len(calls) - 1 < 20  # batched
        assert inits == [1]
    finally:
        b.close()
    if inline:
        return
    small = MicroBatcher(run, size=lambda x: 10, max_queued=15)

    async def flood() -> None:
        futs = [small.submit(1)]
        with pytest.raises(OverloadedError):
            for _ in range(100):
                futs.append(small.submit(1))
        await asyncio.gather(*futs)

    try:
        asyncio.run(flood())
    finally:
        small.close()
