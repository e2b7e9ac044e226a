"""ServingStore: predictions equal the training model's; deltas applied twice, out of
order, dropped or shuffled never corrupt it (fault injection); dense swaps; eviction."""

from __future__ import annotations

import numpy as np
import pytest

from monolith_py.errors import InvalidInputError, UnavailableError
from monolith_py.sync import (
    DeltaAssembler,
    DenseUpdate,
    ShardDelta,
    TablePatch,
    decode_message,
    sync_once,
)
from serving.store import ServingStore
from tests.unit.sync.cluster import MiniTrainer, example


def _predict(store: ServingStore, examples: list[dict]) -> np.ndarray:
    p = store.prepare([e["features"] for e in examples], [e["dense"] for e in examples])
    scores, _ = store.predict([p])
    return scores[0]


def _synced(trainer: MiniTrainer, store: ServingStore) -> None:
    for _ in range(5):
        if sync_once(trainer.publisher, store, board=trainer.board):
            return
    raise AssertionError("store did not catch up in 5 rounds")


def _same_rows(trainer: MiniTrainer, store: ServingStore) -> None:
    for name, t in trainer.tables.items():
        sd = t.state_dict()
        rep = store.replica(name)
        assert rep is not None
        keys, rows = rep.items()
        np.testing.assert_array_equal(keys, sd["keys"])
        np.testing.assert_array_equal(rows, sd["weights"])


@pytest.fixture()
def trainer() -> MiniTrainer:
    t = MiniTrainer(ttl_seconds=100)
    t.random_steps(5)
    t.publish_dense()
    return t


def test_scores_equal_the_training_model(trainer: MiniTrainer) -> None:
    store = ServingStore(shards=1)
    assert not store.ready
    with pytest.raises(UnavailableError):
        store.prepare([{}], [[0.0, 0.0, 0.0]])
    _synced(trainer, store)
    assert store.ready
    exs = [example(u, i) for u, i in [(1, 2), (3, 4), (150, 9999)]] + [example(5)]
    np.testing.assert_allclose(_predict(store, exs), trainer.expected(exs), atol=1e-6)
    # train more; after one sync round the answers follow
    trainer.random_steps(3)
    trainer.publish_dense()
    assert not np.allclose(_predict(store, exs), trainer.expected(exs), atol=1e-6)
    _synced(trainer, store)
    np.testing.assert_allclose(_predict(store, exs), trainer.expected(exs), atol=1e-6)
    _same_rows(trainer, store)
    info = store.info()
    assert info["ready"] and info["tables"]["user"]["size"] == len(trainer.tables["user"])
    assert info["shards"][0]["versions"] == {n: t.version for n, t in trainer.tables.items()}


def test_eviction_serves_the_default(trainer: MiniTrainer) -> None:
    store = ServingStore(shards=1)
    trainer.step([777], [778], now=1_000)
    _synced(trainer, store)
    ex = [example(777, 778), example(10**12, 10**12 + 1)]  # trained vs never seen
    s = _predict(store, ex)
    assert abs(s[0] - s[1]) > 1e-6
    trainer.backend.evict_expired(1_000 + 101)  # ttl 100: everything expires
    _synced(trainer, store)
    s = _predict(store, ex)
    assert abs(s[0] - s[1]) < 1e-6  # the evicted ids read zeros, like ids never seen
    assert len(store.replica("user")) == 0


