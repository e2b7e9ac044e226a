"""``KafkaExampleSource.finish()`` (what SIGUSR1 does to ``monolith trainer`` at the end of a
``monolith up`` run): read to the partition ends as they are at that moment, then end --
nothing the producer wrote before is missed, nothing written after is read."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from streaming.sink import KafkaSink
from streaming.source import KafkaExampleSource, SourceOptions
from streaming.testing import unique_topic
from streaming.topics import ensure_topic
from tests.integration.streaming.helpers import make_columns

pytestmark = pytest.mark.integration


def _write(bs: str, topic: str, first: int, messages: int, per: int = 50) -> None:
    with KafkaSink(bs, topic) as sink:
        for i in range(messages):
            sink.send_columns(make_columns(first + i * per, per), partition=i % 2)
        sink.flush(timeout_s=60)


def test_finish_reads_to_the_current_end_then_stops(kafka_broker: Any) -> None:
    bs, topic = kafka_broker.bootstrap_servers, unique_topic("finish")
    ensure_topic(bs, topic, 2)
    _write(bs, topic, 0, 10)
    src = KafkaExampleSource(bs, topic, batch_size=120, max_wait_s=0.2,
                             options=SourceOptions(poll_timeout_s=0.2, topic_wait_s=20))
    got: list[int] = []
    done = threading.Event()

    def consume() -> None:
        for cols in src.iter_columns():   # a live stream: no end_of_stream
            got.extend(cols.example_ids.tolist())
        done.set()

    t = threading.Thread(target=consume, daemon=True)
    t.start()
    deadline = time.monotonic() + 60
    while len(got) < 500:                 # the first 10 messages are read ...
        assert time.monotonic() < deadline, len(got)
        time.sleep(0.1)
    assert not done.is_set()              # ... and the source waits for more
    _write(bs, topic, 500, 6)             # the producer's last writes
    src.finish()
    assert done.wait(60), "finish() did not end the iteration"
    t.join(timeout=10)
    _write(bs, topic, 800, 4)             # written after the finish: not read
    assert sorted(got) == list(range(800))
    assert src.state_dict() == {0: 8, 1: 8}
    src.close()
