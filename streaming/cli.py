"""The streaming commands: ``monolith broker | replay | generate | joiner | train | trainer``.

Each ``register_*`` adds one sub-parser (entry points in ``pyproject.toml``); handlers do
their heavy imports lazily. Every command that talks to Kafka takes
``--bootstrap-servers`` (default ``$MONOLITH_BOOTSTRAP_SERVERS`` or ``127.0.0.1:9092``,
where ``monolith broker`` listens by default).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

__all__ = [
    "register_broker",
    "register_replay",
    "register_generate",
    "register_joiner",
    "register_train",
    "register_trainer",
    "DEFAULT_BOOTSTRAP",
]

log = logging.getLogger("monolith.streaming")

DEFAULT_BOOTSTRAP = "127.0.0.1:9092"


def _bootstrap(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bootstrap-servers",
                   default=os.environ.get("MONOLITH_BOOTSTRAP_SERVERS", DEFAULT_BOOTSTRAP),
                   help="Kafka bootstrap servers (default: $MONOLITH_BOOTSTRAP_SERVERS or "
                        f"{DEFAULT_BOOTSTRAP}, the local broker's default)")


def _quiet_kafka() -> None:
    """kafka-python logs every connection at INFO; keep it at WARNING unless DEBUG."""
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("kafka").setLevel(logging.WARNING)


def _print_json(obj: dict[str, Any]) -> None:
    print(json.dumps(obj, default=str), flush=True)


def _stop_on_signals(stop: threading.Event, *also: Any) -> None:
    """SIGINT/SIGTERM set ``stop`` and call each of ``also`` (e.g. a source's stop)."""

    def handler(signum: int, _frame: Any) -> None:
        log.info("signal %d: stopping", signum)
        if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
            # closing clients race kafka-python's network code, which then logs
            # tracebacks of sockets it already closed: expected while stopping, not errors
            logging.getLogger("kafka").setLevel(logging.CRITICAL)
        stop.set()
        for fn in also:
            fn()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)


# -- broker -------------------------------------------------------------------------------
def register_broker(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "broker", help="run the embedded Kafka-protocol broker on 127.0.0.1 (in memory)")
    p.add_argument("--port", type=int, default=9092, help="TCP port (0: a free one)")
    p.add_argument("--host", default="127.0.0.1", help="loopback address to listen on")
    p.add_argument("--log-file", default=None, help="write the broker's output here")
    p.add_argument("--ready-file", default=None,
                   help="once it answers, write host:port to this file (for scripts)")
    p.add_argument("--topic", action="append", default=[], metavar="NAME[:PARTITIONS]",
                   help="create this topic at start (repeatable)")
    p.set_defaults(func=_broker)


def _broker(args: argparse.Namespace) -> int:
    _quiet_kafka()
    from streaming.broker import LocalBroker
    from streaming.topics import ensure_topic

    stop = threading.Event()
    _stop_on_signals(stop)
    broker = LocalBroker(args.port, args.host, log_path=args.log_file).start()
    try:
        for spec in args.topic:
            name, _, parts = spec.partition(":")
            ensure_topic(broker.bootstrap_servers, name, int(parts or 1))
        if args.ready_file:
            tmp = f"{args.ready_file}.tmp"
            with open(tmp, "w") as f:
                f.write(broker.bootstrap_servers + "\n")
            os.replace(tmp, args.ready_file)
        print(f"broker ready at {broker.bootstrap_servers} (pid {broker.pid}); "
              "Ctrl-C stops it", flush=True)
        while not stop.wait(0.5):
            if not broker.running():
                print("broker exited unexpectedly", file=sys.stderr)
                return 1
    finally:
        broker.stop()
    return 0


# -- replay -------------------------------------------------------------------------------
def register_replay(subparsers: Any) -> None:
    p = subparsers.add_parser("replay", help="replay a data set into a Kafka topic")
    sub = p.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    m = sub.add_parser("movielens", help="MovieLens ratings in timestamp order")
    _bootstrap(m)
    m.add_argument("--topic", default="movielens")
    m.add_argument("--partitions", type=int, default=1,
                   help="partitions when the topic is created (1 keeps global time order)")
    m.add_argument("--batch-size", type=int, default=256, help="examples per message")
    m.add_argument("--speedup", type=float, default=0.0,
                   help="event time runs this many times faster than wall time (0: no "
                        "pacing)")
    m.add_argument("--limit", type=int, default=None, help="only the first N ratings")
    m.add_argument("--data-dir", default=None, help="MovieLens directory (ml-latest-small)")
    m.add_argument("--actions-topic", default=None,
                   help="write joiner input instead: every rating as an impression to --topic "
                        "and every rating >= 4 as an action here")
    m.add_argument("--rate", type=float, default=0.0,
                   help="with --actions-topic: at most this many impressions per second")
    m.set_defaults(func=_replay_movielens)


