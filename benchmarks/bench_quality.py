"""``monolith bench quality``: progressive AUC of the MovieLens replay with three embedding
strategies under the same model, optimizer family, learning rates and seeds.

* ``collisionless`` -- ours: :class:`DynamicEmbeddingBagCollection`, one growing table per
  feature, every id its own row.
* ``hashed`` -- TorchRec ``EmbeddingBagCollection`` with the hashing trick: ids modulo
  ``--hashed-rows`` rows per table, by default as many rows as ours used for that table
  (the same memory; ``collision_rate_hashed``: the share of distinct ids that share their
  row with another id).
* ``mch`` -- TorchRec ``ManagedCollisionEmbeddingBagCollection``
  (``MCHManagedCollisionModule``, LFU eviction) whose ``zch_size`` per table is the number
  of rows ours ended up using (the same row budget); ids without a slot share the module's
  last row until an eviction round gives them one.

Every variant replays the ratings in timestamp order, scores each batch before training on
it (:class:`OnlineTrainer`), and trains embeddings and dense layers with Adagrad (embedding
rows at ``--lr``, dense layers at ``--dense-lr``); embedding rows start uniform in
``[-init_scale, init_scale]``; the dense layers start from the same seed.
"""

from __future__ import annotations

import argparse
from typing import Any

from benchmarks._common import run_and_emit

__all__ = ["register", "run"]


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "quality", help="MovieLens progressive AUC: collisionless vs hashing trick vs TorchRec MCH"
    )
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--lr", type=float, default=0.05, help="Adagrad lr of embedding rows")
    p.add_argument("--dense-lr", type=float, default=0.01, help="Adagrad lr of dense layers")
    p.add_argument("--init-scale", type=float, default=0.05)
    p.add_argument("--hashed-rows", type=int, default=0,
                   help="rows per table of the hashed variant (0: the rows ours used for that "
                        "table -- the same memory for all three)")
    p.add_argument("--mch-eviction-interval", type=int, default=1,
                   help="batches between MCH eviction rounds (1 = its most favourable setting)")
    p.add_argument("--model", choices=("dlrm", "deepfm"), default="dlrm")
    p.add_argument("--limit", type=int, default=None, help="replay only the first N ratings")
    p.add_argument("--data-dir", default=None, help="MovieLens directory (default: examples/data)")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--seeds", type=int, default=1,
                   help="run seeds seed..seed+N-1 and report the mean AUCs (default 1)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_and_emit(run))


def _model(embedding: Any, args: argparse.Namespace, num_dense: int, num_sparse: int) -> Any:
    import torch

    from monolith_py.modules import DLRM, DeepFM

    dims = [args.dim] * num_sparse
    torch.manual_seed(args.seed)  # same dense initialization for every variant
    if args.model == "deepfm":
        return DeepFM(embedding, num_dense, deep_mlp=(64, 32), embedding_dims=dims)
    return DLRM(embedding, num_dense, bottom_mlp=(32, args.dim), top_mlp=(64, 32),
                interaction="dot", embedding_dims=dims)


def _adagrad(model: Any, embedding_params: list[Any], args: argparse.Namespace) -> Any:
    """One torch Adagrad with the embedding rows at ``lr`` and the rest at ``dense_lr``."""
    import torch

    emb_ids = {id(p) for p in embedding_params}
    dense = [p for p in model.parameters() if id(p) not in emb_ids]
    groups = [{"params": dense, "lr": args.dense_lr}]
    if embedding_params:
        groups.append({"params": embedding_params, "lr": args.lr})
    return torch.optim.Adagrad(groups, lr=args.dense_lr)


def _train(model: Any, optimizer: Any, batches: list[Any], transform: Any = None) -> dict[str, Any]:
    import time

    from monolith_py.training import OnlineTrainer, TrainerConfig

    trainer = OnlineTrainer(model, optimizer, TrainerConfig(evict_interval_s=0))
    t0 = time.perf_counter()
    source = batches if transform is None else (transform(b) for b in batches)
    out = trainer.fit(source)
    out["seconds"] = time.perf_counter() - t0
    return out


def _torchrec_tables(names: tuple[str, ...], rows: dict[str, int], dim: int) -> list[Any]:
    from torchrec.modules.embedding_configs import EmbeddingBagConfig

    return [EmbeddingBagConfig(name=f, embedding_dim=dim, num_embeddings=rows[f],
                               feature_names=[f]) for f in names]


def _init_uniform(ebc: Any, scale: float, seed: int) -> list[Any]:
    import torch

    g = torch.Generator().manual_seed(seed)
    params = []
    for bag in ebc.embedding_bags.values():
        with torch.no_grad():
            bag.weight.uniform_(-scale, scale, generator=g)
        params.append(bag.weight)
    return params


def run(args: argparse.Namespace) -> dict[str, Any]:
    """All seeds: the AUC fields are means over seeds, ``per_seed`` lists each run."""
    import statistics

    from benchmarks._common import machine_info
    from monolith_py.datasets import load_movielens

    if args.seeds < 1:
        raise SystemExit("--seeds must be >= 1")
    replay = load_movielens(args.data_dir)
    runs = [
        _one_seed(argparse.Namespace(**{**vars(args), "seed": args.seed + i}), replay)
        for i in range(args.seeds)
    ]
    out = dict(runs[0])
    for key in ("auc_collisionless", "auc_hashed", "auc_mch"):
        out[key] = round(statistics.fmean(r[key] for r in runs), 5)
    for key in ("log_loss", "window_auc"):
        out[key] = {v: round(statistics.fmean(r[key][v] for r in runs), 5)
                    for v in runs[0][key]}
    out["seeds"] = [r["seed"] for r in runs]
    out["per_seed"] = [
        {k: r[k] for k in ("seed", "auc_collisionless", "auc_hashed", "auc_mch")} for r in runs
    ]
    out.pop("seed")
    out["machine"] = machine_info()
    return out


