"""``monolith bench train``: training-step speed of our collisionless embedding module
against TorchRec's ``FusedEmbeddingBagCollection`` (fbgemm TBE, fused optimizer) on the
same DLRM-style model, measured in one run.

Workload (the issue's): 26 sparse features, each one id per example drawn from a Zipf law
over 1 M values; 13 dense features; batch 4096; dim 16; bottom MLP 13->128->16; concat
interaction; top MLP 432->256->64->1; row-wise Adagrad for the embeddings (both sides) and
Adagrad for the dense layers. TorchRec's tables hold every possible id (26 x 1 M rows);
ours grow to the ids actually seen.

Timing: the three step kinds (ours, TorchRec, dense-only) are interleaved step by step so
a busy machine slows them alike; medians over the timed steps are reported. ``dense_ms``
is a step of the same dense model on a fixed embedding input (forward, backward, optimizer);
``sparse_ms = step_ms - dense_ms`` for each side.
"""

from __future__ import annotations

import argparse
from typing import Any

from benchmarks._common import run_and_emit

__all__ = ["register", "run"]


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "train", help="training step: our embedding module vs TorchRec FusedEBC (same model)"
    )
    p.add_argument("--steps", type=int, default=30, help="timed steps per side (default 30)")
    p.add_argument("--warmup", type=int, default=20,
                   help="untimed steps first (default 20: the tables fill up, as in a running job)")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--features", type=int, default=26)
    p.add_argument("--num-dense", type=int, default=13)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--ids", type=int, default=1_000_000, help="id space per feature")
    p.add_argument("--zipf", type=float, default=1.05, help="Zipf exponent of the ids")
    p.add_argument("--lr", type=float, default=0.05, help="row-wise Adagrad learning rate")
    p.add_argument("--initial-capacity", type=int, default=1 << 16,
                   help="rows our tables allocate up front (they grow past it; TorchRec's hold "
                        "all --ids rows)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads (0: torch's default, one per core)")
    p.add_argument("--no-torchrec", action="store_true", help="skip the TorchRec anchor")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_and_emit(run))


def _zipf_batches(args: argparse.Namespace, n: int) -> list[Any]:
    import numpy as np
    import torch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    rng = np.random.default_rng(args.seed)
    ranks = np.arange(1, args.ids + 1, dtype=np.float64)
    cdf = np.cumsum(ranks ** -args.zipf)
    cdf /= cdf[-1]
    # A fixed random id for each popularity rank (per feature), so hot ids are scattered.
    perms = [rng.permutation(args.ids) for _ in range(args.features)]
    keys = [f"f{i}" for i in range(args.features)]
    b = args.batch_size
    out = []
    for _ in range(n):
        ids = np.concatenate(
            [perms[f][np.searchsorted(cdf, rng.random(b))] for f in range(args.features)]
        ).astype(np.int64)
        kjt = KeyedJaggedTensor(
            keys=keys,
            values=torch.from_numpy(ids),
            lengths=torch.ones(args.features * b, dtype=torch.int64),
            stride=b,
        )
        dense = torch.from_numpy(rng.standard_normal((b, args.num_dense)).astype(np.float32))
        labels = torch.from_numpy((rng.random(b) < 0.25).astype(np.float32))
        out.append((kjt, dense, labels))
    return out


def _model(embedding: Any, args: argparse.Namespace) -> Any:
    import torch

    from monolith_py.modules import DLRM

    torch.manual_seed(args.seed)  # identical dense initialization on both sides
    return DLRM(embedding, args.num_dense, bottom_mlp=(128, args.dim), top_mlp=(256, 64),
                interaction="cat")


