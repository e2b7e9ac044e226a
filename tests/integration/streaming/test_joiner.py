"""The joiner over the real local broker: scripted labels, and exactly-once output
across a crash and a restore from an older snapshot."""

from __future__ import annotations

import numpy as np
import pytest

from streaming.columns import ExampleColumns
from streaming.join import JoinerConfig
from streaming.joiner import Joiner, load_joiner_state, save_joiner_state
from streaming.sink import KafkaSink
from streaming.source import KafkaExampleSource, SourceOptions
from streaming.testing import unique_topic
from streaming.topics import ensure_topic

pytestmark = pytest.mark.integration

FAST = SourceOptions(poll_timeout_s=0.1, topic_wait_s=20)


def impressions(reqs: list[int], times: list[int]) -> ExampleColumns:
    n = len(reqs)
    r = np.array(reqs, dtype=np.int64)
    return ExampleColumns(("ad", "user"), np.ones((2, n), np.int32),
                          np.concatenate([r * 10, r * 10 + 1]), None,
                          np.ones((n, 1), np.float32), np.zeros(n, np.float32),
                          np.array(times, np.int64), r)


def actions(reqs: list[int], times: list[int], labels: list[float] | None = None
            ) -> ExampleColumns:
    n = len(reqs)
    return ExampleColumns((), np.zeros((0, n), np.int32), np.zeros(0, np.int64), None,
                          np.zeros((n, 0), np.float32),
                          np.array(labels if labels is not None else [1.0] * n, np.float32),
                          np.array(times, np.int64), np.array(reqs, np.int64))


def read_output(bs: str, topic: str) -> dict[int, float]:
    got: dict[int, float] = {}
    with KafkaExampleSource(bs, topic, end_of_stream=True, batch_size=1 << 16,
                            options=FAST) as src:
        for cols in src.iter_columns():
            for r, y in zip(cols.example_ids.tolist(), cols.labels.tolist()):
                assert r not in got, f"request {r} was emitted twice"
                got[r] = y
            # features came through the join
            assert cols.names == ("ad", "user")
    return got


def make_topics(bs: str, partitions: int = 1) -> tuple[str, str, str]:
    names = unique_topic("imp"), unique_topic("act"), unique_topic("out")
    for name in names:
        ensure_topic(bs, name, partitions)
    return names


def test_joiner_labels_a_scripted_timeline(kafka_broker) -> None:
    bs = kafka_broker.bootstrap_servers
    imp, act, out = make_topics(bs)
    with KafkaSink(bs, act) as s:
        s.send_columns(actions([5], [1005]))  # may well be read before its impression
        s.send_columns(actions([1, 4, 4, 3], [1030, 1040, 1045, 1070]))
        s.send_columns(actions([6], [1050], [0.5]))
        s.flush()
    with KafkaSink(bs, imp) as s:
        s.send_columns(impressions([1, 2, 3, 4, 5, 6], [1000] * 6))
        s.send_columns(impressions([7], [2000]))
        s.flush()
    joiner = Joiner(bs, imp, act, out, config=JoinerConfig(window_s=60), options=FAST)
    try:
        stats = joiner.run(until_caught_up=True, drain=True, max_seconds=60)
    finally:
        joiner.close()
    assert read_output(bs, out) == {1: 1.0, 2: 0.0, 3: 0.0, 4: 1.0, 5: 1.0, 6: 0.5, 7: 0.0}
    assert stats["late_actions"] == 1 and stats["duplicate_actions"] == 1
    assert stats["positives"] == 4 and stats["negatives"] == 3
    assert stats["pending_impressions"] == 0


def test_restored_joiner_never_emits_a_request_twice(kafka_broker) -> None:
    bs = kafka_broker.bootstrap_servers
    imp, act, out = make_topics(bs, partitions=2)
    rng = np.random.default_rng(7)
    n, window = 1200, 50
    reqs = np.arange(1, n + 1)
    t_imp = 10_000 + reqs // 4  # 4 impressions per second
    delay = rng.integers(1, 2 * window, size=n)
    clicked = rng.random(n) < 0.3
    truth = {int(r): float(c and d <= window) for r, c, d in zip(reqs, clicked, delay)}
    with KafkaSink(bs, imp) as si, KafkaSink(bs, act) as sa:
        for p in (0, 1):  # request r lives in partition r % 2 of both topics
            mine = reqs[reqs % 2 == p]
            for chunk in np.array_split(mine, 30):
                si.send_columns(impressions(chunk.tolist(), t_imp[chunk - 1].tolist()),
                                partition=p)
            c = mine[clicked[mine - 1]]
            order = np.argsort(t_imp[c - 1] + delay[c - 1], kind="stable")
            c = c[order]
            for chunk in np.array_split(c, 20):
                sa.send_columns(actions(chunk.tolist(),
                                        (t_imp[chunk - 1] + delay[chunk - 1]).tolist()),
                                partition=p)
        si.flush()
        sa.flush()
    opts = SourceOptions(poll_timeout_s=0.1, topic_wait_s=20, max_poll_records=4)
    cfg = JoinerConfig(window_s=window)
    first = Joiner(bs, imp, act, out, config=cfg, options=opts)
    while first.counters["messages"] < 40:
        first.poll_once()
    snapshot = load_joiner_state(save_joiner_state(first.state_dict()))  # via the file form
    emitted_at_snapshot = first.counters["emitted"]
    while first.counters["messages"] < 70:  # keeps writing after the snapshot ...
        first.poll_once()
    assert first.counters["emitted"] > emitted_at_snapshot
    first.close()  # ... and then "crashes"
    second = Joiner(bs, imp, act, out, config=cfg, options=opts)
    second.load_state_dict(snapshot)
    assert second.counters["restored_emitted"] == (
        first.counters["emitted"] - emitted_at_snapshot)
    second.run(until_caught_up=True, drain=True, max_seconds=90)
    second.close()
    got = read_output(bs, out)  # asserts every request at most once
    assert got == truth  # ... and every request exactly once, with its true label


def _poll_until_read(joiner: Joiner, messages: int) -> None:
    import time

    deadline = time.monotonic() + 60
    while joiner.counters["messages"] < messages:
        assert time.monotonic() < deadline, f"joiner read {joiner.counters['messages']} messages"
        joiner.poll_once(0.2)


@pytest.mark.parametrize("idle_timeout_s, late", [(5.0, 0), (0.0, 1)])
def test_caught_up_topic_holds_the_watermark_until_idle(kafka_broker, idle_timeout_s: float,
                                                        late: int) -> None:
    """The impressions producer lags behind the actions producer: the actions' newer times
    must not close the impressions' windows while the impressions topic is merely caught
    up (not idle), or the lagging impressions are dropped as late."""
    bs = kafka_broker.bootstrap_servers
    imp, act, out = make_topics(bs)
    with KafkaSink(bs, act) as s:
        s.send_columns(actions([99], [100_000]))
        s.flush()
    with KafkaSink(bs, imp) as s:
        s.send_columns(impressions([1], [1000]))
        s.flush()
    joiner = Joiner(bs, imp, act, out, config=JoinerConfig(window_s=60, horizon_s=60),
                    options=FAST, idle_timeout_s=idle_timeout_s, clock=lambda: 0.0)
    try:
        joiner.open()
        _poll_until_read(joiner, 2)
        with KafkaSink(bs, imp) as s:  # the lagging impressions producer catches up
            s.send_columns(impressions([2], [1001]))
            s.flush()
        _poll_until_read(joiner, 3)
        assert joiner.join.counters["late_impressions"] == late
    finally:
        joiner.close()
