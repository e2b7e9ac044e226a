"""PSShard: same results as a plain EmbeddingTable on the keys it owns, validation before
any change, foreign keys rejected, state round trip."""

from __future__ import annotations

import numpy as np
import pytest

from monolith_py.errors import InvalidInputError, InvalidTypeError
from monolith_py.ps import PSShard, shard_of
from monolith_py.table import EmbeddingTable, OptimizerConfig, TableConfig

CFGS = [
    TableConfig("user", dim=4, optimizer=OptimizerConfig("adagrad", lr=0.1), ttl_seconds=100),
    TableConfig("item", dim=8, optimizer=OptimizerConfig("rowwise_adagrad", lr=0.1),
                admit_threshold=2),
]


def owned(keys: np.ndarray, shard: int, n: int) -> np.ndarray:
    return keys[shard_of(keys, n) == shard]


def test_pull_push_match_a_plain_table() -> None:
    shard = PSShard(1, 3, CFGS)
    ref = {c.name: EmbeddingTable(c) for c in CFGS}
    rng = np.random.default_rng(0)
    for step in range(6):
        batch = {c.name: owned(np.unique(rng.integers(0, 500, 120)), 1, 3) for c in CFGS}
        rows = shard.pull_many(batch, train=True)
        for name, k in batch.items():
            np.testing.assert_array_equal(rows[name], ref[name].lookup(k, train=True).numpy())
        grads = {name: (k, rng.standard_normal((k.shape[0], ref[name].dim)).astype(np.float32))
                 for name, k in batch.items()}
        assert shard.push_many(grads, now=10 + step) > 0
        for name, (k, g) in grads.items():
            ref[name].apply_gradients(k, g, 10 + step)
    for name, t in ref.items():
        mine, theirs = shard.tables[name].state_dict(), t.state_dict()
        np.testing.assert_array_equal(mine["keys"], theirs["keys"])
        np.testing.assert_array_equal(mine["weights"], theirs["weights"])
    assert shard.stats()["user"]["size"] == len(ref["user"]) and shard.stats()["user"]["shard"] == 1
    # single-table variants and eviction by event time
    k = owned(np.arange(50, dtype=np.int64), 1, 3)
    assert shard.pull("user", k, train=False).shape == (k.shape[0], 4)
    assert shard.evict_expired(10_000)["user"] == len(ref["user"])


def test_foreign_keys_are_rejected_and_nothing_changes() -> None:
    shard = PSShard(0, 2, CFGS)
    keys = np.arange(40, dtype=np.int64)
    foreign = keys[shard_of(keys, 2) == 1]
    mine = keys[shard_of(keys, 2) == 0]
    with pytest.raises(InvalidInputError, match="belongs to shard 1"):
        shard.pull_many({"user": mine, "item": np.concatenate([mine, foreign[:1]])}, train=True)
    assert all(s["size"] == 0 for s in shard.stats().values())
    g = np.ones((mine.shape[0], 4), np.float32)
    with pytest.raises(InvalidInputError, match="belongs to shard 1"):
        shard.push_many({"user": (mine, g),
                         "item": (foreign, np.ones((len(foreign), 8), np.float32))}, 5)
    assert shard.stats()["user"]["size"] == 0


K1, G4 = np.zeros(1, np.int64), np.zeros((1, 4), np.float32)


@pytest.mark.parametrize("bad, err, match", [
    ({"nope": (K1, G4)}, InvalidInputError, "unknown table"),
    ({"user": (np.zeros(1, np.float64), np.zeros((1, 4), np.float32))}, InvalidTypeError, "int64"),
    ({"user": (np.zeros((1, 1), np.int64), G4)}, InvalidInputError, "1-D"),
    ({"user": (np.zeros(1, np.int64), np.zeros((1, 5), np.float32))}, InvalidInputError, "shape"),
    ({"user": (np.zeros(1, np.int64), np.zeros((1, 4), np.float64))}, InvalidTypeError, "float32"),
    ({"user": (K1, np.full((1, 4), np.nan, np.float32))}, InvalidInputError, "NaN"),
    ({"user": [np.zeros(1, np.int64)]}, InvalidInputError, "expected"),
])
def test_push_validates_everything_first(bad: dict, err: type, match: str) -> None:
    shard = PSShard(0, 1, CFGS)
    good = (np.array([7], np.int64), np.ones((1, 8), np.float32))
    with pytest.raises(err, match=match):
        shard.push_many({"item": good, **bad}, now=1)
    assert shard.stats()["item"]["size"] == 0 and shard.tables["item"].version == 0


def test_construction_and_read_only_tables() -> None:
    with pytest.raises(InvalidInputError):
        PSShard(2, 2, CFGS)
    with pytest.raises(InvalidInputError):
        PSShard(0, 1, [])
    with pytest.raises(InvalidInputError):
        PSShard(0, 1, [CFGS[0], CFGS[0]])
    with pytest.raises(InvalidTypeError):
        PSShard(0, 1, ["user"])  # type: ignore[list-item]
    with pytest.raises(InvalidTypeError):
        PSShard(0, 1, CFGS).push_many({}, now=1.5)  # type: ignore[arg-type]
    shard = PSShard(0, 1, CFGS)
    with pytest.raises(TypeError):
        shard.tables["user"] = EmbeddingTable(CFGS[0])  # type: ignore[index]
    info = shard.info()
    assert info["shard_id"] == 0 and info["tables"]["item"]["dim"] == 8
    assert info["tables"]["item"]["config"]["optimizer"]["kind"] == "rowwise_adagrad"
    # ready tables: must hold only owned keys
    t = EmbeddingTable(CFGS[0])
    t.lookup(np.arange(10, dtype=np.int64), train=True)
    with pytest.raises(InvalidInputError, match="belongs to shard"):
        PSShard(0, 2, {"user": t})
    assert PSShard(0, 1, {"user": t}).stats()["user"]["size"] == 10


def test_state_round_trip_and_foreign_state_rejected() -> None:
    a = PSShard(0, 2, CFGS)
    keys = owned(np.arange(300, dtype=np.int64), 0, 2)
    a.pull_many({"user": keys, "item": keys}, train=True)
    a.push_many({"user": (keys, np.ones((len(keys), 4), np.float32))}, now=3)
    state = a.state_dict()
    b = PSShard(0, 2, CFGS)
    b.load_state_dict(state)
    np.testing.assert_array_equal(b.pull("user", keys, False), a.pull("user", keys, False))
    assert b.stats()["item"]["size"] == a.stats()["item"]["size"]
    c = PSShard(1, 2, CFGS)
    with pytest.raises(InvalidInputError, match="belongs to shard 0"):
        c.load_state_dict(state)
    assert c.stats()["user"]["size"] == 0
    with pytest.raises(InvalidInputError):
        b.load_state_dict({"format": "other"})
    with pytest.raises(InvalidInputError, match="do not match"):
        b.load_state_dict({**state, "tables": {"user": state["tables"]["user"]}})
