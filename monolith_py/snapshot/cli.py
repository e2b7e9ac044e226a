"""``monolith smp`` and ``monolith checkpoint``; the ``monolith ps`` snapshot flags.

Examples::

    monolith smp --job j1 --host-id 0 --port 7100 --peers 127.0.0.1:7100,127.0.0.1:7101,127.0.0.1:7102
    monolith ps --shard 0 --num-shards 2 --port 0 --features user,item \\
        --smp 127.0.0.1:7100 --smp-group 127.0.0.1:7100,127.0.0.1:7101,127.0.0.1:7102 \\
        --host-id 0 --job j1 --restore latest
    monolith checkpoint save --smp-group 127.0.0.1:7100,... --job j1 --out /ckpt
    monolith checkpoint inspect /ckpt/ckpt-000000001200-00000012
    monolith checkpoint restore /ckpt/ckpt-000000001200-00000012 --num-shards 3 --ps a,b,c

Nothing heavy is imported at module level (``monolith --help`` stays fast).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

__all__ = ["register_smp", "register_checkpoint", "add_ps_snapshot_arguments",
           "ps_snapshot_handlers", "add_trainer_snapshot_arguments", "trainer_snapshot_settings"]

log = logging.getLogger("monolith.snapshot.cli")


def _addresses(text: str | None) -> list[str]:
    return [a.strip() for a in (text or "").split(",") if a.strip()]


def _write_ready(path: str | None, text: str) -> None:
    if path:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, path)


# -- monolith smp ----------------------------------------------------------------------------------

def register_smp(subparsers: Any) -> None:
    p = subparsers.add_parser("smp", help="run the snapshot manager (SMP) of one host")
    p.add_argument("--job", default="monolith", help="job name (default: monolith)")
    p.add_argument("--host-id", type=int, required=True, help="this host's index in the group")
    p.add_argument("--port", type=int, default=0, help="TCP port (0: a free one)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--bulk-port", type=int, default=0,
                   help="TCP port of the data port serving restores' bulk reads (0: a free "
                        "one; clients learn it over gRPC)")
    p.add_argument("--peers", default="",
                   help="comma-separated SMP addresses of every host of the group, by index "
                        "(this host's entry is ignored)")
    p.add_argument("--num-hosts", type=int, default=None,
                   help="hosts in the group (default: the number of --peers)")
    p.add_argument("--k", type=int, default=2, help="data blocks per part (default 2)")
    p.add_argument("--m", type=int, default=3, help="blocks per part in all (default 3)")
    p.add_argument("--keep", type=int, default=2, help="sealed snapshots retained (default 2)")
    p.add_argument("--full-every", type=int, default=8,
                   help="compose a full part after this many increments (0: never)")
    p.add_argument("--keep-free-mb", type=int, default=1024,
                   help="MiB of freed segments kept faulted in for reuse (default 1024)")
    p.add_argument("--place-timeout-s", type=float, default=60.0,
                   help="how long block placement retries an unavailable peer (default 60)")
    p.add_argument("--max-part-mb", type=int, default=0,
                   help="refuse parts (leases, blocks' parts) larger than this many MiB "
                        "(default 0: half the size of the segment directory's filesystem)")
    p.add_argument("--shm-dir", default=None,
                   help="segment directory (default /dev/shm/monolith-<job>-h<host>)")
    p.add_argument("--nice", type=int, default=10,
                   help="lower the CPU priority of the background threads (coding, placement, "
                        "compaction) by this much, so they yield to training; the threads "
                        "serving restores keep normal priority (default 10)")
    p.add_argument("--ready-file", default=None, help="write host:port here once serving")
    p.add_argument("--metrics-port", type=int, default=None, help="serve /metrics here")
    p.add_argument("--no-repair", dest="repair", action="store_false",
                   help="do not rebuild this host's share from the peers at start")
    p.set_defaults(func=_smp_main)


def _smp_main(args: argparse.Namespace) -> int:
    import signal
    import threading

    from monolith_py.errors import ConfigError
    from monolith_py.snapshot.smp import SMPServer
    from monolith_py.snapshot.store import SMPConfig

    peers = _addresses(args.peers)
    n = args.num_hosts if args.num_hosts is not None else max(len(peers), 1)
    if peers and len(peers) != n:
        raise ConfigError(f"--peers lists {len(peers)} hosts but --num-hosts is {n}")
    cfg = SMPConfig(job=args.job, host_id=args.host_id, num_hosts=n, k=args.k, m=args.m,
                    keep=args.keep, full_every=args.full_every, shm_dir=args.shm_dir,
                    place_timeout_s=args.place_timeout_s,
                    keep_free_bytes=args.keep_free_mb << 20, background_nice=args.nice,
                    max_part_bytes=args.max_part_mb << 20)
    server = SMPServer(cfg, args.port, args.host, peers=peers,
                       bulk_port=args.bulk_port).start(repair=args.repair)
    if args.metrics_port is not None:
        from monolith_py.observe.metrics import serve_metrics

        serve_metrics(args.metrics_port, args.host)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    _write_ready(args.ready_file, server.address)
    print(json.dumps({"event": "serving", "role": "smp", "host_id": cfg.host_id,
                      "address": server.address, "directory": cfg.directory}), flush=True)
    from monolith_py.observe.heartbeat import Heartbeat

    beat = Heartbeat(f"smp/{cfg.host_id}")
    try:
        while not stop.wait(0.5):
            beat.beat()
    finally:
        server.stop(grace=1.0)
    return 0


# -- monolith ps hooks -----------------------------------------------------------------------------

def add_ps_snapshot_arguments(p: argparse.ArgumentParser) -> None:
    """The snapshot flags of ``monolith ps``."""
    g = p.add_argument_group("snapshots")
    g.add_argument("--smp", default=None, help="this host's SMP address (enables snapshots)")
    g.add_argument("--smp-group", default=None,
                   help="comma-separated SMP addresses of the group by host index (restores)")
    g.add_argument("--host-id", type=int, default=None,
                   help="this host's index in the group (default: the --smp position)")
    g.add_argument("--job", default="monolith", help="job name of the snapshots")
    g.add_argument("--restore", default="none",
                   help="at start: 'none', 'latest' (newest sealed snapshot, else the newest "
                        "checkpoint in --checkpoint-dir) or a snapshot id")
    g.add_argument("--checkpoint-dir", default=None, help="universal checkpoints (last resort)")
    g.add_argument("--restore-checkpoint", default=None,
                   help="at start, load this universal checkpoint (any source shard count)")


def ps_snapshot_handlers(shard: Any, args: argparse.Namespace) -> list[Any]:
    """Build the shard's snapshot participant (restoring first when asked) and return the
    gRPC handlers to serve next to the PS service (none without ``--smp``)."""
    from monolith_py.errors import ConfigError

    if getattr(args, "restore_checkpoint", None):
        from monolith_py.snapshot.checkpoint import load_checkpoint

        ckpt = load_checkpoint(args.restore_checkpoint)
        shard.load_state_dict(ckpt.shard_state(shard.shard_id, shard.num_shards))
        log.info("shard %d restored from %s (snapshot %d, %d -> %d shards)", shard.shard_id,
                 args.restore_checkpoint, ckpt.snapshot_id, ckpt.num_shards, shard.num_shards)
    if not getattr(args, "smp", None):
        if getattr(args, "restore", "none") != "none":
            raise ConfigError("--restore needs --smp (and --smp-group)")
        return []
    from monolith_py.snapshot.participant import PSParticipant
    from monolith_py.snapshot.smp import SMPClient, smp_clients

    group_addrs = _addresses(args.smp_group) or [args.smp]
    host_id = args.host_id if args.host_id is not None else (
        group_addrs.index(args.smp) if args.smp in group_addrs else 0)
    group = smp_clients(group_addrs)
    local = group.get(host_id) or SMPClient(args.smp, host_id=host_id)
    part = PSParticipant(shard, local, host_id, group=group, job=args.job,
                         checkpoint_dir=args.checkpoint_dir)
    if args.restore != "none":
        sid = None if args.restore == "latest" else int(args.restore)
        r = part.restore(sid)
        log.info("shard %d restored snapshot %d (step %d) from %s", shard.shard_id,
                 r.snapshot_id, r.step, r.source)
        print(json.dumps({"event": "restored", "shard": shard.shard_id,
                          "snapshot_id": r.snapshot_id, "step": r.step, "source": r.source}),
              flush=True)
    return [part.handler()]


# -- monolith trainer hooks ------------------------------------------------------------------------

def add_trainer_snapshot_arguments(p: argparse.ArgumentParser) -> None:
    """The snapshot flags of ``monolith trainer``."""
    g = p.add_argument_group("snapshots")
    g.add_argument("--smp-group", default=None,
                   help="comma-separated SMP addresses by host index (enables snapshots)")
    g.add_argument("--host-id", type=int, default=0, help="this trainer's host index")
    g.add_argument("--job", default="monolith", help="job name of the snapshots")
    g.add_argument("--snapshot-every-steps", type=int, default=0,
                   help="rounds between snapshots (needed with several trainers)")
    g.add_argument("--snapshot-every-s", type=float, default=10.0,
                   help="seconds between snapshots (one trainer; default 10)")
    g.add_argument("--restore", default="none",
                   help="at start: 'none', 'latest' or a snapshot id (job-wide: rank 0 "
                        "restores the PS shards to the same snapshot)")
    g.add_argument("--checkpoint-dir", default=None, help="universal checkpoints")
    g.add_argument("--checkpoint-every", type=int, default=0,
                   help="write a universal checkpoint every N sealed snapshots (0: never)")
    g.add_argument("--trainer-hosts", default=None,
                   help="comma-separated host index of each rank (default: rank mod hosts)")


def trainer_snapshot_settings(args: argparse.Namespace) -> Any:
    """:class:`~monolith_py.snapshot.loop.LoopSettings` from the flags (``None``: off)."""
    group = _addresses(getattr(args, "smp_group", None))
    if not group:
        return None
    from monolith_py.snapshot.loop import LoopSettings

    hosts = tuple(int(h) for h in _addresses(args.trainer_hosts))
    return LoopSettings(smp_group=tuple(group), host_id=args.host_id, job=args.job,
                        every_steps=args.snapshot_every_steps, every_s=args.snapshot_every_s,
                        restore=str(args.restore), checkpoint_dir=args.checkpoint_dir,
                        checkpoint_every=args.checkpoint_every, trainer_hosts=hosts)


# -- monolith checkpoint ---------------------------------------------------------------------------

def register_checkpoint(subparsers: Any) -> None:
    p = subparsers.add_parser("checkpoint", help="universal checkpoints: save, inspect, restore")
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    s = sub.add_parser("save", help="write the newest (or a given) sealed snapshot to disk")
    s.add_argument("--smp-group", required=True, help="comma-separated SMP addresses")
    s.add_argument("--job", default="monolith")
    s.add_argument("--out", required=True, help="checkpoint root directory")
    s.add_argument("--snapshot", type=int, default=None, help="snapshot id (default: newest)")
    s.set_defaults(func=_ckpt_save)
    i = sub.add_parser("inspect", help="verify a checkpoint and print what it holds")
    i.add_argument("path", help="a checkpoint directory, or a root (newest inside)")
    i.add_argument("--num-shards", type=int, default=None,
                   help="also show how keys would spread over this many shards")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=_ckpt_inspect)
    r = sub.add_parser("restore", help="load a checkpoint onto running PS shards (any count)")
    r.add_argument("path", help="a checkpoint directory, or a root (newest inside)")
    r.add_argument("--num-shards", type=int, required=True, help="shards of the new job")
    r.add_argument("--ps", required=True,
                   help="comma-separated addresses of the PS shards 0..M-1 (started with --smp)")
    r.set_defaults(func=_ckpt_restore)


def _resolve(path: str) -> str:
    from monolith_py.errors import NoValidSnapshotError
    from monolith_py.snapshot.checkpoint import find_checkpoints

    if os.path.exists(os.path.join(path, "manifest.json")):
        return path
    found = find_checkpoints(path)
    if not found:
        raise NoValidSnapshotError(f"no checkpoint in {path}")
    return found[0]


def _ckpt_save(args: argparse.Namespace) -> int:
    from monolith_py.errors import NoValidSnapshotError
    from monolith_py.snapshot.checkpoint import write_checkpoint
    from monolith_py.snapshot.recovery import Recovery
    from monolith_py.snapshot.smp import smp_clients

    rec = Recovery(smp_clients(_addresses(args.smp_group)), job=args.job)
    cat = rec.catalog()
    sid = args.snapshot if args.snapshot is not None else max(cat.manifests, default=None)
    if sid is None or sid not in cat.manifests:
        raise NoValidSnapshotError(f"no sealed snapshot {sid!r} in the group "
                                   f"({'; '.join(cat.problems) or 'catalogs empty'})")
    path = write_checkpoint(args.out, cat.manifests[sid], rec)
    rec.close()
    print(json.dumps({"event": "saved", "path": path, "snapshot_id": sid}), flush=True)
    return 0


def _ckpt_inspect(args: argparse.Namespace) -> int:
    from monolith_py.snapshot.checkpoint import load_checkpoint

    path = _resolve(args.path)
    ck = load_checkpoint(path)
    out: dict[str, Any] = {
        "path": path, "job": ck.job, "snapshot_id": ck.snapshot_id, "step": ck.step,
        "source_shards": ck.num_shards,
        "tables": {n: {"keys": int(t["keys"].shape[0]), "dim": t["meta"]["dim"],
                       "optimizer": t["meta"]["optimizer"]} for n, t in ck.tables.items()},
        "trainers": {r: {"offsets": s.get("offsets"), "ledger": s.get("ledger")}
                     for r, (s, _) in ck.trainers.items()},
    }
    if args.num_shards:
        import numpy as np

        from monolith_py.ps.routing import shard_of

        out["spread"] = {n: np.bincount(shard_of(t["keys"], args.num_shards),
                                        minlength=args.num_shards).tolist()
                         for n, t in ck.tables.items()}
    if args.json:
        print(json.dumps(out, default=str))
    else:
        for k, v in out.items():
            print(f"{k:>14}  {v}")
    return 0


def _ckpt_restore(args: argparse.Namespace) -> int:
    from monolith_py.errors import ConfigError
    from monolith_py.snapshot.participant import ParticipantClient

    addrs = _addresses(args.ps)
    if len(addrs) != args.num_shards:
        raise ConfigError(f"--num-shards {args.num_shards} but --ps lists {len(addrs)} shards")
    path = os.path.abspath(_resolve(args.path))
    results = []
    for i, a in enumerate(addrs):
        client = ParticipantClient(f"ps/{i}", a, timeout_s=600.0)
        try:
            results.append(client.load_checkpoint(path))
        finally:
            client.close()
    print(json.dumps({"event": "restored", "path": path, "shards": results}), flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(0)
