"""``monolith trainer`` as users run it: 2 trainer processes x 2 ``monolith ps`` processes
reading their own Kafka partitions reach the AUC of one trainer on the same stream, and
finish although their partitions hold different amounts of data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from monolith_py.jobconfig import load_job
from streaming.generate import SyntheticConfig, SyntheticCTR
from streaming.sink import KafkaSink
from streaming.testing import unique_topic
from streaming.topics import ensure_topic
from streaming.trainer import run_trainer

from .conftest import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES, PER_MESSAGE = 120_000, 500
# rank 0 reads partitions 0 and 2, rank 1 reads 1 and 3: rank 0 gets 5/9 of the messages
LAYOUT = (0, 1, 2, 3, 0, 1, 2, 3, 0)

JOB = """
[table_defaults]
dim = 8
optimizer = {{ kind = "adagrad", lr = 0.1 }}

[model]
features = ["f0", "f1", "f2", "f3"]
dense_lr = 0.05

[trainers]
batch_size = {batch}
max_wait_s = 0.2

[kafka]
bootstrap_servers = "{bs}"
topic = "{topic}"
end_of_stream = true
"""


def _produce(bs: str, topic: str) -> None:
    ensure_topic(bs, topic, 4)
    gen = SyntheticCTR(SyntheticConfig(cardinalities=(20_000, 5_000, 1_000, 100), num_dense=4,
                                       seed=3))
    with KafkaSink(bs, topic) as sink:
        for i in range(EXAMPLES // PER_MESSAGE):
            sink.send_columns(gen.batch(i, PER_MESSAGE)[0], partition=LAYOUT[i % len(LAYOUT)])
        sink.flush(timeout_s=120)


def test_two_trainers_two_shards_match_one_trainer(kafka_broker, start_shards,
                                                   tmp_path: Path) -> None:
    bs, topic = kafka_broker.bootstrap_servers, unique_topic("ps-train")
    _produce(bs, topic)
    # Same global batch per dense step: 2 trainers x 500 examples vs 1 trainer x 1000.
    one = tmp_path / "one.toml"
    one.write_text(JOB.format(batch=1000, bs=bs, topic=topic))
    two = tmp_path / "two.toml"
    two.write_text(JOB.format(batch=500, bs=bs, topic=topic))

    single = run_trainer(load_job(one), 0)  # single-process mode: one in-process shard

    shards = start_shards(2, ["--config", str(two)])
    cmd = [sys.executable, "-m", "monolith_py.cli", "trainer", "--config", str(two),
           "--world-size", "2", "--ps", ",".join(shards.addresses),
           "--dist-init", f"tcp://127.0.0.1:{free_port()}", "--set", "ps.deadline_s=120"]
    procs = [subprocess.Popen([*cmd, "--rank", str(r)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        outs = [p.communicate(timeout=400) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    ranks = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]

    assert [r["rank"] for r in ranks] == [0, 1]
    assert sum(r["examples"] for r in ranks) == EXAMPLES == single["examples"]
    assert ranks[0]["examples"] > ranks[1]["examples"]  # uneven partitions ...
    assert ranks[0]["rounds"] == ranks[1]["rounds"]  # ... yet one all-reduce per round each
    assert ranks[1]["idle_rounds"] > 0  # rank 1 ran out first and kept joining the rounds
    assert ranks[0]["global_auc"] == ranks[1]["global_auc"]
    assert ranks[0]["rows"] == ranks[1]["rows"] == single["rows"]  # every id on some shard
    print(f"AUC: 2 trainers x 2 shards {ranks[0]['global_auc']:.4f}, 1 trainer {single['auc']:.4f}")
    assert abs(ranks[0]["global_auc"] - single["auc"]) <= 0.01, (ranks[0], single["auc"])
    assert single["auc"] > 0.7
