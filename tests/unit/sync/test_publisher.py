"""ShardPublisher: full vs incremental deltas, epochs, retention; the ordering rule;
ReplicaTable against a dict model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from monolith_py.errors import InvalidInputError
from monolith_py.sync import (
    ReplicaTable,
    ShardDelta,
    ShardPosition,
    ShardPublisher,
    TablePatch,
    classify,
    trim_version,
)
from monolith_py.table import EmbeddingTable, OptimizerConfig, TableConfig


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _table(name: str = "t", ttl: int | None = None) -> EmbeddingTable:
    return EmbeddingTable(TableConfig(name, dim=4, optimizer=OptimizerConfig("sgd", lr=1.0),
                                      ttl_seconds=ttl))


def _train(t: EmbeddingTable, keys: list[int], now: int = 100) -> None:
    k = torch.tensor(keys, dtype=torch.int64)
    t.lookup(k, train=True)
    t.apply_gradients(k, torch.ones(len(keys), 4), now)


def _apply(rep: dict[int, np.ndarray], d: ShardDelta, name: str = "t") -> None:
    p = d.tables.get(name)
    if p is None:
        return
    if d.full:
        rep.clear()
    for k in p.deleted.tolist():
        rep.pop(k, None)
    for k, r in zip(p.keys.tolist(), p.rows):
        rep[k] = r.copy()


def _state(t: EmbeddingTable) -> dict[int, np.ndarray]:
    sd = t.state_dict()
    return {int(k): w for k, w in zip(sd["keys"], sd["weights"])}


def _equal(a: dict[int, np.ndarray], b: dict[int, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_full_then_incremental_is_lossless() -> None:
    t = _table(ttl=50)
    pub = ShardPublisher(0, {"t": t})
    mirror: dict[int, np.ndarray] = {}
    d = pub.delta_since(None)
    assert d is not None and d.full
    _apply(mirror, d)
    pos = pub.position_of(d)
    assert pub.delta_since(pos) is None  # nothing new
    rng = np.random.default_rng(0)
    for step in range(30):
        _train(t, rng.integers(0, 60, 8).tolist(), now=100 + step * 10)
        if step % 7 == 3:
            t.evict_expired(100 + step * 10)  # deletions
        if step % 3 == 0:  # readers do not follow every step: gaps of several versions
            d = pub.delta_since(pos)
            assert d is not None and not d.full
            _apply(mirror, d)
            pos = ShardPosition(d.epoch, {**pos.versions, **d.position_after()})
    d = pub.delta_since(pos)
    if d is not None:
        _apply(mirror, d)
    assert t.stats()["evicted"] > 0
    _equal(mirror, _state(t))


def test_version_regression_starts_a_new_epoch() -> None:
    t = _table()
    _train(t, [1, 2, 3])
    saved = t.state_dict()
    pub = ShardPublisher(0, {"t": t})
    d = pub.delta_since(None)
    pos = pub.position_of(d)
    _train(t, [4])
    step = pub.delta_since(pos)  # the reader follows the newer state
    pos = ShardPosition(step.epoch, step.position_after())
    t.load_state_dict(saved)  # restored behind the publisher's back: versions went back
    again = pub.delta_since(pos)
    assert again is not None and again.full and again.epoch != d.epoch
    mirror: dict[int, np.ndarray] = {}
    _apply(mirror, again)
    _equal(mirror, _state(t))
    e = pub.new_epoch()
    assert pub.delta_since(pub.position_of(again)).full and pub.epoch == e


def test_reader_behind_the_trimmed_log_gets_a_full_resync() -> None:
    clock = FakeClock()
    t = _table(ttl=5)
    pub = ShardPublisher(0, {"t": t}, retention_s=10.0, clock=clock)
    old = pub.position_of(pub.delta_since(None))
    _train(t, [1, 2], now=100)
    pub.trim()  # samples (t=0, v)
    clock.t = 5.0
    _train(t, [3], now=200)
    t.evict_expired(200)  # deletes 1 and 2
    pub.trim()
    recent = pub.position()
    clock.t = 20.0
    _train(t, [4], now=201)
    floors = pub.trim()
    assert floors["t"] > old.versions["t"]
    assert t.stats()["deletion_log"] == 0  # the deletion of 1, 2 was trimmed
    d_old = pub.delta_since(old)
    assert d_old.full  # its deletions are gone: incremental would resurrect 1 and 2
    mirror = {1: np.zeros(4), 2: np.zeros(4)}
    _apply(mirror, d_old)
    _equal(mirror, _state(t))
    # a reader inside the retention window still follows incrementally
    assert recent.versions["t"] >= floors["t"]
    assert not pub.delta_since(recent).full


def test_trim_guard_and_policy() -> None:
    assert trim_version(np.zeros(0), np.zeros(0, np.int64), 10.0, 1.0) == -1
    assert trim_version(np.array([0.0, 1.0, 2.0]), np.array([1, 2, 3]), 2.5, 1.0) == 2
    clock = FakeClock()
    t = _table()
    pub = ShardPublisher(0, {"t": t}, retention_s=1.0, clock=clock, trim_guard=lambda n: 1)
    _train(t, [1])
    pub.trim()
    _train(t, [2])
    clock.t = 10
    pub.trim()
    assert pub.floors["t"] <= 1  # another reader (e.g. snapshots) still needs version 1


def test_frames_are_shared_by_readers_at_the_same_position() -> None:
    t = _table()
    pub = ShardPublisher(0, {"t": t})
    _train(t, [1, 2])
    a, pos_a = pub.frames_since(None)
    b, pos_b = pub.frames_since(None)
    assert a is b and pos_a == pos_b
    assert pub.frames_since(pos_a)[0] == []


def test_publisher_rejects_bad_config() -> None:
    with pytest.raises(InvalidInputError):
        ShardPublisher(0, {})
    with pytest.raises(InvalidInputError):
        ShardPublisher(0, {"t": _table()}, retention_s=0)


def _patch(since: int, version: int) -> dict[str, TablePatch]:
    return {"t": TablePatch("t", 4, since, version)}


def test_classify() -> None:
    inc = ShardDelta(0, 5, False, _patch(3, 6))
    assert classify(ShardPosition(5, {"t": 3}), inc) == "apply"
    assert classify(ShardPosition(5, {"t": 6}), inc) == "duplicate"
    assert classify(ShardPosition(5, {"t": 9}), inc) == "duplicate"
    assert classify(ShardPosition(5, {"t": 2}), inc) == "refuse"   # gap
    assert classify(ShardPosition(5, {"t": 4}), inc) == "refuse"   # overlaps
    assert classify(ShardPosition(4, {"t": 3}), inc) == "refuse"   # other epoch
    assert classify(None, inc) == "refuse"
    assert classify(ShardPosition(5, {}), inc) == "refuse"          # unknown table
    full = ShardDelta(0, 5, True, _patch(-1, 6))
    assert classify(None, full) == "apply"
    assert classify(ShardPosition(4, {"t": 100}), full) == "apply"  # new epoch wins
    assert classify(ShardPosition(5, {"t": 6}), full) == "apply"    # idempotent
    assert classify(ShardPosition(5, {"t": 7}), full) == "refuse"   # stale


@given(st.lists(st.tuples(st.sampled_from(["upsert", "erase", "replace"]),
                          st.lists(st.integers(-50, 50), max_size=30),
                          st.integers(0, 2)), max_size=40))
def test_replica_matches_a_dict_model(ops: list) -> None:
    rep = ReplicaTable("t", 3, initial_capacity=4)
    model: dict[int, tuple[int, np.ndarray]] = {}
    for i, (op, keys, owner) in enumerate(ops):
        k = np.unique(np.array(keys, dtype=np.int64))
        rows = (np.arange(k.shape[0] * 3, dtype=np.float32).reshape(-1, 3) + i)
        if op == "upsert":
            rep.upsert(k, rows, owner)
            model.update({int(x): (owner, r) for x, r in zip(k, rows)})
        elif op == "erase":
            rep.erase(k)
            for x in k.tolist():
                model.pop(x, None)
        else:
            rep.replace_owner(owner, k, rows)
            model = {x: v for x, v in model.items() if v[0] != owner}
            model.update({int(x): (owner, r) for x, r in zip(k, rows)})
    assert len(rep) == len(model)
    probe = np.arange(-60, 61, dtype=np.int64)
    got = rep.lookup(probe)
    want = np.stack([model[x][1] if x in model else np.zeros(3, np.float32)
                     for x in probe.tolist()])
    np.testing.assert_array_equal(got, want)
    keys, rows = rep.items()
    assert keys.tolist() == sorted(model)


def test_replica_fp16_and_bad_rows() -> None:
    rep = ReplicaTable("t", 2, fp16=True)
    rep.upsert(np.array([1]), np.array([[0.1, 0.2]], np.float32), 0)
    assert rep.lookup(np.array([1])).dtype == np.float32
    np.testing.assert_allclose(rep.lookup(np.array([1])), [[0.1, 0.2]], atol=1e-3)
    with pytest.raises(InvalidInputError):
        rep.upsert(np.array([1, 2]), np.zeros((2, 3), np.float32), 0)


def test_dense_pusher_interval_and_failures() -> None:
    from monolith_py.errors import UnavailableError
    from monolith_py.sync import DenseBoard, DensePusher

    clock = FakeClock()
    board = DenseBoard()
    model = torch.nn.Linear(2, 1)
    pusher = DensePusher(board, {"kind": "x"}, model, interval_s=5.0, clock=clock)
    assert pusher.maybe_push() and not pusher.maybe_push()
    clock.t = 5.0
    assert pusher.maybe_push() and board.latest()[0][1] == 2

    class Down:
        def put_dense(self, spec: object, tensors: object) -> None:
            raise UnavailableError("shard 0 is down")

    failing = DensePusher(Down(), {}, model, clock=clock)
    assert not failing.maybe_push() and failing.failures == 1
