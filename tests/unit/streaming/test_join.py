"""The joiner's policy on scripted timelines (pure logic, time passed in)."""

from __future__ import annotations

import numpy as np
import pytest

from monolith_py.errors import ConfigError, InvalidInputError
from streaming.columns import ExampleColumns, concat_columns
from streaming.join import JoinerConfig, JoinState, correct_logit


def impressions(reqs: list[int], t: int | list[int]) -> ExampleColumns:
    n = len(reqs)
    times = np.full(n, t, dtype=np.int64) if isinstance(t, int) else np.array(t, np.int64)
    return ExampleColumns(
        names=("ad", "user"), lengths=np.ones((2, n), np.int32),
        values=np.concatenate([np.array(reqs) * 10, np.array(reqs) * 10 + 1]).astype(np.int64),
        weights=None, dense=np.arange(n, dtype=np.float32).reshape(n, 1),
        labels=np.zeros(n, np.float32), timestamps=times,
        example_ids=np.array(reqs, dtype=np.int64))


def act(j: JoinState, reqs: list[int], t: int, y: float = 1.0) -> list[ExampleColumns]:
    n = len(reqs)
    return j.add_actions(np.array(reqs), np.full(n, y), np.full(n, t))


def labels_of(out: list[ExampleColumns]) -> dict[int, float]:
    got: dict[int, float] = {}
    for c in out:
        for r, y in zip(c.example_ids.tolist(), c.labels.tolist()):
            assert r not in got, f"request {r} emitted twice"
            got[r] = y
    return got


def test_scripted_timeline() -> None:
    """W = 60 s. Requests: 1 clicked in window, 2 never, 3 clicked late (after its window
    closed), 4 clicked twice, 5 clicked before its impression arrived, 6 clicked within
    the window but after the watermark passed other windows, 7 clicked out of window
    while still pending, 8 a duplicate impression of 1."""
    j = JoinState(JoinerConfig(window_s=60))
    emitted: list[ExampleColumns] = []
    emitted += act(j, [5], t=1010)  # early: impression 5 not seen yet
    emitted += j.add_impressions(impressions([1, 2, 3, 4, 5, 6, 7], t=1000))
    assert labels_of(emitted) == {5: 1.0}  # the early action matched on arrival
    emitted += act(j, [1], t=1030)
    emitted += act(j, [4], t=1040)
    emitted += act(j, [4], t=1041)  # duplicate
    emitted += act(j, [7], t=1100)  # after 7's window (1060) -> late, 7 stays pending
    emitted += j.advance(1059)
    emitted += act(j, [6], t=1059)
    assert labels_of(emitted) == {5: 1.0, 1: 1.0, 4: 1.0, 6: 1.0}
    emitted += j.advance(1060)  # windows of 2, 3 and 7 close
    emitted += act(j, [3], t=1070)  # late: 3 was already emitted as a negative
    emitted += j.add_impressions(impressions([1], t=1000))  # duplicate impression
    got = labels_of(emitted)
    assert got == {1: 1.0, 2: 0.0, 3: 0.0, 4: 1.0, 5: 1.0, 6: 1.0, 7: 0.0}
    c = j.counters
    assert (c["positives"], c["negatives"]) == (4, 3)
    assert c["duplicate_actions"] == 1 and c["late_actions"] == 2
    assert c["duplicate_impressions"] == 1 and c["early_actions"] == 1
    assert j.pending_impressions == 0 and j.held_examples == 0
    # the features travel with the label
    out = concat_columns(emitted)
    for r, v in zip(out.example_ids.tolist(), out.values[: len(out)].tolist()):
        assert v == r * 10


def test_orphan_actions_and_horizon() -> None:
    j = JoinState(JoinerConfig(window_s=10, horizon_s=20))
    act(j, [42], t=100)
    assert j.pending_actions == 1
    j.advance(121)  # 100 + H passed: the impression never came
    assert j.pending_actions == 0 and j.counters["orphan_actions"] == 1
    j.add_impressions(impressions([1], t=200))
    j.advance(210)
    assert j.stats()["remembered"] == 1
    j.advance(241)  # 200 + W + H passed: forget request 1 ...
    assert j.stats()["remembered"] == 0
    assert j.add_impressions(impressions([1], t=200)) == []  # ... and a replay of it is late
    assert j.counters["late_impressions"] == 1


def test_memory_is_bounded_and_ids_never_repeat() -> None:
    j = JoinState(JoinerConfig(window_s=1000, max_pending_examples=10, max_remembered=15))
    emitted: list[ExampleColumns] = []
    for k in range(10):
        emitted += j.add_impressions(impressions(list(range(k * 4, k * 4 + 4)), t=k))
        assert j.held_examples <= 10
    assert j.counters["evicted_impressions"] == 40 - j.pending_impressions
    assert len(j.stats()) and j.stats()["remembered"] <= 15
    # every evicted or forgotten request stays unemittable: re-send all of them
    for k in range(10):
        emitted += j.add_impressions(impressions(list(range(k * 4, k * 4 + 4)), t=k))
    emitted += j.advance(10_000)
    labels_of(emitted)  # asserts no request came out twice
    assert j.floor >= 0


def test_negative_down_sampling_is_deterministic() -> None:
    cfg = JoinerConfig(window_s=5, negative_rate=0.25, seed=3)
    runs = []
    for _ in range(2):
        j = JoinState(cfg)
        j.add_impressions(impressions(list(range(2000)), t=0))
        runs.append(sorted(labels_of(j.advance(5))))
    assert runs[0] == runs[1]
    assert 400 < len(runs[0]) < 600
    assert correct_logit(np.zeros(1), 0.25)[0] == pytest.approx(np.log(0.25))
    with pytest.raises(ConfigError):
        JoinerConfig(negative_rate=0)


def test_state_dict_round_trip_continues_identically() -> None:
    cfg = JoinerConfig(window_s=30)
    a = JoinState(cfg)
    a.add_impressions(impressions([1, 2, 3], t=[100, 105, 110]))
    act(a, [9], t=101)
    a.add_actions(np.array([2]), np.array([0.5]), np.array([120]))
    state = a.state_dict()
    b = JoinState(cfg)
    b.load_state_dict(state)
    # equal except that a restore compacts the chunks to their pending rows
    assert {**b.stats(), "held_examples": 0} == {**a.stats(), "held_examples": 0}
    assert b.held_examples == b.pending_impressions == 2 < a.held_examples
    tail = [(j, j.add_impressions(impressions([9, 4], t=102))) for j in (a, b)]
    tail = [(j, out + act(j, [3], t=139) + j.advance(140)) for j, out in tail]
    assert labels_of(tail[0][1]) == labels_of(tail[1][1]) == {9: 1.0, 3: 1.0, 1: 0.0,
                                                             4: 0.0}
    with pytest.raises(InvalidInputError):
        b.load_state_dict({"pending": [np.zeros(3, np.uint8)]})
