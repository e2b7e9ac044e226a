"""DynamicEmbeddingBagCollection: TorchRec layout, gradients vs nn.EmbeddingBag, KJT edge
cases, read-only eval, one deduplicated backend call per step, bad input."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from monolith_py.errors import ConfigError, InvalidInputError, InvalidTypeError
from monolith_py.modules import DynamicEmbeddingBagCollection
from monolith_py.table import EmbeddingTable, OptimizerConfig, TableConfig
from monolith_py.table.backend import LocalBackend

N_IDS = 50  # ids 0..49 in every table


class CountingBackend(LocalBackend):
    """The real LocalBackend, recording the calls it gets."""

    def __init__(self, tables: Mapping[str, EmbeddingTable]) -> None:
        super().__init__(tables)
        self.lookups: list[dict[str, torch.Tensor]] = []
        self.applies: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []

    def lookup(self, keys: Mapping[str, torch.Tensor], train: bool) -> dict[str, torch.Tensor]:
        self.lookups.append({k: v.clone() for k, v in keys.items()})
        return super().lookup(keys, train)

    def apply_gradients(
        self, grads: Mapping[str, tuple[torch.Tensor, torch.Tensor]], now: int
    ) -> None:
        self.applies.append({k: (a.clone(), b.clone()) for k, (a, b) in grads.items()})
        super().apply_gradients(grads, now)


def _configs(opt: OptimizerConfig, dims: tuple[int, int, int] = (4, 4, 4),
             item_pooling: str = "mean") -> list[TableConfig]:
    return [
        TableConfig("user", dim=dims[0], feature_names=("user",), optimizer=opt, seed=1),
        TableConfig("item", dim=dims[1], feature_names=("item", "history"), pooling=item_pooling,
                    optimizer=opt, seed=2),
        TableConfig("ctx", dim=dims[2], feature_names=("ctx",), optimizer=opt, seed=3),
    ]


def _module(opt: OptimizerConfig | None = None, dims: tuple[int, int, int] = (4, 4, 4),
            weighted: bool = False) -> tuple[DynamicEmbeddingBagCollection, CountingBackend]:
    # nn.EmbeddingBag (the reference) supports weights only with sum pooling
    cfgs = _configs(opt or OptimizerConfig("sgd", lr=0.1), dims, "sum" if weighted else "mean")
    backend = CountingBackend({c.name: EmbeddingTable(c) for c in cfgs})
    return DynamicEmbeddingBagCollection(cfgs, backend=backend, is_weighted=weighted), backend


def _initial_rows(backend: LocalBackend) -> dict[str, torch.Tensor]:
    """Insert ids 0..N_IDS-1 everywhere and return their initial rows."""
    keys = torch.arange(N_IDS)
    return {k: v.clone() for k, v in
            backend.lookup({n: keys for n in backend.tables}, train=True).items()}


def _kjt(keys: list[str], lengths: list[list[int]], seed: int = 0,
         weighted: bool = False) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    flat = torch.tensor([x for per_key in lengths for x in per_key], dtype=torch.int64)
    values = torch.randint(0, N_IDS, (int(flat.sum()),), generator=g)
    weights = torch.rand(values.numel(), generator=g) if weighted else None
    return KeyedJaggedTensor(keys=keys, values=values, lengths=flat, weights=weights,
                             stride=len(lengths[0]) if lengths else 0)


def _torchrec_reference(rows: dict[str, torch.Tensor], weighted: bool) -> EmbeddingBagCollection:
    ref = EmbeddingBagCollection(
        [
            EmbeddingBagConfig(name="user", embedding_dim=rows["user"].shape[1],
                               num_embeddings=N_IDS, feature_names=["user"]),
            EmbeddingBagConfig(name="item", embedding_dim=rows["item"].shape[1],
                               num_embeddings=N_IDS, feature_names=["item", "history"],
                               pooling=PoolingType.SUM if weighted else PoolingType.MEAN),
            EmbeddingBagConfig(name="ctx", embedding_dim=rows["ctx"].shape[1],
                               num_embeddings=N_IDS, feature_names=["ctx"]),
        ],
        is_weighted=weighted,
    )
    with torch.no_grad():
        for name, bag in ref.embedding_bags.items():
            bag.weight.copy_(rows[name])
    return ref


LENGTHS = {  # B = 4; empty bags, a long bag, one feature with no ids at all
    "user": [1, 1, 1, 1],
    "item": [1, 0, 1, 1],
    "history": [3, 0, 40, 2],
    "ctx": [0, 0, 0, 0],
}


@pytest.mark.parametrize("dims", [(4, 4, 4), (4, 6, 3)])
@pytest.mark.parametrize("order", [["user", "item", "history", "ctx"],
                                   ["history", "ctx", "user", "item"]])
@pytest.mark.parametrize("weighted", [False, True])
def test_matches_torchrec_ebc_layout_and_values(dims: tuple[int, int, int], order: list[str],
                                                weighted: bool) -> None:
    ebc, backend = _module(dims=dims, weighted=weighted)
    ref = _torchrec_reference(_initial_rows(backend), weighted)
    kjt = _kjt(order, [LENGTHS[k] for k in order], seed=3, weighted=weighted)
    out = ebc(kjt)
    expect = ref(kjt)
    assert out.keys() == expect.keys() == ["user", "item", "history", "ctx"]
    assert out.length_per_key() == expect.length_per_key()
    torch.testing.assert_close(out.values(), expect.values())
    assert (out["ctx"] == 0).all()  # a feature with no ids pools to zeros
    assert (out["history"][1] == 0).all()  # empty bag


@pytest.mark.parametrize(
    "opt",
    [OptimizerConfig("sgd", lr=0.3), OptimizerConfig("adagrad", lr=0.2)],
    ids=["sgd", "adagrad"],
)
@pytest.mark.parametrize("dims", [(4, 4, 4), (4, 6, 3)])
def test_updates_match_dense_embedding_bag_reference(opt: OptimizerConfig,
                                                     dims: tuple[int, int, int]) -> None:
    ebc, backend = _module(opt, dims)
    rows = _initial_rows(backend)
    ref = _torchrec_reference(rows, weighted=False)
    ref_opt = (torch.optim.SGD(ref.parameters(), lr=opt.lr) if opt.kind == "sgd"
               else torch.optim.Adagrad(ref.parameters(), lr=opt.lr, eps=opt.resolved_eps()))
    keys = ["user", "item", "history", "ctx"]
    g = torch.Generator().manual_seed(7)
    target = torch.randn(4, sum(dims[:1]) + 2 * dims[1] + dims[2], generator=g)
    for step in range(3):  # several steps: the Adagrad accumulators must match too
        kjt = _kjt(keys, [LENGTHS[k] for k in keys], seed=10 + step)
        loss = ((ebc(kjt).values() - target) ** 2).sum()
        loss.backward()
        ebc.apply_sparse_gradients(now=1000 + step)
        ref_opt.zero_grad()
        ((ref(kjt).values() - target) ** 2).sum().backward()
        ref_opt.step()
    after = backend.lookup({n: torch.arange(N_IDS) for n in backend.tables}, train=False)
    for name, bag in ref.embedding_bags.items():
        torch.testing.assert_close(after[name], bag.weight.detach(), atol=1e-6, rtol=1e-5)


def test_one_deduplicated_backend_call_per_step_and_shared_tables() -> None:
    ebc, backend = _module()
    _initial_rows(backend)
    backend.lookups.clear()
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["user", "item", "history", "ctx"],
        values=torch.tensor([5, 5, 7, 7, 8, 7, 7, 8, 9, 3]),
        lengths=torch.tensor([1, 1, 1, 1, 2, 3, 1, 0]),
    )
    ebc(kjt).values().sum().backward()
    ebc.apply_sparse_gradients(now=5)
    assert len(backend.lookups) == 1 and len(backend.applies) == 1
    call = backend.lookups[0]
    assert call["user"].tolist() == [5]
    assert call["item"].tolist() == [7, 8, 9]  # item + history deduplicated together
    assert call["ctx"].tolist() == [3]
    keys, grads = backend.applies[0]["item"]
    assert keys.tolist() == [7, 8, 9]
    # d(sum)/d(row), mean pooling: 7 fills two "item" bags alone, and is 1 of 2 and 1 of 3
    # in the "history" bags [8, 7] and [7, 8, 9]
    torch.testing.assert_close(grads[:, 0], torch.tensor([2 + 1 / 2 + 1 / 3, 1 / 2 + 1 / 3, 1 / 3]))


def test_two_forwards_one_apply_sums_gradients() -> None:
    ebc, backend = _module(OptimizerConfig("sgd", lr=1.0))
    rows = _initial_rows(backend)
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["user", "item", "history", "ctx"], values=torch.tensor([4, 1, 2]),
        lengths=torch.tensor([1, 1, 0, 1]),
    )
    (ebc(kjt).values().sum() + ebc(kjt).values().sum()).backward()
    assert ebc.pending_updates == 2
    ebc.apply_sparse_gradients(now=1)
    assert ebc.pending_updates == 0
    after = backend.lookup({"user": torch.tensor([4])}, train=False)["user"]
    torch.testing.assert_close(after, rows["user"][4:5] - 2.0)


def test_eval_and_no_grad_do_not_insert() -> None:
    ebc, backend = _module()
    kjt = _kjt(["user", "item", "history", "ctx"], [LENGTHS[k] for k in LENGTHS])
    ebc.eval()
    out = ebc(kjt)
    assert (out.values() == 0).all()  # unknown ids read zeros
    ebc.train()
    with torch.no_grad():
        ebc(kjt)
    assert ebc.pending_updates == 0
    assert all(s["size"] == 0 for s in backend.stats().values())
    ebc(kjt)
    assert sum(s["size"] for s in backend.stats().values()) > 0


def test_empty_batch_and_no_ids() -> None:
    ebc, backend = _module()
    empty = KeyedJaggedTensor(keys=["user", "item", "history", "ctx"],
                              values=torch.zeros(0, dtype=torch.int64),
                              lengths=torch.zeros(0, dtype=torch.int64), stride=0)
    out = ebc(empty)
    assert out.values().shape == (0, 16)
    no_ids = KeyedJaggedTensor(keys=["user", "item", "history", "ctx"],
                               values=torch.zeros(0, dtype=torch.int64),
                               lengths=torch.zeros(12, dtype=torch.int64), stride=3)
    out = ebc(no_ids)
    assert out.values().shape == (3, 16) and (out.values() == 0).all()
    assert ebc.apply_sparse_gradients(now=1) == 0
    assert backend.lookups == []


def test_very_long_bag_and_int32_ids() -> None:
    ebc, backend = _module()
    rows = _initial_rows(backend)
    ids = torch.arange(20_000, dtype=torch.int32) % N_IDS
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["user", "item", "history", "ctx"], values=ids,
        lengths=torch.tensor([0, 0, 0, 0, 20_000, 0, 0, 0]),
    )
    out = ebc(kjt)
    expect = rows["item"][ids.long()].mean(0)
    torch.testing.assert_close(out["history"][0], expect, atol=1e-5, rtol=1e-5)


def _good() -> KeyedJaggedTensor:
    return KeyedJaggedTensor.from_lengths_sync(
        keys=["user", "item", "history", "ctx"], values=torch.tensor([1, 2, 3, 4]),
        lengths=torch.tensor([1, 1, 1, 0, 0, 1, 0, 0]),
    )


@pytest.mark.parametrize(
    ("kjt", "error", "match"),
    [
        (KeyedJaggedTensor(keys=["user", "item", "history", "ctx", "oops"],
                           values=torch.tensor([1]), lengths=torch.tensor([1, 0, 0, 0, 0]),
                           stride=1), InvalidInputError, "'oops'"),
        (KeyedJaggedTensor(keys=["user", "item", "ctx"], values=torch.tensor([1]),
                           lengths=torch.tensor([1, 0, 0]), stride=1),
         InvalidInputError, "history"),
        (KeyedJaggedTensor(keys=["user", "item", "history", "ctx"], values=torch.tensor([1, 2]),
                           lengths=torch.tensor([1, 0, 0, 0]), stride=1),
         InvalidInputError, "sum to 1 but there are 2"),
        (KeyedJaggedTensor(keys=["user", "item", "history", "ctx"],
                           values=torch.tensor([1.0]), lengths=torch.tensor([1, 0, 0, 0]),
                           stride=1), InvalidTypeError, "int64"),
        (KeyedJaggedTensor(keys=["user", "item", "history", "ctx"], values=torch.tensor([1, 2]),
                           lengths=torch.tensor([3, -1, 0, 0]), stride=1),
         InvalidInputError, "negative lengths for feature.*item"),
    ],
    ids=["unknown-key", "missing-key", "lengths-vs-values", "float-ids", "negative-length"],
)
def test_bad_input_is_rejected_before_any_change(kjt: KeyedJaggedTensor, error: type,
                                                 match: str) -> None:
    ebc, backend = _module()
    ebc(_good()).values().sum().backward()
    ebc.apply_sparse_gradients(now=1)
    before = {k: v["size"] for k, v in backend.stats().items()}
    n_lookups = len(backend.lookups)
    with pytest.raises(error, match=match):
        ebc(kjt)
    assert len(backend.lookups) == n_lookups
    assert {k: v["size"] for k, v in backend.stats().items()} == before
    assert ebc.pending_updates == 0


def test_weighted_module_requires_finite_weights() -> None:
    ebc, _ = _module(weighted=True)
    with pytest.raises(InvalidInputError, match="no weights"):
        ebc(_good())
    kjt = _good()
    bad = KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values(), lengths=kjt.lengths(),
                            weights=torch.tensor([1.0, 1.0, 1.0, float("nan")]), stride=2)
    with pytest.raises(InvalidInputError, match="'history'"):
        ebc(bad)


def test_config_errors() -> None:
    opt = OptimizerConfig("sgd", lr=0.1)
    with pytest.raises(ConfigError, match="two tables"):
        DynamicEmbeddingBagCollection([TableConfig("a", 4, ("f",), optimizer=opt),
                                       TableConfig("b", 4, ("f",), optimizer=opt)])
    with pytest.raises(ConfigError, match="unique"):
        DynamicEmbeddingBagCollection([TableConfig("a", 4), TableConfig("a", 4)])
    with pytest.raises(ConfigError):
        DynamicEmbeddingBagCollection([])


def test_default_backend_is_local_tables() -> None:
    ebc = DynamicEmbeddingBagCollection([TableConfig("t", dim=3, feature_names=("f",))])
    assert isinstance(ebc.backend, LocalBackend)
    out = ebc(KeyedJaggedTensor.from_lengths_sync(keys=["f"], values=torch.tensor([9]),
                                                  lengths=torch.tensor([1])))
    assert out.values().shape == (1, 3) and ebc.embedding_dims() == [3]
