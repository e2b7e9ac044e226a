"""``monolith ps``: run one parameter-server shard (gRPC) until SIGTERM/SIGINT.

Example::

    monolith ps --config examples/job.toml --shard 0          # port from ps.addresses
    monolith ps --shard 1 --num-shards 2 --port 50052 --features f0,f1 --dim 16
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

__all__ = ["register", "add_job_arguments", "job_overrides"]


def add_job_arguments(p: argparse.ArgumentParser) -> None:
    """Flags shared by ``monolith ps`` and ``monolith trainer`` (they override the job
    config)."""
    p.add_argument("--config", default=None, help="job config file (.toml, .yaml)")
    p.add_argument("--features", default=None,
                   help="comma-separated features, one table each (overrides model.features)")
    p.add_argument("--dim", type=int, default=None, help="embedding dim (table_defaults.dim)")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate of the tables' optimizer (table_defaults)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any job config value (repeatable), e.g. ps.deadline_s=10")


def job_overrides(args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    """The overrides implied by the shared flags plus ``extra`` (``None`` values are
    skipped)."""
    from monolith_py.jobconfig import parse_override

    out: dict[str, Any] = {}
    for spec in args.set:
        k, v = parse_override(spec)
        out[k] = v
    if args.features:
        out["model.features"] = args.features
    if args.dim is not None:
        out["table_defaults.dim"] = args.dim
    if args.lr is not None:
        out["table_defaults.optimizer.lr"] = args.lr
    out.update({k: v for k, v in extra.items() if v is not None})
    return out


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("ps", help="run one parameter-server shard (gRPC)")
    p.add_argument("--shard", type=int, required=True, help="this shard's index")
    p.add_argument("--num-shards", type=int, default=None,
                   help="number of shards (default: len(ps.addresses))")
    p.add_argument("--port", type=int, default=None,
                   help="TCP port (default: from ps.addresses; 0 picks a free one)")
    p.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1)")
    p.add_argument("--max-message-mb", type=float, default=None,
                   help="largest gRPC message (ps.max_message_mb, default 4)")
    p.add_argument("--ready-file", default=None,
                   help="once serving, write host:port to this file (for scripts and tests)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus /metrics on this port")
    p.add_argument("--max-sync-streams", type=int, default=16,
                   help="serving workers that may follow this shard at once")
    add_job_arguments(p)
    from monolith_py.snapshot.cli import add_ps_snapshot_arguments

    add_ps_snapshot_arguments(p)  # --smp, --restore ... (snapshots; see monolith_py.snapshot)
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    import signal
    import threading

    from monolith_py.errors import ConfigError
    from monolith_py.jobconfig import load_job
    from monolith_py.ps.server import PSServer
    from monolith_py.ps.shard import PSShard

    job = load_job(args.config, job_overrides(args, **{"ps.max_message_mb": args.max_message_mb}))
    tables = job.require_tables()
    addrs = job.ps.addresses
    n = args.num_shards if args.num_shards is not None else len(addrs)
    if n < 1:
        raise ConfigError("give --num-shards, or ps.addresses in the job config")
    if addrs and len(addrs) != n:
        raise ConfigError(f"--num-shards {n} but ps.addresses lists {len(addrs)} shards")
    if not 0 <= args.shard < n:
        raise ConfigError(f"--shard must be in [0, {n}), got {args.shard}")
    port = args.port
    host = args.host or job.ps.host
    if addrs:
        a_host, _, a_port = addrs[args.shard].rpartition(":")
        port = int(a_port) if port is None else port
        host = host or a_host
    if port is None:
        raise ConfigError("give --port, or ps.addresses in the job config")
    host = host or "127.0.0.1"

    shard = PSShard(args.shard, n, tables)
    from monolith_py.snapshot.cli import ps_snapshot_handlers

    snapshot_handlers = ps_snapshot_handlers(shard, args)  # restores first when asked
    # train -> serve sync on the same port: serving workers subscribe to this shard's
    # deltas; shard 0 also holds the dense board the trainer (rank 0) publishes to.
    from monolith_py.sync.publisher import DenseBoard, ShardPublisher
    from monolith_py.sync.service import SyncService

    sync = SyncService(ShardPublisher.for_ps_shard(shard),
                       DenseBoard() if args.shard == 0 else None,
                       max_subscribers=args.max_sync_streams)
    # each open sync stream holds a handler thread: leave room for serving workers
    server = PSServer(shard, port, host, max_message_bytes=job.ps.max_message_bytes,
                      max_workers=4 + args.max_sync_streams,
                      extra_handlers=[*snapshot_handlers, sync.handler()]).start()
    if args.metrics_port is not None:
        from monolith_py.observe.metrics import serve_metrics

        serve_metrics(args.metrics_port, host)
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    if args.ready_file:
        tmp = f"{args.ready_file}.tmp"
        with open(tmp, "w") as f:
            f.write(server.address + "\n")
        os.replace(tmp, args.ready_file)
    print(json.dumps({"event": "serving", "shard": args.shard, "num_shards": n,
                      "address": server.address, "tables": sorted(shard.dims)}), flush=True)
    from monolith_py.observe.export import export_tables
    from monolith_py.observe.heartbeat import Heartbeat

    beat = Heartbeat(f"ps/{args.shard}")
    try:
        while not stop.wait(0.5):
            # stats() takes the shard lock: a shard stuck under its lock stops beating
            export_tables(shard.stats(), beat.role)
            beat.beat()
    finally:
        server.stop(grace=2.0)
    print(json.dumps({"event": "stopped", "shard": args.shard,
                      "stats": {t: s["size"] for t, s in shard.stats().items()}}), flush=True)
    return 0
