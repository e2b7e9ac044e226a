"""Exactly-once resume of ``monolith trainer`` from the SMPs, with the real local broker.

Examples carry unique ids. The trainer (one process, its shard in-process, snapshots every
4 steps to a 3-host SMP group) is killed with SIGKILL at seeded random points — during
training steps, captures and seals — three times, and restarted with ``--restore latest``
each time; the last run reads to the end of the topic. The exactly-once ledger it reports
(count, sum and xor of trained ids, kept in the snapshots next to the Kafka offsets) must
equal the ledger of every id in the log: nothing lost, nothing trained twice.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
from kafka import KafkaConsumer, TopicPartition

from monolith_py.snapshot.ledger import ExactlyOnceLedger
from monolith_py.testing.faults import FILE_ENV, FaultPlan, arm, read_log
from monolith_py.testing.hosts import LocalCluster
from streaming.sink import KafkaSink
from streaming.testing import unique_topic
from streaming.topics import ensure_topic
from tests.integration.streaming.helpers import make_columns

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

MESSAGES, PER_MESSAGE = 90, 20


def test_ledger_equals_the_log_after_crash_restore_cycles(kafka_broker: Any, tmp_path: Any) -> None:
    bs = kafka_broker.bootstrap_servers
    topic = unique_topic("eo")
    ensure_topic(bs, topic, 3)
    with KafkaSink(bs, topic) as sink:
        for i in range(MESSAGES):
            sink.send_columns(make_columns(i * PER_MESSAGE, PER_MESSAGE, seed=3),
                              partition=i % 3)
        sink.flush()
    expected = ExactlyOnceLedger.of(np.arange(MESSAGES * PER_MESSAGE))
    plan_file, faults = str(tmp_path / "plan"), str(tmp_path / "faults.log")
    with LocalCluster(3, job="eo", k=2, m=3, keep=2, full_every=4,
                      workdir=str(tmp_path)) as cluster:
        cmd = [sys.executable, "-m", "monolith_py.cli", "trainer", "--bootstrap-servers", bs,
               "--topic", topic, "--batch-size", str(PER_MESSAGE), "--end-of-stream",
               "--features", "user,item,tags", "--dim", "8", "--every", "100000",
               "--smp-group", ",".join(cluster.smp_addresses), "--host-id", "0",
               "--job", "eo", "--snapshot-every-steps", "4", "--restore", "latest",
               "--group-id", f"g-{topic}"]
        env = {**os.environ, FILE_ENV: plan_file}
        restored = 0
        for cycle in range(3):
            arm(plan_file, FaultPlan(seed=cycle + 11, label=f"run{cycle}", log_path=faults, skip=10,
                                     phases={"trainer.step": 0.05, "trainer.capture": 0.1,
                                             "ps.capture": 0.1, "ps.commit": 0.1,
                                             "coord.seal": 0.1}))
            run = subprocess.run(cmd, env=env, capture_output=True, timeout=300)
            assert run.returncode == -9, run.stderr.decode()[-3000:]
            assert len(read_log(faults)) == cycle + 1
            restored += "restored snapshot" in run.stderr.decode()
        arm(plan_file, None)
        run = subprocess.run(cmd, env=env, capture_output=True, timeout=300)
        assert run.returncode == 0, run.stderr.decode()[-3000:]
        final = json.loads(run.stdout.decode().strip().splitlines()[-1])
        assert final["snapshots"] > 0 and "restored snapshot" in run.stderr.decode()
        assert restored >= 1, "the crashed runs should resume from snapshots"
        # the trainer's own counters travel in the snapshots too
        assert final["trained_examples"] == MESSAGES * PER_MESSAGE
        assert final["ledger"] == expected.state_dict(), (final, read_log(faults))
        assert {int(p): o for p, o in final["offsets"].items()} == {
            p: MESSAGES // 3 for p in range(3)}
        # sealed snapshots' positions were committed under the group (lag tools only)
        c = KafkaConsumer(bootstrap_servers=bs, group_id=f"g-{topic}", enable_auto_commit=False)
        try:
            got = {p: c.committed(TopicPartition(topic, p)) for p in range(3)}
        finally:
            c.close(autocommit=False)
        assert all(o is not None and 0 < o <= MESSAGES // 3 for o in got.values()), got
