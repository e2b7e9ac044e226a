"""Sync hosted on a real PS shard's gRPC server (extra generic handler on the PS port),
and a cold start that hands the worker a position it then follows incrementally."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from monolith_py.observe.metrics import REGISTRY
from monolith_py.ps import PSServer, PSShard, shard_of
from monolith_py.sync import DenseBoard, ShardPublisher, SyncService, sync_once
from monolith_py.sync.protocol import DeltaSink
from serving.worker import ServeConfig, ServingWorker
from tests.integration.serving.conftest import SYNC_INTERVAL, Cluster, poll
from tests.unit.sync.cluster import MiniTrainer, example

pytestmark = pytest.mark.integration


def test_worker_follows_two_real_ps_shards() -> None:
    spec_source = MiniTrainer()  # the model spec and dense weights
    configs = list(spec_source.spec.tables)
    shards = [PSShard(i, 2, configs) for i in range(2)]
    board = DenseBoard()
    board.put_state(spec_source.spec.to_dict(), spec_source.model.state_dict())
    services = [SyncService(ShardPublisher.for_ps_shard(s), board if s.shard_id == 0 else None)
                for s in shards]
    servers = [PSServer(s, extra_handlers=[svc.handler()], max_workers=8).start()
               for s, svc in zip(shards, services)]
    keys = np.arange(1, 500, dtype=np.int64)
    owner = shard_of(keys, 2)

    def push(now: int) -> None:
        for s in shards:
            mine = keys[owner == s.shard_id]
            s.pull_many({"user": mine, "item": mine}, train=True)
            g = np.full((mine.shape[0], 8), 0.5, np.float32)
            s.push_many({"user": (mine, g), "item": (mine, g)}, now=now)

    push(100)
    cfg = ServeConfig(ps=tuple(srv.address for srv in servers), port=0,
                      sync_interval_s=SYNC_INTERVAL)
    w = ServingWorker(cfg).start()
    try:
        assert w.wait_ready(60), w.store.info()
        want = {}
        for s in shards:
            mine = keys[owner == s.shard_id]
            want.update(zip(mine.tolist(), s.pull("user", mine, train=False)))
        assert len(w.store.replica("user")) == keys.shape[0]
        push(200)  # a training step on both shards reaches the worker
        for s in shards:
            mine = keys[owner == s.shard_id]
            want.update(zip(mine.tolist(), s.pull("user", mine, train=False)))
        expect = np.stack([want[k] for k in keys.tolist()])
        poll(lambda: np.array_equal(w.store.replica("user").lookup(keys), expect), timeout=30)
        with httpx.Client(base_url=f"http://127.0.0.1:{w.port}", timeout=30) as c:
            r = c.post("/v1/predict", json={"examples": [example(3, 4)]})
            assert r.status_code == 200, r.text
    finally:
        w.stop()
        for svc, srv in zip(services, servers):
            svc.close()
            srv.stop()


class _SnapshotLike:
    """A cold-start source: loads the shard's state as of "a snapshot" (here: the live
    publisher, so the epoch matches and the worker follows incrementally)."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    def load(self, sink: DeltaSink, shards: int) -> set[int]:
        t = self.cluster.trainer
        assert sync_once(t.publisher, sink, board=t.board)
        return {0}


def test_cold_start_then_incremental(cluster: Cluster) -> None:
    def fulls() -> float:
        return REGISTRY.get_sample_value("monolith_sync_full_resyncs_total",
                                         {"shard": "0"}) or 0.0

    t = cluster.trainer
    w = ServingWorker(ServeConfig(ps=(cluster.address,), port=0, sync_interval_s=SYNC_INTERVAL),
                      cold_start=_SnapshotLike(cluster))
    before = fulls()
    w.start()
    try:
        assert w.wait_ready(60)
        t.random_steps(2)
        t.publish_dense()
        exs = [example(u, u + 1) for u in range(0, 200, 23)]
        with httpx.Client(base_url=f"http://127.0.0.1:{w.port}", timeout=30) as c:
            poll(lambda: np.allclose(c.post("/v1/predict", json={"examples": exs})
                                     .json()["scores"], t.expected(exs), atol=1e-6))
        assert fulls() == before + 1  # the cold start's copy; the stream was incremental
    finally:
        w.stop()
