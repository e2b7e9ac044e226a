"""The synthetic stream, the pacing of the replayer, and the streaming docstrings."""

from __future__ import annotations

import doctest
import importlib

import numpy as np
import pytest

from monolith_py.errors import ConfigError
from streaming.generate import AUCTracker, SyntheticConfig, SyntheticCTR
from streaming.produce import ActionScheduler, pacing_delay


def _best_auc(cfg: SyntheticConfig, batches: int = 20) -> float:
    gen, auc = SyntheticCTR(cfg), AUCTracker()
    for i in range(batches):
        cols, prob = gen.batch(i, 1000)
        auc.update(prob, cols.labels)
    return auc.auc()


def test_batches_are_reproducible_unique_and_zipf() -> None:
    gen = SyntheticCTR(SyntheticConfig(cardinalities=(10_000, 50), num_dense=3, seed=5))
    a, pa = gen.batch(7, 2000)
    b, pb = gen.batch(7, 2000)
    np.testing.assert_array_equal(a.values, b.values)
    np.testing.assert_array_equal(pa, pb)
    assert a.example_ids.tolist() == list(range(14_000, 16_000))
    other, _ = gen.batch(8, 2000)
    assert not set(a.example_ids.tolist()) & set(other.example_ids.tolist())
    ids, counts = np.unique(a.values[:2000], return_counts=True)
    assert counts.max() > 50 * np.median(counts)  # a few ids are very popular
    assert len(ids) > 300  # and there is a long tail
    assert (a.values >= 0).all()
    assert SyntheticCTR(SyntheticConfig(seed=6)).batch(7, 10)[0].values.tolist() != \
        SyntheticCTR(SyntheticConfig(seed=5)).batch(7, 10)[0].values.tolist()


def test_best_auc_is_known_and_follows_the_signal() -> None:
    weak = _best_auc(SyntheticConfig(cardinalities=(1000, 100), signal=0.5))
    strong = _best_auc(SyntheticConfig(cardinalities=(1000, 100), signal=2.5))
    assert 0.55 < weak < strong < 0.99
    # the tracker agrees with the exact pairwise AUC
    rng = np.random.default_rng(0)
    s, y = rng.random(500), (rng.random(500) < 0.3).astype(np.float32)
    pos, neg = s[y > 0], s[y == 0]
    exact = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) \
        / (len(pos) * len(neg))
    tr = AUCTracker(bins=1 << 20)
    tr.update(s, y)
    assert tr.auc() == pytest.approx(exact, abs=1e-3)


def test_drift_rotates_the_hidden_weights() -> None:
    gen = SyntheticCTR(SyntheticConfig(cardinalities=(100,), drift_period_s=1000))
    ids = np.arange(1, 200, dtype=np.int64)
    t0 = np.full(ids.shape, gen.config.start_time)
    w0 = gen.weights(0, ids, t0)
    np.testing.assert_allclose(gen.weights(0, ids, t0 + 1000), w0, atol=1e-9)  # full turn
    quarter = gen.weights(0, ids, t0 + 250)
    assert abs(np.corrcoef(w0, quarter)[0, 1]) < 0.3  # a quarter turn: new weights
    still = SyntheticCTR(SyntheticConfig(cardinalities=(100,)))
    np.testing.assert_array_equal(still.weights(0, ids, t0), still.weights(0, ids, t0 + 250))


def test_config_rejects_nonsense() -> None:
    for bad in ({"cardinalities": ()}, {"zipf_a": 0}, {"base_ctr": 1.0},
                {"events_per_s": 0}, {"dense_share": 2}):
        with pytest.raises(ConfigError):
            SyntheticConfig(**bad)


def test_pacing_and_action_scheduler() -> None:
    assert pacing_delay(100, 100, started=5.0, now=5.0, speedup=2.0) == 0.0
    assert pacing_delay(120, 100, started=5.0, now=6.0, speedup=2.0) == pytest.approx(9.0)
    assert pacing_delay(120, 100, started=5.0, now=60.0, speedup=2.0) == 0.0  # behind
    assert pacing_delay(10**9, 0, started=0.0, now=0.0, speedup=0) == 0.0  # no pacing
    s = ActionScheduler()
    s.add(np.array([1, 2, 3]), np.array([30, 10, 20]))
    ids, times = s.due(25)
    assert ids.tolist() == [2, 3] and times.tolist() == [10, 20] and len(s) == 1


@pytest.mark.parametrize("name", ["codec", "columns", "generate", "join", "produce",
                                  "topics"])
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(f"streaming.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