def _deltas(trainer: MiniTrainer, rounds: int, pos: object) -> list[ShardDelta]:
    """The stream a subscriber at ``pos`` would get: one delta per round of training."""
    out = []
    for r in range(rounds):
        trainer.random_steps(2, id_space=80)
        if r % 3 == 2:
            trainer.backend.evict_expired(1_000 + 101 * (r // 3 + 1))
            trainer.random_steps(1, id_space=80, now=1_000 + 101 * (r // 3 + 1))
        frames, pos = trainer.publisher.frames_since(pos, chunk_bytes=2048)
        asm = DeltaAssembler()
        msgs = [decode_message(f, asm) for f in frames]
        out.append(msgs[-1])
    return out


@pytest.mark.parametrize("fault", ["twice", "reversed", "shuffled", "dropped"])
def test_faulty_delivery_never_corrupts(trainer: MiniTrainer, fault: str) -> None:
    store = ServingStore(shards=1)
    _synced(trainer, store)
    deltas = _deltas(trainer, 9, store.position(0))
    assert not any(d.full for d in deltas)
    rng = np.random.default_rng(1)
    if fault == "twice":
        order = [d for d in deltas for _ in (0, 1)]
    elif fault == "reversed":
        order = deltas[::-1]
    elif fault == "shuffled":
        order = [deltas[i] for i in rng.permutation(len(deltas))]
    else:
        order = [d for i, d in enumerate(deltas) if i not in (2, 5)]
    verdicts = []
    for d in order:
        before = store.position(0)
        v = store.apply_delta(d)
        verdicts.append(v)
        if v != "apply":
            assert store.position(0) == before  # refused/duplicate: nothing changed
    if fault == "twice":
        assert verdicts.count("duplicate") == len(deltas)
    if fault != "twice":
        assert "refuse" in verdicts
    # whatever happened, the store is a consistent earlier state or the final one, and
    # catching up from its own position makes it exact
    trainer.publish_dense()
    _synced(trainer, store)
    _same_rows(trainer, store)
    exs = [example(u, u + 1) for u in range(0, 80, 7)]
    np.testing.assert_allclose(_predict(store, exs), trainer.expected(exs), atol=1e-6)


def test_refused_deltas(trainer: MiniTrainer) -> None:
    store = ServingStore(shards=2)
    _synced(trainer, store)
    pos = store.position(0)
    bad = [
        ShardDelta(5, pos.epoch, True, {}),  # shard not followed
        ShardDelta(0, pos.epoch, False, {"user": TablePatch(
            "user", 99, pos.versions["user"], pos.versions["user"] + 1)}),  # dim
        ShardDelta(0, pos.epoch, False, {"user": TablePatch(
            "user", 8, pos.versions["user"], pos.versions["user"] + 1,
            np.array([np.iinfo(np.int64).min]), np.zeros((1, 8), np.float32))}),
    ]
    for d in bad:
        assert store.apply_delta(d) == "refuse"
    assert store.position(0) == pos
    assert not store.ready  # shard 1 never synced


def test_dense_updates(trainer: MiniTrainer) -> None:
    store = ServingStore(shards=1)
    _synced(trainer, store)
    spec = trainer.spec.to_dict()
    tensors = {k: v.numpy() for k, v in trainer.model.state_dict().items()}
    ident = store.dense_ident()
    wrong_shape = {**tensors, "top.0.bias": np.zeros(3, np.float32)}
    assert not store.apply_dense(DenseUpdate(spec, wrong_shape, 1, 99))
    assert not store.apply_dense(DenseUpdate({**spec, "kind": "nope"}, tensors, 1, 99))
    missing = {k: v for k, v in tensors.items() if k != "top.0.bias"}
    assert not store.apply_dense(DenseUpdate(spec, missing, 1, 99))
    assert store.dense_ident() == ident
    # a new spec (other width) is built and swapped in; old requests are told to retry
    p_old = store.prepare([{"user": [1]}], [[0.0, 0.0, 0.0]])
    other = MiniTrainer(dim=8, seed=3)
    other.spec = other.spec.__class__.dlrm(other.spec.tables, 3, (16, 8), (32,))
    other.model = other.spec.build(backend=other.backend, seed=3)
    assert store.apply_dense(DenseUpdate(other.spec.to_dict(), {
        k: v.numpy() for k, v in other.model.state_dict().items()}, 2, 1))
    with pytest.raises(UnavailableError, match="retry"):
        store.predict([p_old])
    assert store.info()["model"]["dense_version"] == 1


def test_prepare_validation(trainer: MiniTrainer) -> None:
    store = ServingStore(shards=1)
    _synced(trainer, store)
    with pytest.raises(InvalidInputError, match="unknown feature"):
        store.prepare([{"nope": [1]}], [[0, 0, 0]])
    with pytest.raises(InvalidInputError, match="dense"):
        store.prepare([{"user": [1]}], [[0, 0]])
    with pytest.raises(InvalidInputError, match="reserved"):
        store.prepare([{"user": [np.iinfo(np.int64).min]}], [[0, 0, 0]])
    p = store.prepare([{}, {"item": [1, 2, 3]}], [[0, 0, 0], [1, 1, 1]])
    assert p.lengths.tolist() == [[0, 0], [0, 3]]
    # several requests in one model call give the same scores as one by one
    q = store.prepare([{"user": [4], "item": [5]}], [[0.5, 0.5, 0.5]])
    together, _ = store.predict([p, q])
    np.testing.assert_allclose(np.concatenate(together),
                               np.concatenate([store.predict([p])[0][0],
                                               store.predict([q])[0][0]]), atol=1e-6)


def test_fp16_store_is_close(trainer: MiniTrainer) -> None:
    store = ServingStore(shards=1, fp16=True)
    for _ in range(3):
        sync_once(trainer.publisher, store, board=trainer.board, fp16=True)
    exs = [example(u, u + 2) for u in range(0, 100, 9)]
    np.testing.assert_allclose(_predict(store, exs), trainer.expected(exs), atol=2e-3)
    assert store.replica("user").dtype == np.float16