def _replay_movielens(args: argparse.Namespace) -> int:
    _quiet_kafka()
    from monolith_py.datasets import load_movielens
    from streaming.produce import replay_to_kafka
    from streaming.sink import KafkaSink
    from streaming.topics import ensure_topic

    replay = load_movielens(args.data_dir)
    parts = ensure_topic(args.bootstrap_servers, args.topic, args.partitions)
    if args.actions_topic is not None:
        from monolith_py.errors import ConfigError
        from streaming.produce import replay_impressions

        if ensure_topic(args.bootstrap_servers, args.actions_topic, parts) != parts:
            raise ConfigError(f"{args.topic} and {args.actions_topic} need equal partition "
                              "counts (the joiner pairs them)")
        with KafkaSink(args.bootstrap_servers, args.topic) as imp, \
                KafkaSink(args.bootstrap_servers, args.actions_topic) as act:
            out = replay_impressions(replay.batches(args.batch_size, stop=args.limit), imp, act,
                                     partitions=parts, rate=args.rate)
        _print_json({"topic": args.topic, "actions_topic": args.actions_topic, **out})
        return 0
    with KafkaSink(args.bootstrap_servers, args.topic) as sink:
        out = replay_to_kafka(replay.batches(args.batch_size, stop=args.limit), sink,
                              speedup=args.speedup,
                              progress=lambda m: log.info("replayed %s", m))
    _print_json({"topic": args.topic, **out})
    return 0


# -- generate -----------------------------------------------------------------------------
def register_generate(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "generate", help="write a synthetic CTR stream (Zipf ids, drift, known best AUC)")
    _bootstrap(p)
    p.add_argument("--topic", default="synthetic",
                   help="examples topic (impressions topic with --actions-topic)")
    p.add_argument("--actions-topic", default=None,
                   help="write joiner input instead: impressions to --topic, delayed clicks "
                        "here")
    p.add_argument("--click-delay-s", type=float, default=60.0,
                   help="mean click delay in event time (with --actions-topic)")
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--examples", type=int, default=100_000)
    p.add_argument("--batch-size", type=int, default=1024, help="examples per message")
    p.add_argument("--cardinalities", default="1000000,100000,10000,1000,100",
                   help="distinct ids per sparse feature, comma-separated")
    p.add_argument("--dense", type=int, default=4, help="dense features")
    p.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of the ids")
    p.add_argument("--base-ctr", type=float, default=0.1)
    p.add_argument("--signal", type=float, default=1.5,
                   help="std of the hidden logit (higher: higher best AUC)")
    p.add_argument("--drift-period-s", type=float, default=0.0,
                   help="event-time period of the concept drift (0: none)")
    p.add_argument("--events-per-s", type=float, default=1000.0, help="event-time rate")
    p.add_argument("--rate", type=float, default=0.0,
                   help="wall-clock examples per second (0: as fast as possible)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start-batch", type=int, default=0,
                   help="continue an earlier run (its printed next_batch)")
    p.set_defaults(func=_generate)


def _generate(args: argparse.Namespace) -> int:
    _quiet_kafka()
    from monolith_py.errors import ConfigError
    from streaming.generate import SyntheticConfig, SyntheticCTR
    from streaming.produce import generate_examples, generate_impressions
    from streaming.sink import KafkaSink
    from streaming.topics import ensure_topic

    try:
        cards = tuple(int(c) for c in args.cardinalities.split(",") if c.strip())
    except ValueError:
        raise ConfigError(f"--cardinalities must be comma-separated ints, got "
                          f"{args.cardinalities!r}") from None
    gen = SyntheticCTR(SyntheticConfig(
        cardinalities=cards, num_dense=args.dense, zipf_a=args.zipf, base_ctr=args.base_ctr,
        signal=args.signal, drift_period_s=args.drift_period_s,
        events_per_s=args.events_per_s, seed=args.seed))
    bs = args.bootstrap_servers
    parts = ensure_topic(bs, args.topic, args.partitions)
    if args.actions_topic is None:
        with KafkaSink(bs, args.topic) as sink:
            out = generate_examples(gen, sink, examples=args.examples,
                                    batch_size=args.batch_size, start_batch=args.start_batch,
                                    rate=args.rate)
        print(f"best achievable AUC (the hidden model's): {out['best_auc']:.4f}",
              file=sys.stderr)
    else:
        act_parts = ensure_topic(bs, args.actions_topic, parts)
        if act_parts != parts:
            raise ConfigError(f"{args.topic} has {parts} partitions but {args.actions_topic} "
                              f"has {act_parts}; the joiner needs equal counts")
        with KafkaSink(bs, args.topic) as imp, KafkaSink(bs, args.actions_topic) as act:
            out = generate_impressions(gen, imp, act, examples=args.examples,
                                       batch_size=args.batch_size, partitions=parts,
                                       click_delay_mean_s=args.click_delay_s,
                                       start_batch=args.start_batch, rate=args.rate)
    _print_json({"topic": args.topic, **out})
    return 0


