"""``monolith up``: the whole pipeline on one machine, under a supervisor (``make demo``).

Starts the local broker, the producer (MovieLens replay, or ``--generator``), the joiner,
the PS shards, one SMP per simulated host, the trainer(s) and a serving worker; shows live
progress; runs to the end of the stream (or ``--duration``); then drains in order --
producer done, joiner reads to the end and closes every window, trainers read to the end
of the examples topic (SIGUSR1) -- checks the exactly-once accounting and a prediction,
prints a summary and stops everything. Ctrl-C stops everything cleanly too.

Roles, hosts and command lines: :mod:`monolith_py.supervisor.pipeline`; watching,
recovery, chaos and the status page: :mod:`monolith_py.supervisor`.

Example::

    monolith up                                  # MovieLens, a few minutes on 2 cores
    monolith up --duration 60 --json-summary s.json
    monolith up --chaos --chaos-seed 3           # kill roles and hosts, lose nothing
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

__all__ = ["register"]

log = logging.getLogger("monolith.up")

_SHOWN_EVENTS = ("died", "hung", "chaos", "restart", "recovered", "restore", "straggler",
                 "error", "phase")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "up", help="run the whole pipeline locally under a supervisor (what make demo runs)",
        description="Broker, producer, joiner, PS shards, SMPs, trainers and a serving "
                    "worker, supervised (heartbeats, restarts with snapshot restore, "
                    "stragglers), with live progress and a status page.")
    src = p.add_argument_group("stream")
    src.add_argument("--generator", action="store_true",
                     help="synthetic CTR stream instead of the MovieLens replay")
    src.add_argument("--examples", type=int, default=None,
                     help="impressions to produce (default: all 100836 MovieLens ratings; "
                          "generator: 60000)")
    src.add_argument("--rate", type=float, default=1500.0,
                     help="impressions per second written by the producer (0: no pacing)")
    src.add_argument("--duration", type=float, default=None,
                     help="stop producing after this many seconds, then drain and finish")
    src.add_argument("--bootstrap-servers", default=None,
                     help="use this Kafka cluster instead of starting the local broker")
    job = p.add_argument_group("job")
    job.add_argument("--config", default=None, metavar="JOB.toml",
                     help="job config file given to the PS shards and trainers (tables, "
                          "model, optimizers; the flags below override it)")
    job.add_argument("--trainers", type=int, default=1,
                     help="trainer processes (gloo data-parallel dense layers; default 1)")
    job.add_argument("--ps-shards", type=int, default=2, help="PS shards (default 2)")
    job.add_argument("--hosts", type=int, default=3,
                     help="simulated hosts, one SMP each (default 3)")
    job.add_argument("--k", type=int, default=2,
                     help="data blocks per snapshot part (default 2)")
    job.add_argument("--m", type=int, default=3,
                     help="blocks per part in all, k + parity; m - k hosts may be lost "
                          "(default 3)")
    job.add_argument("--batch-size", type=int, default=512,
                     help="examples per training step per trainer (default 512)")
    job.add_argument("--dim", type=int, default=16, help="embedding dim (default 16)")
    job.add_argument("--snapshot-every-s", type=float, default=5.0,
                     help="seconds between snapshots with one trainer (default 5)")
    job.add_argument("--snapshot-every-steps", type=int, default=20,
                     help="rounds between snapshots with several trainers (default 20)")
    job.add_argument("--job", default="up", help="job name and topic prefix (default up)")
    sup = p.add_argument_group("supervisor")
    sup.add_argument("--heartbeat-interval-s", type=float, default=5.0,
                     help="a role without heartbeat progress for 2 intervals is hung "
                          "(default 5)")
    sup.add_argument("--straggler-factor", type=float, default=1.5,
                     help="a straggler's step time exceeds this x the median (default 1.5)")
    sup.add_argument("--straggler-k", type=int, default=5,
                     help="... for this many consecutive intervals (default 5)")
    sup.add_argument("--chaos", action="store_true",
                     help="kill random roles and whole hosts at random times")
    sup.add_argument("--chaos-seed", type=int, default=0,
                     help="seed of the kill schedule and of the trainers (default 0)")
    sup.add_argument("--chaos-interval-s", type=float, default=30.0,
                     help="mean seconds between chaos kills (default 30)")
    sup.add_argument("--chaos-first-s", type=float, default=20.0,
                     help="no kill in the first seconds (default 20)")
    sup.add_argument("--chaos-host-probability", type=float, default=0.25,
                     help="share of kills that take a whole host (default 0.25)")
    out = p.add_argument_group("output")
    out.add_argument("--run-dir", default=None,
                     help="logs, events and summary (default: runs/<timestamp>)")
    out.add_argument("--json-summary", default=None, metavar="FILE",
                     help="also write the summary here as JSON")
    out.add_argument("--status-port", type=int, default=0,
                     help="port of the status page on 127.0.0.1 (0: a free one)")
    out.add_argument("--finish-timeout-s", type=float, default=900.0,
                     help="longest the drain at the end may take")
    p.set_defaults(func=_up)


def _up(args: argparse.Namespace) -> int:
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("kafka").setLevel(logging.CRITICAL)  # closing consumers is noisy
        for name in ("monolith.snapshot.recovery", "streaming.source"):  # catalog polls,
            logging.getLogger(name).setLevel(logging.WARNING)            # final checks
    from monolith_py.observe.stragglers import StragglerPolicy
    from monolith_py.supervisor import (
        ChaosConfig,
        EventLog,
        PipelineConfig,
        StatusServer,
        Supervisor,
        SupervisorConfig,
        build_pipeline,
    )
    from monolith_py.supervisor.report import ProgressDisplay

    run_dir = os.path.abspath(args.run_dir or os.path.join(
        "runs", time.strftime("%Y%m%d-%H%M%S")))
    os.makedirs(run_dir, exist_ok=True)
    cfg = PipelineConfig(
        source="generator" if args.generator else "movielens", examples=args.examples,
        produce_rate=args.rate, hosts=args.hosts, k=args.k, m=args.m,
        ps_shards=args.ps_shards, trainers=args.trainers, batch_size=args.batch_size,
        dim=args.dim, snapshot_every_s=args.snapshot_every_s,
        snapshot_every_steps=args.snapshot_every_steps, job=args.job,
        seed=args.chaos_seed, job_config=args.config)
    pipe = build_pipeline(cfg, run_dir, bootstrap=args.bootstrap_servers)
    total = cfg.total_examples or (None if args.generator else 100_836)
    display = ProgressDisplay(total)

    def echo(ev: dict[str, Any]) -> None:
        if ev["kind"] in _SHOWN_EVENTS:
            display.write(f"[{ev['elapsed']:6.1f}s] {ev['kind']:9s} {ev['role'] or '':10s} "
                          f"{ev['message']}")

    events = EventLog(os.path.join(run_dir, "events.jsonl"), echo=echo)
    chaos = ChaosConfig(seed=args.chaos_seed, mean_interval_s=args.chaos_interval_s,
                        first_after_s=args.chaos_first_s,
                        host_probability=args.chaos_host_probability) if args.chaos else None
    sup = Supervisor(pipe.roles, run_dir, hosts=pipe.hosts, events=events, config=SupervisorConfig(
        heartbeat_interval_s=args.heartbeat_interval_s,
        stragglers=StragglerPolicy(args.straggler_factor, args.straggler_k),
        smp_group=pipe.smp_group, job=cfg.job, chaos=chaos))
    runner = _Runner(args, pipe, sup, display, total)
    status = StatusServer(lambda: {**sup.status(), "extra": runner.view()}, sup.series,
                          sup.events, port=args.status_port).start()
    display.write(f"monolith up: {cfg.source} stream, {cfg.ps_shards} PS shards, "
                  f"{cfg.trainers} trainer(s), {cfg.hosts} hosts (EC {cfg.k}-of-{cfg.m})"
                  f"{', chaos' if chaos else ''}\n  status page  {status.url}\n"
                  f"  serving      {pipe.serve_url}/v1/predict\n  run dir      {run_dir}")
    stop = threading.Event()

    def on_signal(*_: Any) -> None:
        stop.set()
        sup.request_stop()  # aborts waits for roles to start

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        summary = runner.run(stop)
    finally:
        display.close()
        for s, h in previous.items():
            signal.signal(s, h)
        status.close()
    print(_format(summary), flush=True)
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    if args.json_summary:
        with open(args.json_summary, "w") as f:
            json.dump(summary, f, indent=2, default=str)
    return 0 if summary["ok"] else 1


def _format(summary: dict[str, Any]) -> str:
    from monolith_py.supervisor.report import format_summary

    return format_summary(summary)


class _Runner:
    """The phases of a run: start, running, draining, finishing, checking, stopped."""

    def __init__(self, args: argparse.Namespace, pipe: Any, sup: Any, display: Any,
                 total: int | None) -> None:
        self.args, self.pipe, self.sup, self.display = args, pipe, sup, display
        self.total = total
        self.t0 = time.monotonic()
        self.phase = "starting"
        self.finals: dict[str, dict[str, Any]] = {}
        self.ex_rates: list[float] = []

    # -- views -------------------------------------------------------------------------------

    def _sum(self, series: str, kind: str) -> float | None:
        vals = [self.sup.series.last(f"{series}:{n}") for n, st in self.sup.roles.items()
                if st.spec.kind == kind]
        known = [v for v in vals if v is not None]
        return float(sum(known)) if known else None

    def view(self) -> dict[str, Any]:
        s = self.sup.series
        trained = self._sum("trained", "trainer")
        pts = s.points("ex_rate:all")[-5:]
        newest = self.sup.snapshots.newest()
        return {"phase": self.phase, "elapsed": time.monotonic() - self.t0,
                "trained": int(trained) if trained is not None else None,
                "auc": s.last("auc:trainer/0"), "log_loss": s.last("log_loss:trainer/0"),
                "ex_per_s": sum(v for _, v in pts) / len(pts) if pts else None,
                "lag": s.last("lag:all"), "rows": s.last("rows:all"),
                "snapshot": newest["id"] if newest else None,
                "freshness_s": s.last("freshness_s:serve/0"),
                "restarts": sum(st.restarts for st in self.sup.roles.values())}

    def _tick(self) -> None:
        self.sup.tick()
        v = self.view()
        rate = self.sup.series.last("ex_rate:all")
        if rate and self.phase in ("running", "draining", "finishing"):
            self.ex_rates.append(rate)  # while training (idle waits for data excluded)
        self.display.update(v)

    def _set_phase(self, phase: str, why: str) -> None:
        self.phase = phase
        self.sup.phase = "running" if phase == "running" else phase
        self.sup.events.record("phase", None, f"{phase}: {why}")

    # -- phases ------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> dict[str, Any]:
        from monolith_py.errors import MonolithError

        reason = "finished"
        ok = False
        try:
            self._start()
            self._set_phase("running", "every role started")
            reason = self._run_stream(stop)
            if reason in ("end of stream", "duration reached"):
                if self._drain(stop) and self._finish(stop):
                    ok = True
                elif stop.is_set():
                    reason = "interrupted"
                else:
                    reason = self.sup.fatal or "the drain did not complete"
        except KeyboardInterrupt:
            reason = "interrupted"
        except MonolithError as exc:  # a clear message, no traceback
            log.error("monolith up: %s", exc)
            reason = f"error: {exc}"
        except Exception as exc:  # report, then still stop everything
            log.exception("monolith up failed")
            reason = f"error: {type(exc).__name__}: {exc}"
        summary: dict[str, Any] = {}
        try:
            if ok:
                self._set_phase("checking", "exactly-once accounting and a prediction")
                summary.update(_verify(self.pipe, self.finals))
                summary["serving"] = _check_serving(self.pipe.serve_url)
        except Exception as exc:
            log.exception("checks failed")
            ok, reason = False, f"checks failed: {exc}"
        finally:
            self.phase = "stopping"
            self.sup.shutdown()
        return self._summary(summary, ok, reason)

    def _start(self) -> None:
        from streaming.topics import ensure_topic

        names = [r.name for r in self.pipe.roles]
        if "broker" in names:
            self.sup.start(["broker"])
        bs, t = self.pipe.bootstrap, self.pipe.topics
        parts_in = 1 if self.pipe.config.source == "movielens" else 2
        ensure_topic(bs, t["impressions"], parts_in)
        ensure_topic(bs, t["actions"], parts_in)
        ensure_topic(bs, t["examples"], max(2, 2 * self.pipe.config.trainers))
        _require_empty(bs, list(t.values()))
        self.sup.start([n for n in names if n != "broker"])

    def _run_stream(self, stop: threading.Event) -> str:
        started = time.monotonic()  # the duration counts from when every role runs
        deadline = None if self.args.duration is None else started + self.args.duration
        while True:
            self._tick()
            if stop.is_set():
                return "interrupted"
            if self.sup.fatal:
                return f"failed: {self.sup.fatal}"
            if self.sup.roles["producer"].status == "done":
                return "end of stream"
            if deadline is not None and time.monotonic() >= deadline:
                self.sup.stop_role("producer", grace_s=10)
                return "duration reached"
            time.sleep(self.sup.config.interval_s)

    def _wait(self, stop: threading.Event, done: Any, timeout_s: float,
              each: Any = None) -> bool:
        deadline = time.monotonic() + timeout_s
        while not done():
            if stop.is_set() or self.sup.fatal or time.monotonic() > deadline:
                return False
            if each is not None:
                each()
            self._tick()
            time.sleep(self.sup.config.interval_s)
        return True

    def _drain(self, stop: threading.Event) -> bool:
        """The joiner reads its inputs to the end, closes every window, exits 0."""
        self._set_phase("draining", "the producer is done; the joiner reads to the end and "
                        "closes every window")
        sup = self.sup
        if not self._wait(stop, lambda: not sup.recovering and not sup._failed, 300):
            return False
        sup.stop_role("joiner/0")
        sup.replace(self.pipe.final_joiner())
        sup.start_role("joiner/0", wait=False)
        return self._wait(stop, lambda: sup.roles["joiner/0"].status == "done",
                          self.args.finish_timeout_s)

    def _finish(self, stop: threading.Event) -> bool:
        """Each trainer reads to the end of the examples topic (SIGUSR1) and exits 0."""
        from dataclasses import replace

        self._set_phase("finishing", "the examples topic is complete; trainers read to its "
                        "end")
        sup = self.sup
        trainers = [n for n, st in sup.roles.items() if st.spec.kind == "trainer"]
        for n in trainers:
            sup.replace(replace(sup.roles[n].spec, finite=True, chaos=False))
        signalled: dict[str, float | None] = {}

        def signal_ready() -> None:
            for n in trainers:
                st = sup.roles[n]
                # only once it beats (its SIGUSR1 handler is installed before the first beat)
                if (st.status == "running" and st.beats is not None
                        and signalled.get(n) != st.started_at):
                    sup.send_signal(n, signal.SIGUSR1)
                    signalled[n] = st.started_at

        ok = self._wait(stop, lambda: all(sup.roles[n].status == "done" for n in trainers),
                        self.args.finish_timeout_s, each=signal_ready)
        if ok:
            for n in trainers:
                self.finals[n] = _final_json(sup.log_path(n))
        return ok

    # -- the summary ---------------------------------------------------------------------------

    def _summary(self, checks: dict[str, Any], ok: bool, reason: str) -> dict[str, Any]:
        sup = self.sup
        finals = list(self.finals.values())
        auc = finals[0].get("global_auc") if finals else sup.series.last("auc:trainer/0")
        loss = finals[0].get("global_log_loss") if finals else sup.series.last(
            "log_loss:trainer/0")
        rates = sorted(self.ex_rates)
        s: dict[str, Any] = {
            "ok": False, "reason": reason, "source": self.pipe.config.source,
            "duration_s": round(time.monotonic() - self.t0, 1), "run_dir": self.pipe.run_dir,
            "final_auc": auc, "final_log_loss": loss,
            "examples_per_s": rates[len(rates) // 2] if rates else None,
            "restarts": sum(st.restarts for st in sup.roles.values()),
            "restarts_by_role": {n: st.restarts for n, st in sup.roles.items() if st.restarts},
            "snapshots_taken": len(sup.snapshots.timeline()),
            "snapshot_failures": sum(int(f.get("snapshot_failures") or 0) for f in finals),
            "chaos_kills": sup.chaos.kills if sup.chaos is not None else 0,
            "events": sup.events.counts(),
            "table_rows": sup.series.last("rows:all"),
            "trainers": {n: {k: f.get(k) for k in ("examples", "trained_examples", "steps",
                                                    "auc", "ledger", "offsets")}
                         for n, f in self.finals.items()},
            "serving": {"predict_ok": False, "detail": "not checked"},
        }
        s.update(checks)
        s.setdefault("examples_trained", sum(int(f.get("trained_examples") or 0) for f in finals)
                     if finals else None)
        s["ok"] = bool(ok and s.get("lost") == 0 and s.get("duplicated") == 0
                       and s.get("examples_trained", 0) > 0
                       and s["serving"].get("predict_ok"))
        if ok and not s["ok"]:
            s["reason"] = "checks failed"
        return s


def _require_empty(bootstrap: str, topics: list[str]) -> None:
    """The end-of-run accounting reads the topics from their start: they must be new."""
    from kafka import KafkaConsumer, TopicPartition

    from monolith_py.errors import ConfigError
    from streaming.topics import partitions_for

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, client_id="monolith-up-check")
    try:
        tps = [TopicPartition(t, p) for t in topics
               for p in range(partitions_for(bootstrap, t))]
        ends = consumer.end_offsets(tps)
    finally:
        consumer.close()
    used = sorted({tp.topic for tp, end in ends.items() if end > 0})
    if used:
        raise ConfigError(f"topics {used} already hold messages; monolith up needs new topics "
                          "(pick another --job name, which prefixes them)")


def _final_json(path: str) -> dict[str, Any]:
    """The last JSON object a trainer printed (its final summary with the ledger)."""
    with open(path, "rb") as f:
        lines = f.read().decode("utf-8", "replace").splitlines()
    for line in reversed(lines):
        if line.startswith('{"rank"'):
            return dict(json.loads(line))
    raise RuntimeError(f"no final summary line in {path}")


def _read_ids(bootstrap: str, topic: str) -> Any:
    import numpy as np

    from streaming.source import KafkaExampleSource

    src = KafkaExampleSource(bootstrap, topic, end_of_stream=True, batch_size=1 << 20,
                             max_wait_s=0.0)
    try:
        parts = [cols.example_ids.copy() for cols in src.iter_columns()]
    finally:
        src.close()
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _verify(pipe: Any, finals: dict[str, dict[str, Any]]) -> dict[str, Any]:
    from monolith_py.supervisor.report import account

    imp = _read_ids(pipe.bootstrap, pipe.topics["impressions"])
    ex = _read_ids(pipe.bootstrap, pipe.topics["examples"])
    ledgers = [f["ledger"] for f in finals.values() if f.get("ledger")]
    if len(ledgers) != len(finals):
        raise RuntimeError("a trainer reported no exactly-once ledger (snapshots off?)")
    return account(imp, ex, ledgers)


def _check_serving(url: str, timeout_s: float = 120.0) -> dict[str, Any]:
    """Wait until the serving worker is ready, then ask it for one prediction."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    detail = "not ready"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/v1/model", timeout=10) as r:
                info = json.loads(r.read())
            if info.get("ready") and info.get("model"):
                model = info["model"]
                body = json.dumps({"examples": [{
                    "features": {f: [1] for f in model["features"]},
                    "dense": [0.0] * int(model["num_dense"])}]}).encode()
                req = urllib.request.Request(f"{url}/v1/predict", data=body,
                                             headers={"Content-Type": "application/json"})
                t = time.perf_counter()
                with urllib.request.urlopen(req, timeout=30) as r:
                    out = json.loads(r.read())
                ms = (time.perf_counter() - t) * 1000
                rows = sum(int(t.get("size", 0)) for t in info.get("tables", {}).values())
                return {"predict_ok": True, "response": out, "latency_ms": round(ms, 1),
                        "rows": rows,
                        "detail": f"POST /v1/predict answered in {ms:.0f} ms ({rows} rows "
                                  "synced)"}
            detail = f"not ready: {info.get('shards')}"
        except (OSError, ValueError, urllib.error.URLError) as exc:
            detail = f"{type(exc).__name__}: {exc}"
        time.sleep(1.0)
    return {"predict_ok": False, "detail": detail}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(0)
