"""``monolith bench ps``: the bench-train model trained through 2 PS shard processes over
gRPC (loopback) against the same model with in-process tables, measured in one run.

Workload: ``monolith bench train``'s (26 sparse features, Zipf ids over 1 M values, 13
dense, dim 16, batch 4096, DLRM with concat interaction, row-wise Adagrad on the rows,
Adagrad on the dense layers); the data and model builders are imported from
``benchmarks.bench_train``.

* ``inproc_examples_per_s``: the embedded default (in-process tables, no RPC).
* ``rpc_examples_per_s``: 2 ``monolith ps`` processes, one trainer (this process) with a
  :class:`~monolith_py.ps.PSClient`; the shards and the trainer share the machine's cores.
* ``inproc_backend_ms`` / ``rpc_backend_ms``: per step, the time spent inside the
  sparse backend's calls (lookup, apply_gradients, and for RPC the wait for the push):
  the part of the step that RPC changes, less sensitive to the dense part's noise.
* ``ratio`` = rpc / inproc. The two kinds of steps are interleaved (one of each in turn)
  so a busy machine slows both alike; medians are reported.
* ``pull_mkeys_per_s`` / ``push_mkeys_per_s``: raw client throughput on the warm shards:
  read-only pulls and pushes of ``--raw-keys`` keys per call spread over the 26 tables.
"""

from __future__ import annotations

import argparse
from typing import Any

from benchmarks._common import run_and_emit

