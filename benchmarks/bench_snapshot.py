"""``monolith bench snapshot``: in-memory snapshots of a >= 1 GB PS shard to 3 real SMP
processes (k=2, m=3), beside torch.save / DCP / torch.load of the same state, in one run.

Workload: one PS shard (this process) holding one table of ``--state-mb`` of state (dim 64,
Adagrad: weights + one slot + 32 B of metadata per row); a trainer-like loop: each step
pulls (``train=True``) and pushes ``--batch-keys`` Zipf(``--zipf``)-distributed keys (hot
keys scattered over the arena by a random permutation) and runs the dense part of
``monolith bench train``'s model (top MLP 432-256-64-1 on a batch of 4096, Adam; off with
``--no-dense``, which makes a sparse-only loop that touches far more rows per second than
any trainer). Three ``monolith smp`` processes on loopback are the hosts; the shard's
participant writes into its host's SMP.

Reported:

* ``stall_ms``: median time the shard lock is held by an incremental capture taken
  ``--interval-s`` seconds after the previous one (training is blocked only for that);
  ``stall_ms_per_gb``; ``full_stall_ms``: the first (full) capture.
* ``overhead_pct``: training throughput lost with a snapshot every ``--interval-s`` vs
  none; the two modes alternate in windows of ``--window-s`` in ABBA order (none, snap,
  snap, none, ...: a throughput drift over the run, which this VM shows, cancels in the
  means of the windows; ``overhead_pct_median`` compares the medians),
  after ``--warmup-snapshots`` (two compaction cycles: the SMPs then recycle the segments
  freed by retention, as a long-running job's do) and ``--warmup-windows`` unmeasured
  rounds of the window pattern, once the SMPs are idle. A window with snapshots starts
  in step: one snapshot is taken and its work done before the window's clock starts (the
  increment after a window without snapshots holds that window's changes too, 3-4x a
  steady one, which a job that snapshots every ``--interval-s`` never takes); the window
  then snapshots every ``--interval-s``, ``--window-s``/``--interval-s`` times (the last
  at its end), and goes on training (taking no new snapshot) until the SMPs finished the
  work its snapshots left (``snapshot_window_tail_s``), so none of it lands in the next
  window without. ``snapshots_per_window``: the snapshots each window was charged.
* ``smp_cpu_s_per_snapshot``, ``smp_cpu_pct_of_machine``: CPU the three SMP processes
  used in the windows (per snapshot; as a share of all cores, per mode): the work the
  overhead comes from when the "hosts" share the training's cores.
  ``smp_handler_cpu_s``: of it, per SMP and RPC, the CPU spent in request handlers (e.g.
  ``Lease``: creating and faulting in segments; ``PutBlock``: receiving blocks);
  ``smp_new_segment_mb``: per SMP, the shared memory it created (rather than recycled)
  in those windows.
* ``incremental_bytes_ratio``: increment part size after ``--interval-s`` of training /
  full part size (the same steady-state snapshots as ``stall_ms``).
* ``encode_mb_per_s``: parity of the full part (k=2, m=3, one thread) as the SMPs make it
  (``codec.ParityEncoder``: zfec's code, bytes identical); anchor ``encode_zfec_mb_per_s``:
  ``zfec.Encoder`` on the same bytes.
* ``restore_local_s``: rebuild the newest snapshot (its full part and increments, mapped
  from the local SMP) and load it into a new shard, at the longest chain between two
  compactions (snapshots go on after the windows until the chain is ``--full-every``
  parts long: the worst case); ``restore_ec_s``: the same with the
  local host gone (blocks fetched from the two others and decoded). Both compose straight
  into the new shard's tables (as ``PSParticipant.restore`` does) and include building
  the cuckoo index; ``shard_start_s`` is the restarted shard's table allocation before
  the restore (arena pages are mapped when a table is created, restore or not);
  ``restore_local_log``/``restore_ec_log``: where each part came from. Restores start once
  no SMP has background work (a compaction) queued or running.
  ``restore_chain_parts`` and ``restore_read_mb``: the parts the restore read (the newest
  full part, composed by the SMP every ``--full-every`` increments, and the increments
  since) and their bytes: a restore reads more than the state between two compactions.
* ``disk_checkpoint_s``: universal checkpoint of the newest snapshot (read from the SMPs,
  written with fsync). Anchors on the same state (a dict of tensors): ``torch_save_s``
  (+ fsync), ``dcp_save_s`` (``torch.distributed.checkpoint.save``), ``torch_load_s``
  (``weights_only=True``).
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import tempfile
import time
from typing import Any

from benchmarks._common import run_and_emit

__all__ = ["register", "run"]


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("snapshot", help="in-memory EC snapshots vs torch.save / DCP")
    p.add_argument("--state-mb", type=int, default=1024, help="table state size (MiB)")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch-keys", type=int, default=4096, help="keys per training step")
    p.add_argument("--zipf", type=float, default=1.05)
    p.add_argument("--no-dense", dest="dense", action="store_false",
                   help="sparse steps only (no dense compute per step)")
    p.add_argument("--interval-s", type=float, default=10.0, help="seconds between snapshots")
    p.add_argument("--window-s", type=float, default=30.0,
                   help="length of each with/without-snapshot window")
    p.add_argument("--windows", type=int, default=6,
                   help="windows per mode (even: the ABBA order is balanced; 6 charge about "
                        "two compactions to the snapshot windows, one every 8 snapshots)")
    p.add_argument("--keep", type=int, default=1,
                   help="sealed snapshots each SMP retains (1, the least memory: with the "
                        "default --keep-free-mb the bench peaked at 11 GB of /dev/shm for "
                        "1 GiB of state)")
    p.add_argument("--full-every", type=int, default=8,
                   help="SMP composes a full part after this many increments (0: never)")
    p.add_argument("--keep-free-mb", type=int, default=None,
                   help="MiB of freed segments each SMP keeps mapped for reuse (default: 5x "
                        "--state-mb, a home SMP's turnover in a compaction cycle with room "
                        "for the leases grown in a pause; new shared memory faults in at up "
                        "to 3 s/GiB on a VM: without reuse that is most of the SMPs' CPU)")
    p.add_argument("--warmup-snapshots", type=int, default=None,
                   help="snapshots every --interval-s before the measured windows (default: "
                        "two compaction cycles and one more snapshot, the SMPs' steady "
                        "state: a compaction reuses the segment of the full part before "
                        "last, which exists from the second one on)")
    p.add_argument("--warmup-windows", type=int, default=1,
                   help="unmeasured rounds of 4 windows (none, snap, snap, none) after the "
                        "warm-up snapshots")
    p.add_argument("--smp-nice", type=int, default=10,
                   help="nice increment of the SMPs' background (coding, placement) threads")
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--m", type=int, default=3)
    p.add_argument("--workdir", default=None, help="for checkpoints (default: a temp dir)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_and_emit(run))


def _fsync_tree(path: str) -> None:
    for root, _, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(root, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


class _Load:
    """Zipf keys over the table, hot keys scattered by a permutation."""

    def __init__(self, rows: int, args: argparse.Namespace) -> None:
        import numpy as np

        self.rng = np.random.default_rng(args.seed)
        self.perm = self.rng.permutation(rows).astype(np.int64)
        self.rows, self.b, self.a, self.dim = rows, args.batch_keys, args.zipf, args.dim
        self.grads = self.rng.standard_normal((self.b, self.dim)).astype(np.float32) * 1e-3
        self.dense = None
        if args.dense:
            import torch

            torch.manual_seed(args.seed)
            self.dense = torch.nn.Sequential(
                torch.nn.Linear(432, 256), torch.nn.ReLU(), torch.nn.Linear(256, 64),
                torch.nn.ReLU(), torch.nn.Linear(64, 1))
            self.opt = torch.optim.Adam(self.dense.parameters(), lr=1e-3)
            self.x = torch.randn(4096, 432)

    def step(self, shard: Any, now: int) -> None:
        import numpy as np

        r = self.rng.zipf(self.a, self.b) - 1
        keys = np.unique(self.perm[r[r < self.rows]])
        shard.pull("t", keys, train=True)
        if self.dense is not None:
            self.opt.zero_grad()
            self.dense(self.x).sum().backward()
            self.opt.step()
        shard.push("t", keys, self.grads[: keys.shape[0]], now)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import zfec

    from benchmarks._common import machine_info
    from monolith_py.ps import PSShard
    from monolith_py.snapshot.checkpoint import write_checkpoint
    from monolith_py.snapshot.codec import STRIPE_BYTES, ParityEncoder, block_size, data_block
    from monolith_py.snapshot.coordinator import SnapshotCoordinator
    from monolith_py.snapshot.participant import PSParticipant
    from monolith_py.snapshot.recovery import Recovery
    from monolith_py.snapshot.smp import smp_clients
    from monolith_py.table import OptimizerConfig, TableConfig
    from monolith_py.testing.hosts import LocalCluster

    if args.keep_free_mb is None:
        args.keep_free_mb = 5 * args.state_mb
    row_bytes = args.dim * 4 * 2 + 32
    rows = args.state_mb * (1 << 20) // row_bytes
    cfg = TableConfig("t", dim=args.dim, optimizer=OptimizerConfig("adagrad", lr=0.05),
                      initial_capacity=rows + 1024)
    out: dict[str, Any] = {"bench": "snapshot", "machine": machine_info(),
                           "load_avg_start": os.getloadavg()[0], "rows": rows, "dim": args.dim,
                           "k": args.k, "m": args.m, "interval_s": args.interval_s,
                           "keep": args.keep, "full_every": args.full_every,
                           "dense": bool(args.dense), "zipf": args.zipf,
                           "batch_keys": args.batch_keys, "keep_free_mb": args.keep_free_mb}
    t0 = time.perf_counter()
    shard = PSShard(0, 1, [cfg])
    chunk = 1 << 18
    rng = np.random.default_rng(args.seed)
    for lo in range(0, rows, chunk):
        n = min(chunk, rows - lo)
        with shard.lock:
            shard.tables["t"].load_rows(np.arange(lo, lo + n, dtype=np.int64),
                                        rng.standard_normal((n, args.dim)).astype(np.float32))
    out["build_s"] = time.perf_counter() - t0
    state_bytes = rows * row_bytes
    out["state_mb"] = state_bytes / (1 << 20)
    load = _Load(rows, args)
    work = args.workdir or tempfile.mkdtemp(prefix="monolith-bench-snapshot-")
    cluster = LocalCluster(3, job="bench", k=args.k, m=args.m, keep=args.keep,
                           full_every=args.full_every, nice=args.smp_nice,
                           keep_free_mb=args.keep_free_mb,
                           workdir=os.path.join(work, "cluster")).start()
    try:
        smps = smp_clients(cluster.smp_addresses, timeout_s=120.0)
        part = PSParticipant(shard, smps[0], 0, group=smps, job="bench")
        coord = SnapshotCoordinator("bench", smps, [part], timeout_s=600.0,
                                    hosts=cluster.smp_addresses)
        now = [1000]

        tails: list[float] = []

        def train(seconds: float, snapshot_every: float | None
                  ) -> tuple[float, list[tuple[Any, float, float]]]:
            t_start = time.perf_counter()
            steps, t_end = 0, t_start + seconds
            last = time.perf_counter()
            seals = []  # (future, stall s, seconds since the previous snapshot)
            # a window of --window-s takes window/interval snapshots, the last one at its
            # end (the snapshot that opened it is not charged to it): the rate of a job
            # that snapshots every --interval-s
            due = 0 if snapshot_every is None else max(1, round(seconds / snapshot_every))
            while (time.perf_counter() < t_end) if snapshot_every is None else len(seals) < due:
                load.step(shard, now[0])
                now[0] += 1
                steps += 1
                if snapshot_every is not None and time.perf_counter() - last >= snapshot_every:
                    f = coord.snapshot(now[0], background=True)
                    t = time.perf_counter()
                    seals.append((f, part.last["stall_s"], t - last_snap[0]))
                    last = last_snap[0] = t
            if snapshot_every is not None:
                # the window goes on (training, no new snapshot) until the work its
                # snapshots left behind is done: seals, coding, placement, compaction. So
                # all of it is charged to this mode, none to the next window without.
                poll = 0.0
                while True:
                    load.step(shard, now[0])
                    now[0] += 1
                    steps += 1
                    if time.perf_counter() >= poll:
                        if all(f.done() for f, _, _ in seals) and _idle(smps):
                            break
                        poll = time.perf_counter() + 0.25
                tails.append(time.perf_counter() - t_end)
            return steps / (time.perf_counter() - t_start), seals

        last_snap = [time.perf_counter()]

        def settle() -> None:
            """Until every part is shipped and no SMP has background work (a compaction)."""
            part.wait_shipped(600)
            coord.wait_idle(600)
            _wait_idle(smps, 600)

        def in_step() -> None:
            """Start a window with snapshots in step: a snapshot (the increment since the
            one before the last window, which a window without snapshots makes several
            times a steady one), its work done before the window's clock starts; the
            window then snapshots every --interval-s, as a job that snapshots all the
            time does."""
            coord.snapshot(now[0])
            settle()
            last_snap[0] = time.perf_counter()

        # the first snapshot is full (into the segment the participant pre-leased at start)
        part.wait_shipped(600)
        man = coord.snapshot(now[0])
        out["full_stall_ms"] = 1e3 * part.last["stall_s"]
        full_bytes = man.parts["ps/0"].size
        out["full_part_mb"] = full_bytes / (1 << 20)
        part.wait_shipped(600)
        # warm-up: two compaction cycles of snapshots, so the SMPs recycle freed segments
        # as a long-running job's do (new shared memory faults in at up to 3 s/GiB here)
        warmup = args.warmup_snapshots
        if warmup is None:
            warmup = 2 * args.full_every + 1 if args.full_every > 0 else 9
        for _ in range(max(warmup, 1)):
            train(args.interval_s, None)
            coord.snapshot(now[0])
            part.wait_shipped(600)
        # then windows in the measured pattern, unmeasured
        for mode in ["none", "snap", "snap", "none"] * max(args.warmup_windows, 0):
            if mode == "snap":
                in_step()
            train(args.window_s, None if mode == "none" else args.interval_s)
        tails.clear()
        settle()  # the warm-up's compaction is not charged to either mode
        last_snap[0] = time.perf_counter()
        # alternate windows without / with a snapshot every interval
        thr = {"none": [], "snap": []}
        stalls, inc_sizes = [], []
        any_stalls, any_sizes = [], []  # every snapshot (short windows may have no steady one)
        smp_cpu = {"none": 0.0, "snap": 0.0}  # CPU seconds the SMP processes used
        threads: dict[str, float] = {}  # ... by SMP and thread, in the snapshot windows
        pids = [h.procs["smp"].pid for h in cluster.hosts]
        wall = {"none": 0.0, "snap": 0.0}  # seconds in each mode
        new_mb = {h: 0.0 for h in smps}  # new shared memory the SMPs created (snap windows)
        order = []  # ABBA: none, snap, snap, none, ... (a linear drift cancels in the means)
        for i in range(args.windows):
            order += ["none", "snap"] if i % 2 == 0 else ["snap", "none"]
        seals: list[Any] = []
        per_window: list[int] = []  # snapshots charged to each window with snapshots
        for mode in order:
            if mode == "snap":
                in_step()
            c0, w0 = _cpu_s(pids), time.perf_counter()
            if mode == "none":
                thr["none"].append(train(args.window_s, None)[0])
            else:
                before = _threads(smps)
                made = {h: c.stats().get("created_bytes", 0) for h, c in smps.items()}
                t, seals = train(args.window_s, args.interval_s)
                thr["snap"].append(t)
                per_window.append(len(seals))
                for k, v in _threads(smps).items():
                    threads[k] = threads.get(k, 0.0) + v - before.get(k, 0.0)
                for h, c in smps.items():
                    new_mb[h] += (c.stats().get("created_bytes", 0) - made[h]) / (1 << 20)
            smp_cpu[mode] += _cpu_s(pids) - c0
            wall[mode] += time.perf_counter() - w0
            if mode == "none":
                continue
            for f, stall, gap in seals:
                m = f.result(timeout=600)
                any_stalls.append(1e3 * stall)
                if m.parts["ps/0"].kind == "inc":
                    any_sizes.append(m.parts["ps/0"].size)
                if gap < 1.5 * args.interval_s:  # steady state: the previous one was 1 interval ago
                    inc_sizes.append(m.parts["ps/0"].size)
                    stalls.append(1e3 * stall)
        out["smp_thread_cpu_s"] = {k: round(v, 2) for k, v in sorted(
            threads.items(), key=lambda kv: -kv[1]) if v >= 0.05}
        out["snapshot_window_tail_s"] = [round(x, 2) for x in tails]
        out["smp_new_segment_mb"] = {h: round(v) for h, v in new_mb.items()}
        out["window_order"] = order
        out["steps_per_s_windows"] = {k: [round(x, 2) for x in v] for k, v in thr.items()}
        out["steps_per_s_none"] = statistics.mean(thr["none"])
        out["steps_per_s_snapshot"] = statistics.mean(thr["snap"])
        out["overhead_pct"] = 100.0 * (1 - out["steps_per_s_snapshot"] / out["steps_per_s_none"])
        out["overhead_pct_median"] = 100.0 * (1 - statistics.median(thr["snap"]) /
                                              statistics.median(thr["none"]))
        if not stalls:
            stalls, inc_sizes = any_stalls, any_sizes
        out["stall_ms"] = statistics.median(stalls)
        out["stall_ms_max"] = max(stalls)
        out["snapshots_in_windows"] = len(stalls)
        out["snapshots_per_window"] = per_window
        out["stall_ms_per_gb"] = out["stall_ms"] / (state_bytes / (1 << 30))
        out["incremental_bytes_ratio"] = statistics.median(inc_sizes) / full_bytes if inc_sizes else None
        out["smp_cpu_s_per_snapshot"] = smp_cpu["snap"] / max(len(any_stalls), 1)
        out["smp_handler_cpu_s"] = {h: c.stats().get("handler_cpu_s") for h, c in smps.items()}
        out["smp_cpu_pct_of_machine"] = {
            mode: 100.0 * smp_cpu[mode] / (wall[mode] * (os.cpu_count() or 1)) for mode in smp_cpu}
        settle()
        # restores are measured at the longest chain a restore meets between compactions
        # (a composed full part and --full-every - 1 increments): snapshots go on every
        # --interval-s of training until the newest one is there
        newest = coord.last_sealed
        assert newest is not None
        while args.full_every and _chain_parts(smps, newest) < args.full_every:
            train(args.interval_s, None)
            newest = coord.snapshot(now[0])
            settle()  # restores measured without a compaction beside them
        # encode throughput of a full part, one thread (as the SMP does it)
        blob = np.random.default_rng(1).integers(0, 255, full_bytes, dtype=np.uint8)
        # into parity buffers already faulted in (the SMP codes into recycled segments),
        # stripe by stripe; the anchor is zfec's own encoder on the same stripes
        bs = block_size(full_bytes, args.k)
        data = [memoryview(data_block(blob, i, args.k)) for i in range(args.k)]
        parity = [memoryview(np.ones(bs, dtype=np.uint8)) for _ in range(args.m - args.k)]
        ours, theirs = ParityEncoder(args.k, args.m), zfec.Encoder(args.k, args.m)
        stripes = [(lo, min(lo + STRIPE_BYTES, bs)) for lo in range(0, bs, STRIPE_BYTES)]
        ours.encode_into([d[:8] for d in data], [p[:8] for p in parity])  # compiled once
        t = time.perf_counter()
        for lo, hi in stripes:
            ours.encode_into([d[lo:hi] for d in data], [p[lo:hi] for p in parity])
        out["encode_mb_per_s"] = full_bytes / (1 << 20) / (time.perf_counter() - t)
        t = time.perf_counter()
        for lo, hi in stripes:
            theirs.encode([d[lo:hi] for d in data], tuple(range(args.k, args.m)))
        out["encode_zfec_mb_per_s"] = full_bytes / (1 << 20) / (time.perf_counter() - t)
        del blob, data, parity
        # restores: free the live table first (a crashed PS has no table either)
        coord.close()
        part.close()
        del shard, part, coord, load
        gc.collect()
        state_gb = state_bytes / (1 << 30)
        for name, sources, local in (("restore_local_s", smps, 0),
                                     ("restore_ec_s", {1: smps[1], 2: smps[2]}, None)):
            t = time.perf_counter()
            fresh = PSShard(0, 1, [cfg])  # a restarted PS allocates its tables first
            out["shard_start_s"] = time.perf_counter() - t
            t = time.perf_counter()
            rec = Recovery(sources, local, job="bench", decode_threads=2)
            # as PSParticipant.restore: composed straight into the tables' staged arenas
            r = rec.restore("ps/0", newest.snapshot_id,
                            stage=lambda table, n: fresh.tables[table].staged_state(n))
            fresh.load_state_dict(r.state)
            out[name] = time.perf_counter() - t
            out[name.replace("_s", "_log")] = [line[:300] for line in r.log]
            out[name.replace("_s", "_s_per_gb")] = out[name] / state_gb
            if local is not None:  # the parts the restore read (a full part, increments)
                read = _parts_read(r.log)
                sizes = {(x.snapshot_id, x.kind): x.size for x in newest.chain("ps/0")}
                sizes.update({(sid, kind): x.size for (p_, sid, kind), x in
                              rec.catalog().records.items() if p_ == "ps/0"})
                out["restore_chain_parts"] = len(read)
                out["restore_read_mb"] = sum(sizes[(sid, kind)] for kind, sid in read) / (1 << 20)
            rec.close()
            del r, fresh
            gc.collect()
        # universal checkpoint of the newest snapshot
        ckpt = os.path.join(work, "ckpt")
        rec = Recovery(smps, 0, job="bench")
        t = time.perf_counter()
        path = write_checkpoint(ckpt, newest, rec)
        out["disk_checkpoint_s"] = time.perf_counter() - t
        rec.close()
        # anchors on the same state (tensors)
        import torch
        import torch.distributed.checkpoint as dcp

        from monolith_py.snapshot.checkpoint import load_checkpoint

        uni = load_checkpoint(path)
        t_ = uni.tables["t"]
        sd = {k: torch.from_numpy(v) for k, v in t_.items() if hasattr(v, "dtype")}
        cluster.stop()  # free the SMPs' memory before the anchors
        del uni
        gc.collect()
        f = os.path.join(work, "state.pt")
        t = time.perf_counter()
        torch.save(sd, f)
        _fsync_tree(os.path.dirname(f))
        out["torch_save_s"] = time.perf_counter() - t
        d = os.path.join(work, "dcp")
        t = time.perf_counter()
        dcp.save(sd, checkpoint_id=d)
        _fsync_tree(d)
        out["dcp_save_s"] = time.perf_counter() - t
        del sd
        gc.collect()
        t = time.perf_counter()
        back = torch.load(f, weights_only=True)
        out["torch_load_s"] = time.perf_counter() - t
        del back
        out["load_avg_end"] = os.getloadavg()[0]
        out["targets"] = {"stall_ms_per_gb": 50, "overhead_pct": 2, "restore_local_s_per_gb": 1,
                          "restore_ec_s_per_gb": 3, "incremental_bytes_ratio": 0.2}
        return out
    finally:
        cluster.stop()
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


def _cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds used so far by processes ``pids``."""
    from monolith_py.observe.metrics import proc_cpu_s

    return sum(proc_cpu_s(f"/proc/{pid}/stat") or 0.0 for pid in pids)


