"""Train -> serve end to end over real gRPC and real HTTP on loopback: served scores track
training within the sync bound, evictions serve the default, restarted subscribers and
workers catch up, a PS restart (new epoch) forces a full resync, two shards."""

from __future__ import annotations

import threading
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from monolith_py.observe.metrics import REGISTRY
from monolith_py.sync import (
    DenseBoard,
    ShardPublisher,
    ShardSubscriber,
    SyncService,
    serve_sync,
)
from monolith_py.table import EmbeddingTable
from serving.worker import ServeConfig, ServingWorker
from tests.integration.serving.conftest import SYNC_INTERVAL, Cluster, poll
from tests.unit.sync.cluster import MiniTrainer, example

pytestmark = pytest.mark.integration


def _scores(client: httpx.Client, exs: list[dict]) -> np.ndarray:
    r = client.post("/v1/predict", json={"examples": exs})
    assert r.status_code == 200, r.text
    return np.array(r.json()["scores"])


def _serves(client: httpx.Client, trainer: MiniTrainer, exs: list[dict]) -> bool:
    return bool(np.allclose(_scores(client, exs), trainer.expected(exs), atol=1e-6))


def test_predict_matches_training_model(cluster: Cluster, client: httpx.Client) -> None:
    exs = [example(u, u + 1) for u in range(0, 200, 13)] + [example(10**15)]
    np.testing.assert_allclose(_scores(client, exs), cluster.trainer.expected(exs), atol=1e-6)
    info = client.get("/v1/model").json()
    assert info["ready"] and info["shards"][0]["last_sync_s_ago"] < 30
    assert client.get("/readyz").status_code == 200
    assert "monolith_serving_deltas_total" in client.get("/metrics").text


def test_training_step_reaches_serving_within_the_bound(cluster: Cluster,
                                                       client: httpx.Client) -> None:
    t = cluster.trainer
    probe, control = example(4242, 4243), example(10**14, 10**14 + 1)
    before = _scores(client, [probe, control])
    assert abs(before[0] - before[1]) < 1e-6  # both unseen: default rows
    t.step([4242], [4243], now=1_000)  # changes the probe's rows and the dense layers
    t.publish_dense()  # (what the trainer does every dense_sync_interval)
    # the sync interval is 0.2 s; a generous deadline for a loaded machine
    poll(lambda: _serves(client, t, [probe, control]), timeout=20)
    after = _scores(client, [probe, control])
    assert abs(after[0] - after[1]) > 1e-6


def test_eviction_serves_the_default(cluster: Cluster, client: httpx.Client) -> None:
    t = cluster.trainer
    t.step([9001], [9002], now=1_000)
    probe, control = example(9001, 9002), example(10**13, 10**13 + 1)
    poll(lambda: (lambda s: abs(s[0] - s[1]) > 1e-6)(_scores(client, [probe, control])))
    t.backend.evict_expired(1_000 + 101)  # TTL 100 s of event time
    poll(lambda: (lambda s: abs(s[0] - s[1]) < 1e-6)(_scores(client, [probe, control])))


def _full_resyncs() -> float:
    return REGISTRY.get_sample_value("monolith_sync_full_resyncs_total", {"shard": "0"}) or 0.0


def test_restarted_subscriber_catches_up_incrementally(cluster: Cluster,
                                                       worker: ServingWorker,
                                                       client: httpx.Client) -> None:
    t = cluster.trainer
    full_before = _full_resyncs()
    worker.subscribers[0].stop()  # the stream goes away mid-flight
    t.random_steps(4)
    t.step([31337], [31338])
    t.backend.evict_expired(1_000 + 101)
    t.random_steps(2, now=2_000)
    t.publish_dense()
    exs = [example(u, u + 3) for u in range(0, 200, 17)] + [example(31337, 31338)]
    assert not _serves(client, t, exs)  # stale while away
    sub = ShardSubscriber(cluster.address, 0, worker.store, interval_s=SYNC_INTERVAL).start()
    try:
        poll(lambda: _serves(client, t, exs), timeout=30)
        assert _full_resyncs() == full_before  # caught up from its position, no resync
    finally:
        sub.stop()


def test_restarted_worker_catches_up(cluster: Cluster) -> None:
    t = cluster.trainer
    w1 = cluster.worker()
    try:
        assert w1.wait_ready(60)
    finally:
        w1.stop()
    t.random_steps(3)
    t.publish_dense()
    w2 = cluster.worker()
    try:
        assert w2.wait_ready(60)
        with httpx.Client(base_url=f"http://127.0.0.1:{w2.port}", timeout=30) as c:
            exs = [example(u, u) for u in range(0, 200, 11)]
            poll(lambda: _serves(c, t, exs), timeout=30)
    finally:
        w2.stop()