__all__ = ["register", "run"]


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "ps", help="training through 2 PS shards over gRPC vs in-process tables")
    p.add_argument("--steps", type=int, default=12, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=8, help="untimed steps first")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--features", type=int, default=26)
    p.add_argument("--num-dense", type=int, default=13)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--ids", type=int, default=1_000_000, help="id space per feature")
    p.add_argument("--zipf", type=float, default=1.05)
    p.add_argument("--lr", type=float, default=0.05, help="row-wise Adagrad learning rate")
    p.add_argument("--initial-capacity", type=int, default=1 << 16)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--raw-keys", type=int, default=200_000,
                   help="keys per raw pull/push call")
    p.add_argument("--raw-calls", type=int, default=10)
    p.add_argument("--torch-threads", type=int, default=0,
                   help="torch intra-op threads of the trainer (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_and_emit(run))


def _job_args(args: argparse.Namespace, names: list[str]) -> list[str]:
    return [
        "--features", ",".join(names), "--dim", str(args.dim),
        "--set", 'table_defaults.optimizer.kind="rowwise_adagrad"',
        "--set", f"table_defaults.optimizer.lr={args.lr}",
        "--set", f"table_defaults.seed={args.seed}",
        "--set", f"table_defaults.initial_capacity={args.initial_capacity}",
    ]


class _Timed:
    """A SparseBackend proxy adding up the seconds spent in the backend's calls."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.seconds = 0.0

    def call(self, fn: Any, *a: Any) -> Any:
        import time

        t0 = time.perf_counter()
        try:
            return fn(*a)
        finally:
            self.seconds += time.perf_counter() - t0

    def lookup(self, keys: Any, train: bool) -> Any:
        return self.call(self.inner.lookup, keys, train)

    def apply_gradients(self, grads: Any, now: int) -> None:
        self.call(self.inner.apply_gradients, grads, now)

    def evict_expired(self, now: int) -> Any:
        return self.call(self.inner.evict_expired, now)

    def stats(self) -> Any:
        return self.inner.stats()


def run(args: argparse.Namespace) -> dict[str, Any]:
    import os
    import statistics
    import time

    import numpy as np
    import torch
    import torch.nn.functional as F

    from benchmarks._common import machine_info
    from benchmarks.bench_train import _model, _rowwise_adagrad, _zipf_batches
    from monolith_py.modules import DynamicEmbeddingBagCollection
    from monolith_py.ps import ClientOptions, PSClient
    from monolith_py.ps.launch import ShardProcesses
    from monolith_py.table import TableConfig

    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    steps, warmup = int(args.steps), int(args.warmup)
    train_args = argparse.Namespace(seed=args.seed, ids=args.ids, zipf=args.zipf,
                                    features=args.features, batch_size=args.batch_size,
                                    num_dense=args.num_dense, dim=args.dim)
    data = _zipf_batches(train_args, steps + warmup)
    names = [f"f{i}" for i in range(args.features)]
    # table i serves feature f{i}; the shards build the same configs from the flags
    configs = [TableConfig(name=n, dim=args.dim, feature_names=(n,),
                           optimizer=_rowwise_adagrad(args.lr), seed=args.seed,
                           initial_capacity=args.initial_capacity) for n in names]

    with ShardProcesses(args.shards, _job_args(args, names)) as shards:
        client = PSClient(shards.addresses, configs, ClientOptions(deadline_s=300))
        sides = {}
        from monolith_py.table import EmbeddingTable
        from monolith_py.table.backend import LocalBackend

        local = LocalBackend({c.name: EmbeddingTable(c) for c in configs})
        timed = {"inproc": _Timed(local), "rpc": _Timed(client)}
        for side in ("inproc", "rpc"):
            ebc = DynamicEmbeddingBagCollection(configs, backend=timed[side])
            model = _model(ebc, train_args)
            sides[side] = (ebc, model, torch.optim.Adagrad(model.parameters(), lr=0.01))

        def step(side: str, kjt: Any, dense: Any, labels: Any, now: int) -> None:
            ebc, model, opt = sides[side]
            loss = F.binary_cross_entropy_with_logits(model(dense, kjt), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ebc.apply_sparse_gradients(now)

        times: dict[str, list[float]] = {"inproc": [], "rpc": []}
        sparse: dict[str, list[float]] = {"inproc": [], "rpc": []}
        for i, (kjt, dense, labels) in enumerate(data):
            now = 1_700_000_000 + i
            for side in (("inproc", "rpc") if i % 2 == 0 else ("rpc", "inproc")):
                timed[side].seconds = 0.0
                t0 = time.perf_counter()
                step(side, kjt, dense, labels, now)
                if side == "rpc":
                    timed[side].call(client.flush)  # count the whole push in the step
                if i >= warmup:
                    times[side].append(time.perf_counter() - t0)
                    sparse[side].append(timed[side].seconds)

        rows = {side: sum(int(s["size"]) for s in sides[side][0].sparse_stats().values())
                for side in sides}

        # raw pull/push throughput on warm shards: keys spread over all tables, inserted
        # by an untimed push first (so the timed calls find every key)
        rng = np.random.default_rng(args.seed + 1)
        per_table = max(1, args.raw_keys // args.features)
        keys = {n: torch.from_numpy(np.unique(rng.integers(0, args.ids, per_table)))
                for n in names}
        grads = {n: (k, torch.full((k.shape[0], args.dim), 1e-3)) for n, k in keys.items()}
        keys_per_call = sum(int(k.shape[0]) for k in keys.values())
        client.apply_gradients(grads, 1_800_000_000)
        client.flush()
        pull_t: list[float] = []
        push_t: list[float] = []
        for c in range(args.raw_calls):
            t0 = time.perf_counter()
            client.lookup(keys, train=False)
            t1 = time.perf_counter()
            client.apply_gradients(grads, 1_800_000_001 + c)
            client.flush()
            t2 = time.perf_counter()
            pull_t.append(t1 - t0)
            push_t.append(t2 - t1)
        client.close()

    inproc_s = statistics.median(times["inproc"])
    rpc_s = statistics.median(times["rpc"])
    out: dict[str, Any] = {
        "inproc_examples_per_s": round(args.batch_size / inproc_s, 1),
        "rpc_examples_per_s": round(args.batch_size / rpc_s, 1),
        "ratio": round(inproc_s / rpc_s, 3),
        "pull_mkeys_per_s": round(keys_per_call / statistics.median(pull_t) / 1e6, 2),
        "push_mkeys_per_s": round(keys_per_call / statistics.median(push_t) / 1e6, 2),
        "inproc_step_ms": round(inproc_s * 1e3, 2),
        "rpc_step_ms": round(rpc_s * 1e3, 2),
        "inproc_backend_ms": round(statistics.median(sparse["inproc"]) * 1e3, 2),
        "rpc_backend_ms": round(statistics.median(sparse["rpc"]) * 1e3, 2),
        "raw_keys_per_call": keys_per_call,
        "shards": args.shards,
        "batch_size": args.batch_size,
        "features": args.features,
        "dim": args.dim,
        "steps": steps,
        "warmup": warmup,
        "rows_inproc": rows["inproc"],
        "rows_rpc": rows["rpc"],
        "torch_threads": torch.get_num_threads(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "machine": machine_info(),
    }
    return out
