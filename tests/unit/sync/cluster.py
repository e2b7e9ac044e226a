"""A tiny in-process training side for sync/serving tests: tables, a DLRM built from a
ModelSpec, a publisher and a dense board. Shared by the unit and integration tiers."""

from __future__ import annotations

import threading

import numpy as np
import torch
import torch.nn.functional as F
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from monolith_py.modules.spec import ModelSpec
from monolith_py.sync import DenseBoard, LockedBackend, ShardPublisher
from monolith_py.table import EmbeddingTable, OptimizerConfig, TableConfig
from monolith_py.table.backend import LocalBackend

FEATURES = ("user", "item")
NUM_DENSE = 3


def kjt_of(users: list[list[int]], items: list[list[int]]) -> KeyedJaggedTensor:
    lengths = [len(x) for x in users] + [len(x) for x in items]
    values = [v for x in users for v in x] + [v for x in items for v in x]
    return KeyedJaggedTensor.from_lengths_sync(
        keys=list(FEATURES), values=torch.tensor(values, dtype=torch.int64),
        lengths=torch.tensor(lengths, dtype=torch.int64))


class MiniTrainer:
    """One PS shard's tables + a DLRM trained in-process (single shard)."""

    def __init__(self, dim: int = 8, ttl_seconds: int | None = None, seed: int = 0,
                 lr: float = 0.5, retention_s: float = 600.0) -> None:
        configs = [TableConfig(f, dim=dim, optimizer=OptimizerConfig("sgd", lr=lr),
                               ttl_seconds=ttl_seconds, seed=seed) for f in FEATURES]
        self.spec = ModelSpec.dlrm(configs, num_dense=NUM_DENSE, bottom_mlp=(16, dim),
                                   top_mlp=(16,))
        self.tables = {c.name: EmbeddingTable(c) for c in configs}
        self.lock = threading.Lock()
        self.backend = LockedBackend(LocalBackend(self.tables), self.lock)
        self.model = self.spec.build(backend=self.backend, seed=seed)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.05)
        self.publisher = ShardPublisher(0, self.tables, lock=self.lock, retention_s=retention_s)
        self.board = DenseBoard()
        self.rng = np.random.default_rng(seed)

    def publish_dense(self) -> tuple[int, int]:
        return self.board.put_state(self.spec.to_dict(), self.model.state_dict())

    def step(self, users: list[int], items: list[int], now: int = 1_000,
             labels: list[float] | None = None) -> None:
        """One training step on examples (users[i], items[i])."""
        self.model.train()
        dense = torch.from_numpy(self.rng.standard_normal((len(users), NUM_DENSE))
                                 .astype(np.float32))
        y = torch.tensor(labels if labels is not None else [1.0] * len(users))
        logits = self.model(dense, kjt_of([[u] for u in users], [[i] for i in items]))
        loss = F.binary_cross_entropy_with_logits(logits, y)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        self.model.embedding.apply_sparse_gradients(now)

    def random_steps(self, n: int, id_space: int = 200, batch: int = 16, now: int = 1_000) -> None:
        for _ in range(n):
            u = self.rng.integers(0, id_space, batch).tolist()
            i = self.rng.integers(0, id_space, batch).tolist()
            self.step(u, i, now=now)

    def expected(self, examples: list[dict]) -> np.ndarray:
        """What serving must answer: the training model in eval mode on the same rows."""
        self.model.eval()
        users = [e["features"].get("user", []) for e in examples]
        items = [e["features"].get("item", []) for e in examples]
        dense = torch.tensor([e["dense"] for e in examples], dtype=torch.float32)
        with torch.no_grad():
            out = torch.sigmoid(self.model(dense, kjt_of(users, items))).numpy()
        self.model.train()
        return out


def example(user: int, item: int | None = None, dense: tuple[float, ...] = (0.1, -0.2, 0.3)
            ) -> dict:
    feats: dict[str, list[int]] = {"user": [user]}
    if item is not None:
        feats["item"] = [item]
    return {"features": feats, "dense": list(dense)}