# -- joiner -------------------------------------------------------------------------------
def register_joiner(subparsers: Any) -> None:
    p = subparsers.add_parser("joiner", help="join impressions with actions into examples")
    _bootstrap(p)
    p.add_argument("--impressions-topic", required=True)
    p.add_argument("--actions-topic", required=True)
    p.add_argument("--output-topic", required=True)
    p.add_argument("--partitions", type=int, default=None,
                   help="create the output topic with this many partitions (default: as "
                        "many as the impressions topic)")
    p.add_argument("--window-s", type=int, default=3600,
                   help="an action within this many seconds of its impression is a positive")
    p.add_argument("--horizon-s", type=int, default=None,
                   help="remember emitted requests this long after their window (default: "
                        "the window)")
    p.add_argument("--lateness-s", type=int, default=0,
                   help="the watermark trails the inputs' event time by this much")
    p.add_argument("--idle-timeout-s", type=float, default=5.0,
                   help="wall seconds a caught-up input partition still holds the watermark "
                        "back (a producer lagging on one topic does not make the other's "
                        "events late)")
    p.add_argument("--negative-rate", type=float, default=1.0,
                   help="keep this share of negatives (logit correction: + ln(rate))")
    p.add_argument("--max-pending", type=int, default=1_000_000,
                   help="most impressions held while their window is open")
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--dead-letter-topic", default=None)
    p.add_argument("--state-file", default=None,
                   help="load state from here at start and save it periodically and at exit")
    p.add_argument("--checkpoint-every-s", type=float, default=30.0)
    p.add_argument("--until-caught-up", action="store_true",
                   help="exit once the inputs are read to their end")
    p.add_argument("--drain", action="store_true",
                   help="at exit, close every open window (end of a replay)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus /metrics (heartbeat, emitted, pending) on this port")
    p.set_defaults(func=_joiner)


def _save_state(joiner: Any, path: str) -> None:
    from streaming.joiner import save_joiner_state

    data = save_joiner_state(joiner.state_dict())
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _joiner(args: argparse.Namespace) -> int:
    _quiet_kafka()
    from streaming.join import JoinerConfig
    from streaming.joiner import Joiner, load_joiner_state
    from streaming.topics import ensure_topic, partitions_for

    bs = args.bootstrap_servers
    parts = args.partitions or partitions_for(bs, args.impressions_topic)
    ensure_topic(bs, args.output_topic, parts)
    cfg = JoinerConfig(window_s=args.window_s, horizon_s=args.horizon_s,
                       max_pending_examples=args.max_pending,
                       negative_rate=args.negative_rate)
    joiner = Joiner(bs, args.impressions_topic, args.actions_topic, args.output_topic,
                    config=cfg, rank=args.rank, world_size=args.world_size,
                    dead_letter_topic=args.dead_letter_topic, lateness_s=args.lateness_s,
                    idle_timeout_s=args.idle_timeout_s)
    stop = threading.Event()
    _stop_on_signals(stop, joiner.stop)
    from monolith_py.observe.export import export_values
    from monolith_py.observe.heartbeat import Heartbeat

    beat = Heartbeat(f"joiner/{args.rank}")
    if args.metrics_port is not None:
        from monolith_py.observe.metrics import serve_metrics

        serve_metrics(args.metrics_port)
    try:
        if args.state_file and os.path.exists(args.state_file):
            with open(args.state_file, "rb") as f:
                joiner.load_state_dict(load_joiner_state(f.read()))
            log.info("joiner state restored from %s", args.state_file)
        elif args.state_file:  # a crash before the first periodic save must not re-emit
            _save_state(joiner, args.state_file)
        last_save = time.monotonic()
        exported = 0.0

        def on_poll(j: Any) -> None:
            nonlocal last_save, exported
            beat.beat()
            if time.monotonic() - exported >= 1.0:
                exported = time.monotonic()
                export_values(j.stats(), _JOINER_GAUGES, beat.role, "Joiner statistic.")
            if args.state_file and time.monotonic() - last_save >= args.checkpoint_every_s:
                _save_state(j, args.state_file)
                last_save = time.monotonic()
                log.info("joiner %s", j.stats())

        stats = joiner.run(until_caught_up=args.until_caught_up, drain=args.drain,
                           on_poll=on_poll)
        if args.state_file:
            _save_state(joiner, args.state_file)
    finally:
        joiner.close()
    _print_json(stats)
    return 0