def test_ps_restart_with_older_state_forces_a_full_resync(cluster: Cluster,
                                                          worker: ServingWorker,
                                                          client: httpx.Client) -> None:
    t = cluster.trainer
    saved = {n: tb.state_dict() for n, tb in t.tables.items()}
    t.random_steps(3)
    t.publish_dense()
    exs = [example(u, u + 1) for u in range(0, 200, 9)]
    poll(lambda: _serves(client, t, exs))
    # the PS "restarts" from the older snapshot: new process = new publisher = new epoch
    cluster.service.close()
    cluster.server.stop(None)
    with t.lock:
        for n, tb in t.tables.items():
            tb.load_state_dict(saved[n])
    publisher = ShardPublisher(0, t.tables, lock=t.lock)
    service = SyncService(publisher, t.board)
    port = int(cluster.address.rsplit(":", 1)[1])
    server, _ = serve_sync(service, port=port)
    try:
        old_epoch = worker.store.position(0).epoch
        poll(lambda: worker.store.position(0).epoch == publisher.epoch, timeout=30)
        assert publisher.epoch != old_epoch
        poll(lambda: _serves(client, t, exs))
    finally:
        service.close()
        server.stop(None)


def test_two_shards_one_resyncs_without_touching_the_other() -> None:
    trainers = [MiniTrainer(seed=s) for s in (0, 1)]
    trainers[1].publisher = ShardPublisher(1, trainers[1].tables, lock=trainers[1].lock)
    base = trainers[0]
    base.publish_dense()
    # shard s holds keys with key % 2 == s (rows written directly, as a restore would)
    rng = np.random.default_rng(0)
    for s, tr in enumerate(trainers):
        for name, tb in tr.tables.items():
            keys = np.arange(s, 400, 2, dtype=np.int64)
            tb.load_rows(keys, rng.standard_normal((keys.shape[0], 8)).astype(np.float32))
    services = [SyncService(trainers[0].publisher, base.board),
                SyncService(trainers[1].publisher, None)]
    servers = [serve_sync(s) for s in services]
    cfg = ServeConfig(ps=tuple(f"127.0.0.1:{p}" for _, p in servers), port=0,
                      sync_interval_s=SYNC_INTERVAL)
    w = ServingWorker(cfg).start()
    try:
        assert w.wait_ready(60), w.store.info()
        assert len(w.store.replica("user")) == 400
        # shard 1 restarts empty-handed for 'user' keys >= 200: new epoch, full resync
        with trainers[1].lock:
            trainers[1].tables["user"].erase(torch.arange(201, 400, 2))
        trainers[1].publisher.new_epoch()
        poll(lambda: len(w.store.replica("user")) == 300, timeout=30)
        keys, rows = w.store.replica("user").items()
        assert set(keys.tolist()) == set(range(0, 400, 2)) | set(range(1, 200, 2))
        sd0 = trainers[0].tables["user"].state_dict()
        got = w.store.replica("user").lookup(sd0["keys"])
        np.testing.assert_array_equal(got, sd0["weights"])  # shard 0 untouched
    finally:
        w.stop()
        for svc, (srv, _) in zip(services, servers):
            svc.close()
            srv.stop(None)


def test_concurrent_predictions_while_syncing(cluster: Cluster, worker: ServingWorker,
                                              client: httpx.Client) -> None:
    """Requests from several threads while training runs: every answer is a 200 and
    agrees with one consistent model state (checked at the end, after training stops)."""
    t = cluster.trainer
    stop = threading.Event()
    errors: list[Any] = []

    def train() -> None:
        while not stop.is_set():
            t.random_steps(1)

    def ask() -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{worker.port}", timeout=30) as c:
            for i in range(40):
                r = c.post("/v1/predict", json={"examples": [example(i, i + 1)] * (1 + i % 5)})
                if r.status_code != 200 or np.ptp(r.json()["scores"]) > 1e-6:
                    errors.append(r.text)

    trainer_thread = threading.Thread(target=train)
    askers = [threading.Thread(target=ask) for _ in range(4)]
    trainer_thread.start()
    for a in askers:
        a.start()
    for a in askers:
        a.join(120)
    stop.set()
    trainer_thread.join(60)
    assert not errors, errors[:3]
    t.publish_dense()
    exs = [example(u, u + 1) for u in range(0, 200, 19)]
    poll(lambda: _serves(client, t, exs), timeout=30)
    tb: EmbeddingTable = t.tables["user"]
    assert len(worker.store.replica("user")) == len(tb)
