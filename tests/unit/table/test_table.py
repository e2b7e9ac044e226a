"""EmbeddingTable: admission, expiry, state round trip, change tracking, determinism, bad input."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from monolith_py.errors import ConfigError, InvalidInputError, InvalidTypeError
from monolith_py.table import (
    CountMinSketch,
    EmbeddingTable,
    OptimizerConfig,
    TableConfig,
    expired,
    initial_rows,
)


def table(**kw: Any) -> EmbeddingTable:
    kw.setdefault("optimizer", OptimizerConfig("sgd", lr=0.1))
    return EmbeddingTable(TableConfig("t", dim=kw.pop("dim", 4), **kw))


def k(*xs: int) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.int64)


def assert_state_equal(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if isinstance(a[name], np.ndarray):
            assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
            assert a[name].tobytes() == b[name].tobytes(), name  # bit-exact
        else:
            assert a[name] == b[name], name


# -- admission ------------------------------------------------------------------------------


def test_threshold_one_admits_on_first_sight() -> None:
    t = table()
    rows = t.lookup(k(1, 2), train=True)
    assert len(t) == 2 and (rows != 0).any()
    assert t.stats()["filter_memory_bytes"] == 0


def test_eval_lookup_changes_nothing() -> None:
    t = table(admit_threshold=2)
    for _ in range(3):
        assert (t.lookup(k(1, 2)) == 0).all()
    assert len(t) == 0 and t.version == 0
    assert t.state_dict()["filter.counters"].sum() == 0


def test_admission_counts_sightings_once_per_step() -> None:
    t = table(admit_threshold=3, filter_memory_bytes=4096)
    g = torch.ones(2, 4)
    # step 1: lookup counts 7 and 8; apply must not count them again
    assert (t.lookup(k(7, 8), train=True) == 0).all()
    t.apply_gradients(k(7, 8), g, now=10)
    assert len(t) == 0 and t.stats()["filtered"] == 2
    # step 2: apply alone counts the sighting (no train lookup this step)
    t.apply_gradients(k(7, 8), g, now=11)
    assert len(t) == 0
    # step 3: third sighting -> admitted at lookup, forward sees the initialized row
    rows = t.lookup(k(7, 7, 8), train=True)
    assert len(t) == 2 and (rows != 0).any() and torch.equal(rows[0], rows[1])
    t.apply_gradients(k(7, 8), g, now=12)
    assert t.stats()["admitted"] == 2 and t.stats()["filtered"] == 4
    # the gradient of step 3 was applied (sgd, lr 0.1)
    assert torch.allclose(t.lookup(k(7)), rows[:1] - 0.1)


def test_apply_gradients_admits_without_lookup() -> None:
    t = table(admit_threshold=2)
    t.apply_gradients(k(5), torch.ones(1, 4), now=1)
    assert len(t) == 0
    t.apply_gradients(k(5), torch.ones(1, 4), now=2)
    assert len(t) == 1
    start = initial_rows([5], dim=4, scale=0.5)
    assert torch.allclose(t.lookup(k(5)), torch.from_numpy(start) - 0.1)


def test_filter_memory_is_bounded_and_reported() -> None:
    t = table(admit_threshold=2, filter_memory_bytes=1000)
    t.lookup(torch.arange(100_000), train=True)
    assert t.stats()["filter_memory_bytes"] == 1000
    assert t.state_dict()["filter.counters"].nbytes == 1000


def test_sketch_never_undercounts_and_merges_by_addition() -> None:
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 5000, 20_000)
    a, b = CountMinSketch(2048), CountMinSketch(2048)
    a.add(keys[:10_000])
    b.add(keys[10_000:])
    a.merge(b)
    uniq, counts = np.unique(keys, return_counts=True)
    assert (a.estimate(uniq) >= np.minimum(counts, 255)).all()
    with pytest.raises(InvalidInputError, match="merge"):
        a.merge(CountMinSketch(1024))


# -- expiry ---------------------------------------------------------------------------------


def test_expired_policy_is_pure() -> None:
    assert expired(np.array([0, 10, 11]), now=20, ttl=10).tolist() == [True, False, False]
    assert not expired(np.array([0]), now=10**9, ttl=None).any()


def test_evict_expired_uses_event_time_and_reuses_rows() -> None:
    t = table(ttl_seconds=100, initial_capacity=4)
    t.apply_gradients(k(1, 2, 3), torch.ones(3, 4), now=1000)
    t.apply_gradients(k(3), torch.ones(1, 4), now=1080)
    assert t.evict_expired(now=1100).tolist() == []
    assert t.evict_expired(now=1101).tolist() == [1, 2]
    assert len(t) == 1 and t.stats()["evicted"] == 2
    assert (t.lookup(k(1, 2)) == 0).all()
    cap = t.stats()["capacity"]
    t.apply_gradients(k(8, 9), torch.ones(2, 4), now=1102)  # reuse the freed rows
    assert t.stats()["capacity"] == cap
    assert t.evict_expired(now=1181).tolist() == [3]


def test_evict_without_ttl_is_a_noop() -> None:
    t = table()
    t.apply_gradients(k(1), torch.ones(1, 4), now=1)
    assert t.evict_expired(10**12).numel() == 0 and len(t) == 1


# -- determinism ----------------------------------------------------------------------------


@pytest.mark.parametrize("init", ["uniform", "normal", "zeros"])
def test_initial_row_depends_only_on_seed_and_key(init: str) -> None:
    a = table(initializer=init, seed=9, initial_capacity=2)
    b = table(initializer=init, seed=9, initial_capacity=64)
    a.lookup(torch.arange(100), train=True)
    rows_a = a.lookup(k(42, 7))
    rows_b = b.lookup(k(7, 42), train=True)
    assert torch.equal(rows_a, rows_b.flip(0))
    if init != "zeros":
        other = table(initializer=init, seed=10).lookup(k(42), train=True)
        assert not torch.equal(other, rows_a[:1])


def test_initializer_distribution() -> None:
    u = initial_rows(np.arange(20_000), dim=8, initializer="uniform", scale=0.5)
    assert u.min() >= -0.5 and u.max() < 0.5 and abs(u.mean()) < 0.01
    n = initial_rows(np.arange(20_000), dim=8, initializer="normal", scale=2.0)
    assert abs(n.std() - 2.0) < 0.05 and abs(n.mean()) < 0.05


# -- state ----------------------------------------------------------------------------------


def _trained(kind: str = "adam", **kw: Any) -> EmbeddingTable:
    t = table(optimizer=OptimizerConfig(kind, lr=0.05), admit_threshold=2, ttl_seconds=50, **kw)
    rng = np.random.default_rng(0)
    for step in range(6):
        keys = torch.from_numpy(rng.integers(-50, 50, 64))
        t.lookup(keys, train=True)
        t.apply_gradients(keys, torch.randn(64, 4), now=100 + 20 * step)
        t.evict_expired(100 + 20 * step)
    t.erase(k(3, 4))
    return t


@pytest.mark.parametrize("kind", ["sgd", "adagrad", "rowwise_adagrad", "adam", "ftrl"])
def test_state_round_trip_is_exact(kind: str) -> None:
    t = _trained(kind)
    sd = t.state_dict()
    assert (np.diff(sd["keys"]) > 0).all()  # key-sorted, compact
    assert sd["weights"].shape == (len(t), 4)
    u = EmbeddingTable(t.config)
    u.load_state_dict(sd)
    assert_state_equal(u.state_dict(), sd)
    keys = torch.arange(-60, 60)
    assert torch.equal(u.lookup(keys), t.lookup(keys))
    # both continue identically
    for x in (t, u):
        x.lookup(keys, train=True)
        x.apply_gradients(keys, torch.ones(120, 4), now=300)
    assert_state_equal(u.state_dict(), t.state_dict())


def test_state_holds_only_plain_values() -> None:
    for value in _trained().state_dict().values():
        assert isinstance(value, (np.ndarray, int, float, str))


def test_state_is_independent_of_capacity() -> None:
    a = _trained(initial_capacity=1)
    b = EmbeddingTable(TableConfig("t", dim=4, optimizer=a.config.optimizer, admit_threshold=2,
                                   ttl_seconds=50, initial_capacity=4096))
    b.load_state_dict(a.state_dict())
    assert_state_equal(b.state_dict(), a.state_dict())


def _with(a: np.ndarray, at: tuple[int, ...], value: Any) -> np.ndarray:
    out = a.copy()
    out[at] = value
    return out


def test_bad_state_is_rejected_and_table_unchanged() -> None:
    t = _trained()
    before = t.state_dict()
    good = t.state_dict()
    cases = {
        "dim": {**good, "dim": 5},
        "optimizer": {**good, "optimizer": "sgd"},
        "keys": {**good, "keys": good["keys"][::-1].copy()},
        "weights": {**good, "weights": good["weights"][:-1]},
        "nan": {**good, "weights": np.full_like(good["weights"], np.nan)},
        "one nan": {**good, "weights": _with(good["weights"], (len(good["keys"]) // 2, 1), np.nan)},
        "inf in a slot": {**good, "slot.exp_avg": _with(good["slot.exp_avg"], (-1, -1), np.inf)},
        "strided inf": {**good, "weights": np.asfortranarray(
            _with(good["weights"], (0, 0), -np.inf))},
        "repeated key": {**good, "keys": _with(good["keys"], (1,), good["keys"][0])},
        "dtype": {**good, "last_update": good["last_update"].astype(np.float64)},
        "missing": {name: v for name, v in good.items() if name != "slot.exp_avg"},
        "filter": {**good, "filter.counters": np.zeros(3, np.uint8)},
        "format": {**good, "format": "pickle"},
    }
    for name, bad in cases.items():
        with pytest.raises(InvalidInputError):
            t.load_state_dict(bad)
        assert_state_equal(t.state_dict(), before), name


# -- change tracking ------------------------------------------------------------------------


def test_changes_since_is_lossless() -> None:
    t = table(ttl_seconds=10)
    v0 = t.version
    t.apply_gradients(k(1, 2, 3), torch.ones(3, 4), now=100)
    v1 = t.version
    assert v1 == v0 + 1
    d = t.changes_since(v0)
    assert d.keys.tolist() == [1, 2, 3] and d.version == v1 and d.deleted_keys.size == 0
    assert np.array_equal(d.rows, t.lookup(k(1, 2, 3)).numpy())
    t.apply_gradients(k(2), torch.ones(1, 4), now=105)
    t.evict_expired(now=111)  # evicts 1 and 3
    t.erase(k(2))
    t.apply_gradients(k(3), torch.ones(1, 4), now=112)  # 3 comes back
    d = t.changes_since(v1)
    assert d.keys.tolist() == [3] and d.deleted_keys.tolist() == [1, 2]
    assert t.changes_since(t.version).keys.size == 0
    full = t.changes_since(0, include_state=True)
    assert full.last_update.tolist() == [112] and full.update_count.tolist() == [1]
    # trimming drops the deletion log but never rows
    t.trim_changes(t.version)
    assert t.stats()["deletion_log"] == 0
    assert t.changes_since(v1).keys.tolist() == [3]


def test_version_counts_mutating_batches_only() -> None:
    t = table(admit_threshold=5)
    t.lookup(k(1), train=True)
    t.lookup(k(1))
    t.apply_gradients(k(1), torch.ones(1, 4), now=1)
    assert t.version == 0  # filtered only: nothing written
    t.load_rows(k(9), torch.ones(1, 4))
    assert t.version == 1 and torch.equal(t.lookup(k(9)), torch.ones(1, 4))


def test_load_rows_and_erase() -> None:
    t = table(optimizer=OptimizerConfig("adagrad"))
    t.load_rows(k(1, 2), torch.zeros(2, 4), slots={"sum": torch.ones(2, 4)},
                meta={"last_update": k(5, 6), "update_count": k(1, 2)})
    sd = t.state_dict()
    assert sd["slot.sum"].tolist() == [[1.0] * 4] * 2 and sd["last_update"].tolist() == [5, 6]
    assert t.erase(k(1, 1, 3)).tolist() == [True, False, False]
    assert len(t) == 1 and t.stats()["erased"] == 1
    with pytest.raises(InvalidInputError, match="unknown slot"):
        t.load_rows(k(4), torch.zeros(1, 4), slots={"exp_avg": torch.zeros(1, 4)})
    with pytest.raises(InvalidInputError, match="unique"):
        t.load_rows(k(4, 4), torch.zeros(2, 4))


# -- bad input ------------------------------------------------------------------------------


def test_bad_input_raises_and_leaves_table_unchanged() -> None:
    t = _trained()
    before = t.state_dict()
    bad_calls = [
        (InvalidTypeError, lambda: t.lookup(torch.tensor([1.0, 2.0]), train=True)),
        (InvalidInputError, lambda: t.lookup(torch.zeros(2, 2, dtype=torch.int64), train=True)),
        (InvalidInputError, lambda: t.lookup(k(-(2**63)), train=True)),
        (InvalidInputError, lambda: t.apply_gradients(k(1, 2), torch.ones(3, 4), now=1)),
        (InvalidInputError, lambda: t.apply_gradients(k(1, 2), torch.ones(2, 5), now=1)),
        (InvalidInputError, lambda: t.apply_gradients(k(1, 99), torch.tensor(
            [[1.0, 0, 0, 0], [float("nan"), 0, 0, 0]]), now=1)),
        (InvalidInputError, lambda: t.apply_gradients(k(1), torch.full((1, 4), float("inf")),
                                                      now=1)),
        (InvalidTypeError, lambda: t.apply_gradients(k(1), torch.ones(1, 4, dtype=torch.int64),
                                                     now=1)),
        (InvalidTypeError, lambda: t.apply_gradients(k(1), torch.ones(1, 4), now=1.5)),
        (InvalidTypeError, lambda: t.apply_gradients(k(1), torch.ones(1, 4), now="1")),
        (InvalidTypeError, lambda: t.evict_expired(now=None)),
        (InvalidTypeError, lambda: t.lookup("1,2")),
    ]
    for err, call in bad_calls:
        with pytest.raises(err):
            call()
        assert_state_equal(t.state_dict(), before)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"dim": 0}, "dim"),
        ({"admit_threshold": 0}, "admit_threshold"),
        ({"admit_threshold": 300}, "admit_threshold"),
        ({"ttl_seconds": -1}, "ttl_seconds"),
        ({"initializer": "xavier"}, "initializer"),
        ({"pooling": "max"}, "pooling"),
        ({"max_load_factor": 0.99}, "max_load_factor"),
        ({"filter_memory_bytes": 1}, "filter_memory_bytes"),
        ({"feature_names": "abc"}, "feature_names"),
        ({"init_scale": float("nan")}, "init_scale"),
        ({"optimizer": "adam"}, "optimizer"),
    ],
)
def test_invalid_table_config(kw: dict[str, Any], match: str) -> None:
    kw.setdefault("dim", 4)
    with pytest.raises(ConfigError, match=match):
        TableConfig("t", **kw)


@pytest.mark.parametrize(
    "kw", [{"kind": "rmsprop"}, {"lr": 0.0}, {"lr": float("inf")}, {"beta1": 1.0}, {"l1": -1.0},
           {"eps": 0.0}]
)
def test_invalid_optimizer_config(kw: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        OptimizerConfig(**kw)


def test_configs_are_frozen() -> None:
    cfg = TableConfig("t", dim=4)
    with pytest.raises(AttributeError):
        cfg.dim = 8  # type: ignore[misc]
    assert cfg.feature_names == ("t",)


def test_lookup_device_and_dtype() -> None:
    t = table(dim=3)
    out = t.lookup(np.array([1, 2], dtype=np.int32), train=True)
    assert out.dtype == torch.float32 and out.shape == (2, 3) and out.device.type == "cpu"
    assert t.lookup([]).shape == (0, 3)


def test_two_shards_merge_into_the_state_of_one_table() -> None:
    """Deterministic init + per-row optimizers: sharding does not change any row, and
    shard states merge (concatenate, sort, add sketches) into one table's state."""
    from monolith_py.table import merge_counters

    cfg = dict(optimizer=OptimizerConfig("adam", lr=0.05), admit_threshold=2,
               filter_memory_bytes=4096)
    whole, shards = table(**cfg), [table(**cfg), table(**cfg)]
    rng = np.random.default_rng(3)
    for step in range(5):
        keys = np.unique(rng.integers(-40, 40, 50))
        grads = rng.standard_normal((keys.shape[0], 4)).astype(np.float32)
        whole.lookup(keys, train=True)
        whole.apply_gradients(keys, grads, now=step)
        for i, shard in enumerate(shards):
            mine = (keys % 2) == i
            shard.lookup(keys[mine], train=True)
            shard.apply_gradients(keys[mine], grads[mine], now=step)
    a, b = (s.state_dict() for s in shards)
    w = whole.state_dict()
    order = np.argsort(np.concatenate([a["keys"], b["keys"]]))
    for name in ("keys", "weights", "slot.exp_avg", "slot.exp_avg_sq", "last_update",
                 "update_count"):
        merged = np.concatenate([a[name], b[name]])[order]
        assert merged.tobytes() == w[name].tobytes(), name
    counters = merge_counters(a["filter.counters"], b["filter.counters"])
    sk = CountMinSketch(4096)
    sk.load_state_dict({"counters": counters})
    whole_sk = CountMinSketch(4096)
    whole_sk.load_state_dict({"counters": w["filter.counters"]})
    ids = np.arange(-40, 40)
    # each key's sightings live in one shard: few keys in a roomy sketch -> same counts
    assert sk.estimate(ids).tolist() == whole_sk.estimate(ids).tolist()
    assert sk.estimate(ids).max() == 2


