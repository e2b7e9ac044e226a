"""Trainer positions committed under a consumer group (lag tools), against the real local
broker: the newest positions win, broker failures are counted and never raised, and
``monolith trainer --group-id`` leaves its final position in the group."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
from kafka import KafkaConsumer, TopicPartition

from monolith_py.errors import ConfigError
from monolith_py.jobconfig import job_from_dict
from streaming.offsets import OffsetCommitter
from streaming.sink import KafkaSink
from streaming.testing import unique_topic
from streaming.topics import ensure_topic
from tests.integration.streaming.helpers import make_columns

pytestmark = pytest.mark.integration


def committed(bs: str, group: str, topic: str, partitions: int) -> dict[int, int | None]:
    c = KafkaConsumer(bootstrap_servers=bs, group_id=group, enable_auto_commit=False)
    try:
        return {p: c.committed(TopicPartition(topic, p)) for p in range(partitions)}
    finally:
        c.close(autocommit=False)


def test_newest_positions_are_committed(kafka_broker: Any) -> None:
    bs, topic = kafka_broker.bootstrap_servers, unique_topic("commit")
    ensure_topic(bs, topic, 2)
    group = f"g-{topic}"
    with OffsetCommitter(bs, topic, group) as c:
        c.submit({0: 3, 1: 1})
        c.submit({0: 5, 1: 4})  # replaces the pending one if it was not sent yet
        assert c.flush(60)
        assert c.committed == {0: 5, 1: 4} and c.failures == 0
        c.submit({"0": 7})  # partition keys as they come back from JSON
        assert c.flush(60)
    assert committed(bs, group, topic, 2) == {0: 7, 1: 4}


class _Flaky:
    """A consumer whose first ``fail`` commits raise (a broker outage)."""

    def __init__(self, log: list[Any], fail: int) -> None:
        self.log, self.fail = log, fail

    def commit(self, offsets: Any, timeout_ms: int | None = None) -> None:
        if len(self.log) < self.fail:
            self.log.append("error")
            raise ConnectionError("broker unreachable")
        self.log.append({tp.partition: om.offset for tp, om in offsets.items()})

    def close(self, autocommit: bool = False) -> None:
        pass


def test_failures_are_counted_and_the_next_positions_retried() -> None:
    log: list[Any] = []
    with OffsetCommitter("127.0.0.1:1", "t", "g", consumer_factory=lambda: _Flaky(log, 2)) as c:
        for i in range(3):
            c.submit({0: 10 + i})
            assert c.flush(30)
        assert c.failures == 2 and c.commits == 1 and c.committed == {0: 12}
    assert log == ["error", "error", {0: 12}]


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ConfigError, match="group_id"):
        OffsetCommitter("127.0.0.1:1", "t", "")
    with pytest.raises(ConfigError, match="group_id"):
        job_from_dict({"kafka": {"group_id": 7}})
    with OffsetCommitter("127.0.0.1:1", "t", "g", consumer_factory=lambda: _Flaky([], 0)) as c:
        with pytest.raises(ConfigError, match=">= 0"):
            c.submit({0: -1})
        with pytest.raises(ConfigError, match="map partitions"):
            c.submit([1, 2])  # type: ignore[arg-type]


def test_trainer_commits_its_final_position(kafka_broker: Any) -> None:
    bs, topic = kafka_broker.bootstrap_servers, unique_topic("tcommit")
    ensure_topic(bs, topic, 2)
    with KafkaSink(bs, topic) as sink:
        for i in range(6):
            sink.send_columns(make_columns(i * 16, 16, seed=1), partition=i % 2)
        sink.flush()
    group = f"g-{topic}"
    run = subprocess.run(
        [sys.executable, "-m", "monolith_py.cli", "trainer", "--bootstrap-servers", bs,
         "--topic", topic, "--batch-size", "16", "--end-of-stream", "--features",
         "user,item,tags", "--dim", "4", "--every", "1000", "--group-id", group],
        capture_output=True, timeout=300)
    assert run.returncode == 0, run.stderr.decode()[-3000:]
    final = json.loads(run.stdout.decode().strip().splitlines()[-1])
    assert final["examples"] == 96
    assert committed(bs, group, topic, 2) == {0: 3, 1: 3}  # the end of both partitions
