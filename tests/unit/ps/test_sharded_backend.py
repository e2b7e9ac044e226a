"""Single-process mode: any number of in-process shards behaves exactly like one
LocalBackend (same routing as the RPC client), also under the module and the trainer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from monolith_py.batch import Batch
from monolith_py.errors import InvalidInputError, InvalidTypeError
from monolith_py.modules import DLRM, DynamicEmbeddingBagCollection
from monolith_py.ps import PSShard, ShardedBackend
from monolith_py.ps import _router
from monolith_py.table import EmbeddingTable, OptimizerConfig, TableConfig
from monolith_py.table.backend import LocalBackend, SparseBackend
from monolith_py.training import OnlineTrainer

CFGS = [
    TableConfig("user", dim=4, optimizer=OptimizerConfig("adagrad", lr=0.1)),
    TableConfig("item", dim=8, feature_names=("item", "hist"),
                optimizer=OptimizerConfig("adam", lr=0.01), admit_threshold=2),
]


@pytest.mark.parametrize("n", [1, 2, 3])
def test_matches_local_backend_exactly(n: int) -> None:
    sharded = ShardedBackend.build(CFGS, n)
    local = LocalBackend({c.name: EmbeddingTable(c) for c in CFGS})
    assert isinstance(sharded, SparseBackend)
    rng = np.random.default_rng(n)
    for step in range(5):
        keys = {"user": torch.from_numpy(np.unique(rng.integers(-1000, 1000, 200))),
                "item": torch.from_numpy(np.unique(rng.integers(0, 1 << 50, 100)))}
        a, b = sharded.lookup(keys, train=True), local.lookup(keys, train=True)
        for t in keys:
            assert torch.equal(a[t], b[t])
        grads = {t: (k, torch.randn(len(k), 4 if t == "user" else 8)) for t, k in keys.items()}
        sharded.apply_gradients(grads, 100 + step)
        local.apply_gradients(grads, 100 + step)
    probe = {"user": torch.arange(-1000, 1000), "item": torch.from_numpy(
        np.unique(np.random.default_rng(n).integers(0, 1 << 50, 100)))}
    a, b = sharded.lookup(probe, train=False), local.lookup(probe, train=False)
    assert all(torch.equal(a[t], b[t]) for t in probe)
    sa, sb = sharded.stats(), local.stats()
    for t in ("user", "item"):
        assert sa[t]["size"] == sb[t]["size"] and len(sa[t]["shards"]) == n
    assert sharded.evict_expired(10**9) == {"user": 0, "item": 0}
    state = sharded.state_dict()
    fresh = ShardedBackend.build(CFGS, n)
    fresh.load_state_dict(state)
    c = fresh.lookup(probe, train=False)
    assert all(torch.equal(a[t], c[t]) for t in probe)


def test_repeated_keys_in_a_push_get_one_summed_update() -> None:
    sharded = ShardedBackend.build(CFGS[:1], 2)
    local = LocalBackend({"user": EmbeddingTable(CFGS[0])})
    k = torch.tensor([5, 9, 5, 5, 9, 11])
    g = torch.randn(6, 4)
    sharded.apply_gradients({"user": (k, g)}, 1)
    local.apply_gradients({"user": (k, g)}, 1)
    probe = {"user": torch.tensor([5, 9, 11])}
    assert torch.allclose(sharded.lookup(probe, False)["user"], local.lookup(probe, False)["user"],
                          atol=1e-6)


def test_validation_before_any_change() -> None:
    b = ShardedBackend.build(CFGS, 2)
    with pytest.raises(InvalidInputError, match="unknown table"):
        b.lookup({"user": torch.tensor([1]), "nope": torch.tensor([1])}, train=True)
    with pytest.raises(InvalidTypeError):
        b.lookup({"user": torch.tensor([1.0])}, train=True)
    good = (torch.tensor([1, 2]), torch.ones(2, 4))
    with pytest.raises(InvalidInputError, match="NaN"):
        b.apply_gradients({"user": good,
                           "item": (torch.tensor([3]), torch.full((1, 8), np.inf))}, 1)
    with pytest.raises(InvalidInputError, match="shape"):
        b.apply_gradients({"user": (torch.tensor([1, 2]), torch.ones(2, 5))}, 1)
    assert all(s["size"] == 0 for s in b.stats().values())
    with pytest.raises(InvalidInputError):
        ShardedBackend([PSShard(1, 2, CFGS), PSShard(0, 2, CFGS)])
    with pytest.raises(InvalidInputError):
        ShardedBackend([PSShard(0, 2, CFGS), PSShard(1, 2, CFGS[:1])])
    with pytest.raises(InvalidInputError):
        b.load_state_dict({"shards": []})


def _batches(n: int, b: int = 64) -> list[Batch]:
    rng = np.random.default_rng(7)
    out = []
    for i in range(n):
        lengths = np.stack([np.ones(b, np.int64), np.ones(b, np.int64), rng.integers(0, 4, b)])
        ids = [rng.integers(0, 300, b), rng.integers(0, 100, b),
               rng.integers(0, 100, lengths[2].sum())]
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=["user", "item", "hist"], values=torch.from_numpy(np.concatenate(ids)),
            lengths=torch.from_numpy(lengths.reshape(-1)))
        out.append(Batch(kjt, torch.randn(b, 3, generator=torch.Generator().manual_seed(i)),
                         torch.from_numpy((rng.random(b) < 0.3).astype(np.float32)),
                         torch.full((b,), 1000 + i), torch.arange(i * b, (i + 1) * b)))
    return out


def test_online_trainer_unchanged_over_shards() -> None:
    results = []
    for backend in (None, ShardedBackend.build(CFGS, 3)):
        torch.manual_seed(0)
        ebc = DynamicEmbeddingBagCollection(CFGS, backend=backend)
        model = DLRM(ebc, 3, bottom_mlp=(8,), top_mlp=(8,), interaction="cat")
        trainer = OnlineTrainer(model, torch.optim.Adagrad(model.parameters(), lr=0.05))
        results.append(trainer.fit(_batches(6)))
    assert results[0]["auc"] == results[1]["auc"] and results[0]["rows"] == results[1]["rows"]
    assert results[0]["loss"] == results[1]["loss"]


def test_pack_respects_the_budget_and_covers_every_key() -> None:
    keys = {"a": np.arange(1000, dtype=np.int64), "b": np.arange(10, dtype=np.int64)}
    parts = _router.split(keys, 1)[0]
    msgs = _router.pack(parts, {"a": 64, "b": 128}, budget=10_000)
    assert len(msgs) > 5
    seen = {"a": 0, "b": 0}
    for m in msgs:
        used = sum((hi - lo) * ({"a": 64, "b": 128}[p.table] + 1) + 64 for p, lo, hi in m)
        assert used <= 10_000
        for p, lo, hi in m:
            seen[p.table] += hi - lo
    assert seen == {"a": 1000, "b": 10}
    with pytest.raises(InvalidInputError, match="max_message_bytes"):
        _router.pack(parts, {"a": 64, "b": 1 << 20}, budget=10_000)
