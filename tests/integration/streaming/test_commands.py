"""The streaming commands as users run them: real processes, real broker, loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from streaming.broker import probe_kafka
from streaming.generate import SyntheticConfig, SyntheticCTR, splitmix64
from streaming.join import JoinerConfig
from streaming.joiner import Joiner
from streaming.produce import generate_impressions
from streaming.sink import KafkaSink
from streaming.source import KafkaExampleSource, SourceOptions
from streaming.testing import unique_topic
from streaming.topics import ensure_topic

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[3]


def monolith(*args: str, timeout: float = 240) -> dict:
    """Run ``monolith ARGS`` and return the JSON object it prints last."""
    proc = subprocess.run([sys.executable, "-m", "monolith_py.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_broker_command_starts_answers_and_stops(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    proc = subprocess.Popen(
        [sys.executable, "-m", "monolith_py.cli", "broker", "--port", "0", "--ready-file",
         str(ready), "--topic", "events:3"], cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        host, port = ready.read_text().strip().split(":")
        assert host == "127.0.0.1" and probe_kafka(host, int(port))
        from streaming.topics import partitions_for

        assert partitions_for(f"{host}:{port}", "events", timeout_s=10) == 3
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        deadline = time.monotonic() + 10
        while probe_kafka(host, int(port), timeout_s=0.2) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not probe_kafka(host, int(port), timeout_s=0.2)  # the broker went with it
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.e2e
def test_train_from_kafka_matches_training_from_the_file(kafka_broker, tmp_path: Path
                                                         ) -> None:
    """`monolith replay movielens` into a topic (plus one poison message), then `monolith
    train --source kafka`: the poison message is dead-lettered and training goes on; the
    model sees the same batches in the same order as when it reads the file, so the
    progressive metrics agree exactly; the offsets file records the end of the topic."""
    bs, topic = kafka_broker.bootstrap_servers, unique_topic("movielens")
    limit, size = "3000", "250"
    replayed = monolith("replay", "movielens", "--bootstrap-servers", bs, "--topic", topic,
                        "--limit", limit, "--batch-size", size)
    assert replayed["examples"] == 3000 and replayed["messages"] == 12
    with KafkaSink(bs, topic) as sink:  # a poison message at the end of the topic
        sink.send(b"this is not an example", partition=0)
        sink.flush()
    offsets = tmp_path / "offsets.json"
    via_kafka = monolith("train", "--source", "kafka", "--bootstrap-servers", bs, "--topic",
                         topic, "--batch-size", size, "--end-of-stream", "--offsets",
                         str(offsets), "--dead-letter-topic", topic + "-dlq")
    assert via_kafka["dead_letters"] == 1  # counted, dead-lettered, training went on
    from monolith_py.datasets import load_movielens
    from streaming.train import TrainSettings, train_stream

    via_file = train_stream(load_movielens().batches(250, stop=3000), TrainSettings())
    assert via_kafka["trained_examples"] == via_file["trained_examples"] == 3000
    assert via_kafka["auc"] == pytest.approx(via_file["auc"], abs=1e-9)
    assert via_kafka["log_loss"] == pytest.approx(via_file["log_loss"], abs=1e-9)
    assert json.loads(offsets.read_text()) == {"0": 13}  # past the poison message
    # resuming from the offsets file finds nothing new to train on
    again = subprocess.run(
        [sys.executable, "-m", "monolith_py.cli", "train", "--bootstrap-servers", bs,
         "--topic", topic, "--end-of-stream", "--offsets", str(offsets)],
        cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert again.returncode == 2 and "ended before its first batch" in again.stderr


def test_generated_impressions_joined_into_true_labels(kafka_broker) -> None:
    """Synthetic impressions + delayed clicks through the joiner: every request comes out
    exactly once, positive exactly when its click fell inside the window."""
    bs = kafka_broker.bootstrap_servers
    imp, act, out = unique_topic("gimp"), unique_topic("gact"), unique_topic("gout")
    for t in (imp, act, out):
        ensure_topic(bs, t, 2)
    gen = SyntheticCTR(SyntheticConfig(cardinalities=(5000, 100), num_dense=2,
                                       events_per_s=50, seed=4))
    n, window, mean_delay = 3000, 30, 20.0
    with KafkaSink(bs, imp) as si, KafkaSink(bs, act) as sa:
        stats = generate_impressions(gen, si, sa, examples=n, batch_size=500, partitions=2,
                                     click_delay_mean_s=mean_delay)
    assert stats["impressions"] == n and 0 < stats["clicks"] < n
    # ground truth from the generator: clicked, and the click's delay within the window
    cols = [gen.batch(i, 500)[0] for i in range(n // 500)]
    reqs = np.concatenate([c.example_ids for c in cols])
    clicked = np.concatenate([c.labels for c in cols]) > 0.5
    u = ((splitmix64(reqs.astype(np.uint64) ^ np.uint64(0xC11C)) >> np.uint64(11))
         .astype(np.float64) + 0.5) / float(1 << 53)
    delay = np.floor(-np.log(u) * mean_delay)
    truth = dict(zip(reqs.tolist(), (clicked & (delay <= window)).astype(float).tolist()))
    joiner = Joiner(bs, imp, act, out, config=JoinerConfig(window_s=window),
                    options=SourceOptions(poll_timeout_s=0.1))
    try:
        joined = joiner.run(until_caught_up=True, drain=True, max_seconds=120)
    finally:
        joiner.close()
    got: dict[int, float] = {}
    with KafkaExampleSource(bs, out, end_of_stream=True, batch_size=1 << 16) as src:
        for c in src.iter_columns():
            for r, y in zip(c.example_ids.tolist(), c.labels.tolist()):
                assert r not in got
                got[r] = y
    assert got == truth
    assert joined["positives"] == sum(truth.values())
    assert joined["late_actions"] == int((clicked & (delay > window)).sum())


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs POSIX processes")
def test_joiner_command_resumes_from_its_state_file(kafka_broker, tmp_path: Path) -> None:
    """`monolith generate --actions-topic` then `monolith joiner --state-file` run twice
    (the second run finds nothing new): output has every impression once."""
    bs = kafka_broker.bootstrap_servers
    imp, act, out = unique_topic("cimp"), unique_topic("cact"), unique_topic("cout")
    common = ["--bootstrap-servers", bs]
    gen = monolith("generate", *common, "--topic", imp, "--actions-topic", act,
                   "--partitions", "2", "--examples", "2000", "--batch-size", "400",
                   "--cardinalities", "1000,10", "--click-delay-s", "5")
    assert gen["impressions"] == 2000
    state = tmp_path / "joiner.state"
    args = ["joiner", *common, "--impressions-topic", imp, "--actions-topic", act,
            "--output-topic", out, "--window-s", "10", "--state-file", str(state),
            "--until-caught-up"]
    first = monolith(*args)
    assert state.exists() and first["emitted"] > 0
    second = monolith(*args, "--drain")
    assert second["messages"] == 0  # resumed at the end of both inputs
    assert first["emitted"] + second["emitted"] == 2000
    ids: list[int] = []
    with KafkaExampleSource(bs, out, end_of_stream=True, batch_size=1 << 16) as src:
        for c in src.iter_columns():
            ids += c.example_ids.tolist()
    assert sorted(ids) == list(range(2000))