def test_expiry_sees_rows_loaded_with_old_times() -> None:
    t = table(ttl_seconds=10)
    t.apply_gradients(k(1), torch.ones(1, 4), now=100)
    assert t.evict_expired(105).numel() == 0  # fast path: nothing can be expired
    t.load_rows(k(2), torch.ones(1, 4), meta={"last_update": k(50)})
    assert t.evict_expired(105).tolist() == [2]
    u = table(ttl_seconds=10)
    t.load_rows(k(3), torch.ones(1, 4), meta={"last_update": k(60)})
    u.load_state_dict(t.state_dict())
    assert u.evict_expired(105).tolist() == [3] and u.evict_expired(111).tolist() == [1]


# -- the train lookup's rows reused by the step's apply_gradients -------------------------

def _rows_by_key(t: EmbeddingTable) -> dict[int, list[float]]:
    sd = t.state_dict()
    return {int(key): row.tolist() for key, row in zip(sd["keys"], sd["weights"])}


@pytest.mark.parametrize("between", ["nothing", "mutate_keys", "other_keys", "evict", "load"])
def test_apply_after_lookup_updates_the_right_rows(between: str) -> None:
    """apply_gradients may reuse the rows of the preceding train lookup, but only when the
    keys and the table are unchanged: the result must equal a table that probes again."""
    ours, ref = table(ttl_seconds=100), table(ttl_seconds=100)
    for t in (ours, ref):
        t.apply_gradients(k(1, 2, 3), torch.ones(3, 4), now=1000)
    buf = k(1, 2, 3, 4)
    ours.lookup(buf, train=True)
    ref.lookup(buf.clone(), train=True)
    if between == "mutate_keys":  # the caller reuses its key buffer in place
        buf[:] = k(5, 6, 7, 8)
        ref.lookup(buf.clone(), train=True)
    elif between == "other_keys":
        buf = k(4, 3, 2, 1)
    elif between == "evict":
        for t in (ours, ref):
            t.apply_gradients(k(4), torch.ones(1, 4), now=1200)
            t.evict_expired(now=1150)  # 1, 2, 3 (last update 1000) go
    elif between == "load":
        other = table(ttl_seconds=100)
        other.apply_gradients(k(9, 8, 7, 6), torch.full((4, 4), 3.0), now=1000)
        other.lookup(k(9, 8, 7, 6, 5), train=True)  # same number of versions as ``ours``
        for t in (ours, ref):
            t.load_state_dict(other.state_dict())
    grads = torch.arange(16, dtype=torch.float32).reshape(4, 4)
    ours.apply_gradients(buf, grads, now=1300)
    ref._looked_up = None  # the reference always probes the index
    ref.apply_gradients(buf.clone(), grads, now=1300)
    assert _rows_by_key(ours) == _rows_by_key(ref)