def _one_seed(args: argparse.Namespace, replay: Any) -> dict[str, Any]:
    import dataclasses

    import numpy as np
    import torch
    from torchrec.modules.embedding_modules import EmbeddingBagCollection
    from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingBagCollection
    from torchrec.modules.mc_modules import (
        DistanceLFU_EvictionPolicy,
        ManagedCollisionCollection,
        MCHManagedCollisionModule,
    )

    from monolith_py.batch import Batch
    from monolith_py.datasets import DENSE_FEATURES, SPARSE_FEATURES
    from monolith_py.modules import DynamicEmbeddingBagCollection
    from monolith_py.table import OptimizerConfig, TableConfig

    batches = list(replay.batches(args.batch_size, 0, args.limit))
    n_ex = sum(len(b) for b in batches)
    names = SPARSE_FEATURES
    num_dense = len(DENSE_FEATURES)
    result: dict[str, Any] = {}

    # -- ours: collisionless ----------------------------------------------------------------
    configs = [
        TableConfig(name=f, dim=args.dim, feature_names=(f,),
                    optimizer=OptimizerConfig(kind="adagrad", lr=args.lr),
                    initializer="uniform", init_scale=args.init_scale, seed=args.seed)
        for f in names
    ]
    ebc = DynamicEmbeddingBagCollection(configs)
    model = _model(ebc, args, num_dense, len(names))
    ours = _train(model, _adagrad(model, [], args), batches)
    ours_rows = {name: int(s.get("size", 0)) for name, s in ebc.sparse_stats().items()}

    # -- hashing trick ------------------------------------------------------------------------
    seen = {f: np.unique(replay.features[f].values[: replay.features[f].offsets[n_ex]])
            for f in names}
    hashed_rows = {f: int(args.hashed_rows) or max(1, ours_rows.get(f, 1)) for f in names}
    distinct = sum(int(v.size) for v in seen.values())
    shared = 0
    buckets = 0
    for f, ids in seen.items():
        b, counts = np.unique(ids % hashed_rows[f], return_counts=True)
        buckets += int(b.size)
        shared += int(counts[counts > 1].sum())
    h_ebc = EmbeddingBagCollection(_torchrec_tables(names, hashed_rows, args.dim))
    h_params = _init_uniform(h_ebc, args.init_scale, args.seed)
    h_model = _model(h_ebc, args, num_dense, len(names))
    modulus = torch.tensor([hashed_rows[f] for f in names])

    def hash_ids(b: Batch) -> Batch:
        kjt = b.sparse
        per_value = modulus.repeat_interleave(
            torch.tensor(kjt.length_per_key()), output_size=kjt.values().numel()
        )
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        hashed = KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values() % per_value,
                                   lengths=kjt.lengths(), stride=kjt.stride())
        return dataclasses.replace(b, sparse=hashed)

    hashed = _train(h_model, _adagrad(h_model, h_params, args), batches, hash_ids)

    # -- TorchRec managed collisions, same row budget as ours ----------------------------------
    budget = {f: max(2, ours_rows.get(f, 0)) for f in names}
    m_tables = _torchrec_tables(names, budget, args.dim)
    mcc = ManagedCollisionCollection(
        {
            f: MCHManagedCollisionModule(
                zch_size=budget[f], device=torch.device("cpu"),
                eviction_policy=DistanceLFU_EvictionPolicy(),
                eviction_interval=args.mch_eviction_interval,
            )
            for f in names
        },
        m_tables,
    )
    m_inner = EmbeddingBagCollection(m_tables)
    m_params = _init_uniform(m_inner, args.init_scale, args.seed)
    mc_ebc = ManagedCollisionEmbeddingBagCollection(m_inner, mcc, return_remapped_features=False)
    m_model = _model(mc_ebc, args, num_dense, len(names))
    mch = _train(m_model, _adagrad(m_model, m_params, args), batches)
    mch_used = 0
    for f, mod in mcc._managed_collision_modules.items():
        mch_used += int(budget[f] - 1 - int(mod.open_slots().item()))

    result.update(
        auc_collisionless=round(ours["auc"], 5),
        auc_hashed=round(hashed["auc"], 5),
        auc_mch=round(mch["auc"], 5),
        rows_used={"collisionless": sum(ours_rows.values()), "hashed": buckets, "mch": mch_used},
        hashed_rows=hashed_rows,
        hashed_rows_total=sum(hashed_rows.values()),
        collision_rate_hashed=round(shared / max(distinct, 1), 5),
        mch_zch_size_total=sum(budget.values()),
        mch_eviction_interval=args.mch_eviction_interval,
        log_loss={"collisionless": round(ours["log_loss"], 5),
                  "hashed": round(hashed["log_loss"], 5), "mch": round(mch["log_loss"], 5)},
        window_auc={"collisionless": round(ours["window_auc"], 5),
                    "hashed": round(hashed["window_auc"], 5), "mch": round(mch["window_auc"], 5)},
        seconds={"collisionless": round(ours["seconds"], 2), "hashed": round(hashed["seconds"], 2),
                 "mch": round(mch["seconds"], 2)},
        rows_per_table_collisionless=ours_rows,
        distinct_ids=distinct,
        examples=n_ex,
        batch_size=args.batch_size,
        model=args.model,
        dim=args.dim,
        lr=args.lr,
        dense_lr=args.dense_lr,
        seed=args.seed,
    )
    return result