def _threads(smps: Any) -> dict[str, float]:
    """``{"h<host>/<thread>": CPU seconds so far}`` of the SMPs (their Stats)."""
    return {f"h{h}/{name}": v for h, c in smps.items()
            for name, v in (c.stats().get("thread_cpu_s") or {}).items()}


def _idle(smps: Any) -> bool:
    """No SMP has background work queued or running."""
    return all(not s.get("pending_jobs") and not s.get("busy")
               for s in (c.stats() for c in smps.values()))


def _wait_idle(smps: Any, timeout_s: float) -> None:
    """Until :func:`_idle` (polled)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _idle(smps):
            return
        time.sleep(0.2)


def _chain_parts(smps: Any, man: Any) -> int:
    """The parts a restore of ``man`` reads (see ``recovery.composed_chain``)."""
    from monolith_py.snapshot.recovery import Recovery, composed_chain

    rec = Recovery(smps, 0, job=man.job)
    try:
        composed = composed_chain(rec.catalog().records, man, "ps/0")
    finally:
        rec.close()
    return len(composed if composed is not None else list(man.chain("ps/0")))


def _parts_read(log: list[str]) -> list[tuple[str, int]]:
    """``(kind, snapshot id)`` of each part a restore read, from its recovery log."""
    import re

    found = (re.search(r"(full|inc) part of snapshot (\d+):", line) for line in log)
    return [(m.group(1), int(m.group(2))) for m in found if m is not None]
