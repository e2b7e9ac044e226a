"""KafkaExampleSource against the real local broker over TCP."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from kafka import KafkaConsumer, TopicPartition

from monolith_py.errors import ConfigError
from streaming.broker import LocalBroker
from streaming.codec import encode_columns
from streaming.sink import KafkaSink
from streaming.source import DLQ_HEADERS, KafkaExampleSource, SourceOptions
from streaming.testing import unique_topic
from streaming.topics import ensure_topic
from tests.integration.streaming.helpers import NAMES, ids_of, make_columns

pytestmark = pytest.mark.integration

FAST = SourceOptions(poll_timeout_s=0.2, topic_wait_s=20)


def produce(bootstrap: str, topic: str, sizes: list[int], first_id: int = 0) -> list[int]:
    """Write one message per entry of ``sizes``; return all example ids written."""
    ids: list[int] = []
    with KafkaSink(bootstrap, topic) as sink:
        nxt = first_id
        for n in sizes:
            sink.send_columns(make_columns(nxt, n))
            ids.extend(range(nxt, nxt + n))
            nxt += n
        sink.flush(timeout_s=60)
    return ids


def drain(src: KafkaExampleSource, limit: int | None = None) -> list:
    out = []
    for cols in src.iter_columns():
        out.append(cols)
        if limit is not None and len(out) >= limit:
            break
    return out


def test_produced_equals_consumed(kafka_broker) -> None:
    bs, topic = kafka_broker.bootstrap_servers, unique_topic("exact")
    assert ensure_topic(bs, topic, partitions=3) == 3
    rng = np.random.default_rng(1)
    sizes = rng.integers(1, 120, size=45).tolist()
    produced = produce(bs, topic, sizes)
    with KafkaExampleSource(bs, topic, batch_size=128, end_of_stream=True,
                            options=FAST) as src:
        batches = drain(src)
        state = src.state_dict()
        metrics = src.metrics()
    got = ids_of(batches)
    assert sorted(got) == produced  # every example exactly once
    assert all(len(b) <= 128 for b in batches)
    assert all(b.names == NAMES for b in batches)
    assert sum(state.values()) == len(sizes)  # next offsets = messages per partition
    assert metrics["examples"] == len(produced) and metrics["dead_letters"] == 0
    assert metrics["lag_total"] == 0


def test_batch_as_torch_and_partial_batch_after_max_wait(kafka_broker) -> None:
    bs, topic = kafka_broker.bootstrap_servers, unique_topic("wait")
    ensure_topic(bs, topic, partitions=1)
    produce(bs, topic, [5, 7])
    src = KafkaExampleSource(bs, topic, batch_size=10_000, max_wait_s=0.3, options=FAST)
    try:
        started = time.monotonic()
        batch = next(iter(src))  # no end_of_stream: only max_wait can release it
        assert time.monotonic() - started < 30
        assert len(batch) == 12
        batch.validate()
        assert batch.sparse.keys() == list(NAMES)
        assert src.state_dict() == {0: 2}
        assert src.lag() == {0: 0}
    finally:
        src.close()


def test_stop_and_restore_is_exactly_once(kafka_broker) -> None:
    bs, topic = kafka_broker.bootstrap_servers, unique_topic("restore")
    ensure_topic(bs, topic, partitions=4)
    produced = produce(bs, topic, [64] * 40)
    first = KafkaExampleSource(bs, topic, batch_size=200, end_of_stream=True, options=FAST)
    part1 = drain(first, limit=5)  # stop mid-stream: the consumer has prefetched more
    state = first.state_dict()
    first.close()
    # restore into a reader with another batch size; the rest must follow exactly
    second = KafkaExampleSource(bs, topic, batch_size=64, end_of_stream=True, options=FAST)
    second.load_state_dict({str(p): off for p, off in state.items()})  # JSON-style keys
    part2 = drain(second)
    second.close()
    got = ids_of(part1) + ids_of(part2)
    assert len(got) == len(set(got)), "an example was read twice"
    assert sorted(got) == produced, "an example was lost"
    assert len(ids_of(part1)) == 5 * 192  # 200 holds three whole 64-example messages


def test_ranks_split_partitions_and_restore_across_world_sizes(kafka_broker) -> None:
    bs, topic = kafka_broker.bootstrap_servers, unique_topic("ranks")
    ensure_topic(bs, topic, partitions=3)
    produced = produce(bs, topic, [30] * 18)
    got: list[int] = []
    merged: dict[int, int] = {}
    for rank in range(2):
        src = KafkaExampleSource(bs, topic, rank=rank, world_size=2, batch_size=60,
                                 end_of_stream=True, options=FAST)
        got += ids_of(drain(src, limit=2))
        merged.update(src.state_dict())
        assert src.partitions == [0, 2] if rank == 0 else [1]
        src.close()
    # a single reader resumes from the merged map of both ranks
    rest = KafkaExampleSource(bs, topic, end_of_stream=True, options=FAST)
    rest.load_state_dict(merged)
    got += ids_of(drain(rest))
    rest.close()
    assert sorted(got) == produced
    with pytest.raises(ConfigError, match="no partition"):
        KafkaExampleSource(bs, topic, rank=3, world_size=4, options=FAST).open()


def test_poison_message_goes_to_dead_letter_topic(kafka_broker) -> None:
    bs, topic = kafka_broker.bootstrap_servers, unique_topic("poison")
    dlq = topic + "-dlq"
    ensure_topic(bs, topic, partitions=1)
    good = encode_columns(make_columns(0, 10))
    corrupt = bytearray(encode_columns(make_columns(10, 10)))
    corrupt[-3] ^= 0xFF  # checksum mismatch
    with KafkaSink(bs, topic) as sink:
        for value in (good, b"not an example", bytes(corrupt),
                      encode_columns(make_columns(20, 10))):
            sink.send(value, partition=0)
        sink.flush(timeout_s=60)
    with KafkaExampleSource(bs, topic, batch_size=10, dead_letter_topic=dlq,
                            end_of_stream=True, options=FAST) as src:
        got = ids_of(drain(src))
        assert src.counters["dead_letters"] == 2
        assert src.state_dict() == {0: 4}
    assert got == list(range(10)) + list(range(20, 30))  # consumption went on
    consumer = KafkaConsumer(bootstrap_servers=bs, enable_auto_commit=False)
    try:
        tp = TopicPartition(dlq, 0)
        consumer.assign([tp])
        consumer.seek(tp, 0)
        dead: list = []
        deadline = time.monotonic() + 30
        while len(dead) < 2 and time.monotonic() < deadline:
            for msgs in consumer.poll(timeout_ms=500).values():
                dead.extend(msgs)
    finally:
        consumer.close()
    assert [m.value for m in dead] == [b"not an example", bytes(corrupt)]
    headers = [dict(m.headers) for m in dead]
    assert [h[DLQ_HEADERS[2]] for h in headers] == [b"1", b"2"]
    assert all(h[DLQ_HEADERS[0]] == topic.encode() for h in headers)
    assert b"header" in headers[0][DLQ_HEADERS[3]] and b"CRC" in headers[1][DLQ_HEADERS[3]]


def test_broker_paused_mid_stream_loses_nothing(tmp_path) -> None:
    """SIGSTOP the broker while a producer and a consumer are both running, SIGCONT it
    3 s later (longer than the consumer's request timeout, so connections are dropped
    and re-opened): every example arrives exactly once."""
    broker = LocalBroker(log_path=tmp_path / "broker.log").start()
    try:
        bs, topic = broker.bootstrap_servers, "paused"
        ensure_topic(bs, topic, partitions=2)
        total_msgs, per_msg = 80, 50
        got: list[int] = []
        resumed = threading.Event()
        at_pause: list[int] = []

        def producer() -> None:
            with KafkaSink(bs, topic) as sink:
                for i in range(total_msgs):
                    sink.send_columns(make_columns(i * per_msg, per_msg))
                    time.sleep(0.03)
                sink.flush(timeout_s=120)

        def chaos() -> None:
            deadline = time.monotonic() + 60
            while len(got) < total_msgs * per_msg // 3 and time.monotonic() < deadline:
                time.sleep(0.01)
            broker.pause()
            at_pause.append(len(got))
            time.sleep(3.0)  # the outage itself
            broker.resume()
            resumed.set()

        threads = [threading.Thread(target=f, daemon=True) for f in (producer, chaos)]
        for t in threads:
            t.start()
        opts = SourceOptions(poll_timeout_s=0.2, request_timeout_s=1.5, backoff_max_s=0.5)
        src = KafkaExampleSource(bs, topic, batch_size=100, max_wait_s=0.2, options=opts)
        deadline = time.monotonic() + 120
        for cols in src.iter_columns():
            got.extend(cols.example_ids.tolist())
            if len(got) >= total_msgs * per_msg or time.monotonic() > deadline:
                break
        src.close()
        for t in threads:
            t.join(timeout=120)
        assert resumed.is_set()
        assert 0 < at_pause[0] < total_msgs * per_msg  # the outage was mid-stream
        assert len(got) == len(set(got))
        assert sorted(got) == list(range(total_msgs * per_msg))
    finally:
        broker.stop()


def test_stop_keeps_a_half_assembled_batch_and_close_keeps_the_position(kafka_broker) -> None:
    bs, topic = kafka_broker.bootstrap_servers, unique_topic("stop")
    ensure_topic(bs, topic, partitions=1)
    produce(bs, topic, [10, 20])
    src = KafkaExampleSource(bs, topic, batch_size=10_000, max_wait_s=120, options=FAST)
    out: list = []
    thread = threading.Thread(target=lambda: out.extend(src.iter_columns()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while src.counters["messages"] < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    src.stop()  # while the batch waits for more examples (max_wait_s is long)
    thread.join(timeout=30)
    assert not thread.is_alive() and out == []
    assert src.state_dict() == {0: 0}
    src.end_of_stream = True
    assert ids_of(list(src.iter_columns())) == list(range(30))  # nothing was dropped
    produce(bs, topic, [5], first_id=30)
    src.close()
    assert src.state_dict() == {0: 2}
    assert ids_of(list(src.iter_columns())) == list(range(30, 35))  # reopens at 2
    src.close()