_JOINER_GAUGES = {"emitted": "monolith_joiner_emitted",
                  "pending_impressions": "monolith_joiner_pending_impressions",
                  "pending_actions": "monolith_joiner_pending_actions",
                  "watermark": "monolith_joiner_watermark_seconds",
                  "dead_letters": "monolith_joiner_dead_letters",
                  "restored_emitted": "monolith_joiner_restored_emitted"}


# -- train --------------------------------------------------------------------------------
def register_train(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "train", help="train online, single process (from Kafka or the MovieLens file)")
    p.add_argument("--source", choices=("kafka", "movielens"), default="kafka")
    _bootstrap(p)
    p.add_argument("--topic", default="movielens", help="examples topic (--source kafka)")
    p.add_argument("--batch-size", type=int, default=256,
                   help="target examples per training step")
    p.add_argument("--max-wait-s", type=float, default=1.0,
                   help="train on a partial batch after this wait")
    p.add_argument("--end-of-stream", action="store_true",
                   help="stop when the topic's end (at start) is reached")
    p.add_argument("--dead-letter-topic", default=None)
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--offsets", default=None,
                   help="JSON file {partition: offset} to start from; rewritten at exit")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--limit", type=int, default=None,
                   help="only the first N ratings (--source movielens)")
    p.add_argument("--data-dir", default=None, help="MovieLens directory (--source movielens)")
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--lr", type=float, default=0.05, help="Adagrad lr of embedding rows")
    p.add_argument("--dense-lr", type=float, default=0.01, help="Adagrad lr of dense layers")
    p.add_argument("--every", type=int, default=50, help="print progress every N batches")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    _quiet_kafka()
    from monolith_py.training import format_progress
    from streaming.train import TrainSettings, train_stream

    settings = TrainSettings(dim=args.dim, lr=args.lr, dense_lr=args.dense_lr, seed=args.seed)

    def show(m: dict[str, Any]) -> None:
        day = time.strftime("%Y-%m-%d", time.gmtime(m.get("event_time", 0)))
        print(f"[{day}] {format_progress(m)}", flush=True)

    if args.source == "movielens":
        from monolith_py.datasets import load_movielens

        batches = load_movielens(args.data_dir).batches(args.batch_size, stop=args.limit)
        final = train_stream(batches, settings, max_steps=args.max_steps, progress=show,
                             progress_every=args.every)
        _print_json(_summary(final))
        return 0

    from streaming.source import KafkaExampleSource

    src = KafkaExampleSource(args.bootstrap_servers, args.topic, rank=args.rank,
                             world_size=args.world_size, batch_size=args.batch_size,
                             max_wait_s=args.max_wait_s,
                             dead_letter_topic=args.dead_letter_topic,
                             end_of_stream=args.end_of_stream)
    if args.offsets and os.path.exists(args.offsets):
        with open(args.offsets) as f:
            src.load_state_dict(json.load(f))
    stop = threading.Event()
    _stop_on_signals(stop, src.stop)

    try:
        final = train_stream(src, settings, max_steps=args.max_steps, progress=show,
                             progress_every=args.every)
        offsets = src.state_dict()
        source_metrics = src.metrics()
    finally:
        src.close()
    if args.offsets:
        with open(args.offsets, "w") as f:
            json.dump({str(p): o for p, o in offsets.items()}, f)
    _print_json({**_summary(final), "offsets": offsets,
                 "dead_letters": source_metrics["dead_letters"],
                 "lag_total": source_metrics["lag_total"]})
    return 0


def _summary(m: dict[str, Any]) -> dict[str, Any]:
    keys = ("examples", "trained_examples", "steps", "bad_batches", "auc", "window_auc",
            "log_loss", "calibration", "examples_per_s", "rows", "event_time")
    return {k: m.get(k) for k in keys}


# -- trainer (multi-process: trainers x PS shards; logic in streaming/trainer.py) ---------
def register_trainer(subparsers: Any) -> None:
    from streaming.trainer import add_arguments

    p = subparsers.add_parser(
        "trainer", help="one trainer of a multi-process job (Kafka partitions, PS shards, "
                        "gloo data-parallel dense layers)")
    add_arguments(p)
    p.set_defaults(func=_trainer)


def _trainer(args: argparse.Namespace) -> int:
    from streaming.trainer import main

    return main(args)
