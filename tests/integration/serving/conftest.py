"""A training side (tables + DLRM + sync service over real gRPC on loopback) and a serving
worker (real uvicorn on a free port) for the serving integration tests."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from monolith_py.sync import SyncService, serve_sync
from serving.worker import ServeConfig, ServingWorker
from tests.unit.sync.cluster import MiniTrainer

SYNC_INTERVAL = 0.2


def poll(fn: Callable[[], Any], timeout: float = 30.0, every: float = 0.02) -> Any:
    """Call ``fn`` until it returns something truthy (or fail after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(every)


@dataclass
class Cluster:
    trainer: MiniTrainer
    service: SyncService
    server: Any
    address: str

    def worker(self, **kw: Any) -> ServingWorker:
        cfg = ServeConfig(ps=(self.address,), port=0, sync_interval_s=SYNC_INTERVAL, **kw)
        return ServingWorker(cfg).start()


@pytest.fixture()
def cluster() -> Iterator[Cluster]:
    trainer = MiniTrainer(ttl_seconds=100)
    trainer.random_steps(3)
    trainer.publish_dense()
    service = SyncService(trainer.publisher, trainer.board)
    server, port = serve_sync(service)
    yield Cluster(trainer, service, server, f"127.0.0.1:{port}")
    service.close()
    server.stop(None)


@pytest.fixture()
def worker(cluster: Cluster) -> Iterator[ServingWorker]:
    w = cluster.worker()
    try:
        assert w.wait_ready(60), w.store.info()
        yield w
    finally:
        w.stop()


@pytest.fixture()
def client(worker: ServingWorker) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"http://127.0.0.1:{worker.port}", timeout=30) as c:
        yield c