def run(args: argparse.Namespace) -> dict[str, Any]:
    import logging
    import statistics
    import time

    import numpy as np
    import torch
    import torch.nn.functional as F

    from benchmarks._common import machine_info
    from monolith_py.modules import DynamicEmbeddingBagCollection
    from monolith_py.table import TableConfig

    if args.threads > 0:
        import numba

        torch.set_num_threads(args.threads)
        numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    steps, warmup = int(args.steps), int(args.warmup)
    data = _zipf_batches(args, steps + warmup)
    names = [f"f{i}" for i in range(args.features)]

    # ours
    configs = [
        TableConfig(
            name=f"t{i}", dim=args.dim, feature_names=(names[i],),
            optimizer=_rowwise_adagrad(args.lr), seed=args.seed,
            initial_capacity=args.initial_capacity,
        )
        for i in range(args.features)
    ]
    ours_ebc = DynamicEmbeddingBagCollection(configs)
    ours = _model(ours_ebc, args)
    ours_opt = torch.optim.Adagrad(ours.parameters(), lr=0.01)

    # TorchRec anchor
    trec = trec_opt = None
    if not args.no_torchrec:
        import torchrec.optim as trec_optim
        from torchrec.modules.embedding_configs import EmbeddingBagConfig
        from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection

        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.WARNING)  # fbgemm logs its whole config at INFO on the root logger
        try:
            fused = FusedEmbeddingBagCollection(
                [EmbeddingBagConfig(name=f"t{i}", embedding_dim=args.dim, num_embeddings=args.ids,
                                    feature_names=[names[i]]) for i in range(args.features)],
                optimizer_type=trec_optim.RowWiseAdagrad,
                optimizer_kwargs={"lr": args.lr},
            )
        finally:
            root.setLevel(level)
        trec = _model(fused, args)
        trec_opt = torch.optim.Adagrad(trec.parameters(), lr=0.01)

    # dense-only reference: the same dense model on a fixed embedding input
    dense_model = _model(ours_ebc, args)
    dense_opt = torch.optim.Adagrad(dense_model.parameters(), lr=0.01)
    fixed_emb = torch.randn(args.batch_size, args.features * args.dim, requires_grad=True)

    def ours_step(kjt: Any, dense: Any, labels: Any, now: int) -> None:
        loss = F.binary_cross_entropy_with_logits(ours(dense, kjt), labels)
        ours_opt.zero_grad(set_to_none=True)
        loss.backward()
        ours_opt.step()
        ours_ebc.apply_sparse_gradients(now)

    def trec_step(kjt: Any, dense: Any, labels: Any) -> None:
        assert trec is not None and trec_opt is not None
        loss = F.binary_cross_entropy_with_logits(trec(dense, kjt), labels)
        trec_opt.zero_grad(set_to_none=True)
        loss.backward()
        trec_opt.step()

    def dense_step(dense: Any, labels: Any) -> None:
        assert dense_model.bottom is not None
        x = torch.cat([dense_model.bottom(dense), fixed_emb], dim=1)
        loss = F.binary_cross_entropy_with_logits(dense_model.top(x).squeeze(1), labels)
        dense_opt.zero_grad(set_to_none=True)
        loss.backward()
        dense_opt.step()

    t_ours: list[float] = []
    t_trec: list[float] = []
    t_dense: list[float] = []
    t_fwd: list[float] = []
    uniques: list[int] = []
    new_ids: list[int] = []
    prev_rows = 0

    def table_rows() -> int:
        return sum(int(s.get("size", 0)) for s in ours_ebc.sparse_stats().values())

    for i, (kjt, dense, labels) in enumerate(data):
        now = 1_700_000_000 + i
        t0 = time.perf_counter()
        ours_step(kjt, dense, labels, now)
        t1 = time.perf_counter()
        if trec is not None:
            trec_step(kjt, dense, labels)
        t2 = time.perf_counter()
        dense_step(dense, labels)
        t3 = time.perf_counter()
        with torch.no_grad():  # forward-only timing of our module (read-only lookup)
            ours_ebc.eval()
            ours_ebc(kjt)
            ours_ebc.train()
        t4 = time.perf_counter()
        if i >= warmup:
            t_ours.append(t1 - t0)
            t_trec.append(t2 - t1)
            t_dense.append(t3 - t2)
            t_fwd.append(t4 - t3)
            v = kjt.values().view(args.features, -1)
            uniques.append(sum(int(torch.unique(v[f]).numel()) for f in range(args.features)))
        rows_now = table_rows()
        if i >= warmup:
            new_ids.append(rows_now - prev_rows)
        prev_rows = rows_now

    ms = 1000.0
    ours_ms = statistics.median(t_ours) * ms
    dense_ms = statistics.median(t_dense) * ms
    rows = table_rows()
    out: dict[str, Any] = {
        "ours_step_ms": round(ours_ms, 2),
        "torchrec_ebc_step_ms": None,
        "ratio": None,
        "examples_per_s": round(args.batch_size / (ours_ms / ms), 1),
        "ours_sparse_ms": round(ours_ms - dense_ms, 2),
        "ours_dense_ms": round(dense_ms, 2),
        "torchrec_sparse_ms": None,
        "torchrec_dense_ms": round(dense_ms, 2),
        "ours_eval_lookup_ms": round(statistics.median(t_fwd) * ms, 2),
        "torchrec_examples_per_s": None,
        "batch_size": args.batch_size,
        "features": args.features,
        "dim": args.dim,
        "ids_per_step": args.batch_size * args.features,
        "unique_ids_per_step": int(np.median(uniques)),
        "new_ids_per_step": int(np.median(new_ids)),
        "rows_after": rows,
        "steps": steps,
        "warmup": warmup,
        "zipf": args.zipf,
        "sparse_optimizer": "rowwise_adagrad",
        "torch_threads": torch.get_num_threads(),
        "machine": machine_info(),
    }
    if trec is not None:
        trec_ms = statistics.median(t_trec) * ms
        out.update(
            torchrec_ebc_step_ms=round(trec_ms, 2),
            ratio=round(ours_ms / trec_ms, 3),
            torchrec_sparse_ms=round(trec_ms - dense_ms, 2),
            torchrec_examples_per_s=round(args.batch_size / (trec_ms / ms), 1),
        )
    return out


def _rowwise_adagrad(lr: float) -> Any:
    from monolith_py.table import OptimizerConfig

    return OptimizerConfig(kind="rowwise_adagrad", lr=lr)
