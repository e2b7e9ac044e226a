"""OnlineTrainer: progressive metrics vs references, score-before-train, bad batches are
counted and skipped before any change, event-time expiry, state round trip."""

from __future__ import annotations

import dataclasses
import io
from typing import Any

import pytest
import torch
from torchmetrics.functional.classification import binary_auroc
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from monolith_py.batch import Batch
from monolith_py.modules import DLRM, DeepFM, DynamicEmbeddingBagCollection
from monolith_py.table import EmbeddingTable, OptimizerConfig, TableConfig
from monolith_py.table.backend import LocalBackend
from monolith_py.training import OnlineTrainer, TrainerConfig

FEATURES = ("user", "item", "tags")
T0 = 1_600_000_000


def _model(kind: str = "dlrm", ttl: int | None = None) -> DLRM | DeepFM:
    torch.manual_seed(0)
    tables = [
        TableConfig(f, dim=8, feature_names=(f,), optimizer=OptimizerConfig("adagrad", lr=0.1),
                    ttl_seconds=ttl, seed=i)
        for i, f in enumerate(FEATURES)
    ]
    ebc = DynamicEmbeddingBagCollection(tables)
    if kind == "deepfm":
        return DeepFM(ebc, num_dense=3, deep_mlp=(16,))
    return DLRM(ebc, num_dense=3, bottom_mlp=(16, 8), top_mlp=(16,))


def _batches(n: int, b: int = 64, seed: int = 0, t0: int = T0, step_s: int = 60) -> list[Batch]:
    """Synthetic stream whose label depends on the user and item ids (learnable)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        user = torch.randint(0, 40, (b,), generator=g)
        item = torch.randint(0, 60, (b,), generator=g)
        n_tags = torch.randint(0, 4, (b,), generator=g)
        tags = torch.randint(0, 10, (int(n_tags.sum()),), generator=g)
        logit = ((user % 3) - 1).float() + ((item % 5) - 2).float() * 0.7
        labels = (torch.rand(b, generator=g) < torch.sigmoid(logit)).float()
        kjt = KeyedJaggedTensor(
            keys=list(FEATURES),
            values=torch.cat([user, item, tags]),
            lengths=torch.cat([torch.ones(2 * b, dtype=torch.int64), n_tags]),
            stride=b,
        )
        out.append(Batch(kjt, torch.randn(b, 3, generator=g), labels,
                         torch.full((b,), t0 + i * step_s, dtype=torch.int64),
                         torch.arange(i * b, (i + 1) * b)))
    return out


class Recorder:
    """Forward hook that keeps every batch's logits (to recompute metrics by hand)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.logits: list[torch.Tensor] = []
        model.register_forward_hook(lambda _m, _i, out: self.logits.append(out.detach().clone()))


def _brute_auc(p: torch.Tensor, y: torch.Tensor) -> float:
    pos, neg = p[y > 0.5].double(), p[y < 0.5].double()
    return float(((pos[:, None] > neg[None]).double().sum()
                  + 0.5 * (pos[:, None] == neg[None]).double().sum()) / (pos.numel() * neg.numel()))


@pytest.mark.parametrize("kind", ["dlrm", "deepfm"])
def test_metrics_match_references_and_model_learns(kind: str) -> None:
    model = _model(kind)
    rec = Recorder(model)
    trainer = OnlineTrainer(model, torch.optim.Adagrad(model.parameters(), lr=0.05),
                            TrainerConfig(metrics_window=640))
    batches = _batches(40)
    m = trainer.fit(batches)
    probs = torch.sigmoid(torch.cat(rec.logits))
    labels = torch.cat([b.labels for b in batches])
    assert m["examples"] == m["trained_examples"] == labels.numel() == 2560
    assert m["auc"] == pytest.approx(_brute_auc(probs, labels), abs=m["auc_error_bound"] + 1e-9)
    assert m["auc"] == pytest.approx(float(binary_auroc(probs, labels.long())), abs=1e-4)
    assert m["window_auc"] == pytest.approx(_brute_auc(probs[-640:], labels[-640:]), abs=1e-9)
    pc = probs.double().clamp(1e-7, 1 - 1e-7)
    ll = float(-(labels * pc.log() + (1 - labels) * (1 - pc).log()).mean())
    assert m["log_loss"] == pytest.approx(ll, rel=1e-5)
    assert m["calibration"] == pytest.approx(float(probs.sum() / labels.sum()), rel=1e-5)
    assert m["window_auc"] > 0.7  # the synthetic labels are learnable
    assert m["table_sizes"] == {"user": 40, "item": 60, "tags": 10}
    assert m["rows"] == 110 and m["admitted"] == 110
    assert m["examples_per_s"] > 0 and m["event_time"] == T0 + 39 * 60


def test_scores_before_training() -> None:
    batch = _batches(1)[0]
    twin = _model()  # same seeds: same dense init and same initial rows per key
    expect = twin(batch.dense, batch.sparse).detach()
    model = _model()
    rec = Recorder(model)
    trainer = OnlineTrainer(model, torch.optim.Adagrad(model.parameters(), lr=0.05))
    trainer.step(batch)
    torch.testing.assert_close(rec.logits[0], expect)
    after = model(batch.dense, batch.sparse).detach()
    assert not torch.allclose(after, expect)  # and then it trained


def _snapshot(trainer: OnlineTrainer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    ebc = trainer.sparse_modules[0]
    dense = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    tables = {k: v["size"] for k, v in ebc.sparse_stats().items()}
    rows = ebc.backend.lookup({f: torch.arange(100) for f in FEATURES}, train=False)
    return dense, {"sizes": tables, "rows": {k: v.clone() for k, v in rows.items()}}


def _bad_batches(good: Batch) -> dict[str, Batch | object]:
    kjt = good.sparse
    b = len(good)
    bad: dict[str, Batch | object] = {}
    bad["not_a_batch"] = {"labels": [1]}
    bad["invalid_batch:nan-dense"] = dataclasses.replace(
        good, dense=torch.full_like(good.dense, float("nan")))
    bad["invalid_batch:inf-dense"] = dataclasses.replace(
        good, dense=torch.full_like(good.dense, float("inf")))
    bad["invalid_batch:label"] = dataclasses.replace(good, labels=torch.full((b,), 2.0))
    bad["invalid_batch:lengths"] = dataclasses.replace(good, sparse=KeyedJaggedTensor(
        keys=kjt.keys(), values=kjt.values()[:-1], lengths=kjt.lengths(), stride=b))
    bad["invalid_batch:float-ids"] = dataclasses.replace(good, sparse=KeyedJaggedTensor(
        keys=kjt.keys(), values=kjt.values().float(), lengths=kjt.lengths(), stride=b))
    bad["invalid_features:unknown-key"] = dataclasses.replace(good, sparse=KeyedJaggedTensor(
        keys=["user", "item", "colour"], values=kjt.values(), lengths=kjt.lengths(), stride=b))
    bad["dense_width"] = dataclasses.replace(good, dense=torch.zeros(b, 5))
    return bad


def test_bad_batches_are_counted_and_skipped_before_any_change() -> None:
    model = _model()
    trainer = OnlineTrainer(model, torch.optim.Adagrad(model.parameters(), lr=0.05))
    good = _batches(3)
    trainer.step(good[0])
    dense_before, sparse_before = _snapshot(trainer)
    metrics_before = trainer.metrics()
    for name, batch in _bad_batches(good[1]).items():
        result = trainer.step(batch)  # type: ignore[arg-type]
        reason = name.split(":")[0]
        assert not result.trained and result.reason == reason, name
        dense_after, sparse_after = _snapshot(trainer)
        for k, v in dense_before.items():
            assert torch.equal(v, dense_after[k]), f"{name} changed {k}"
        assert sparse_after["sizes"] == sparse_before["sizes"], name
        for k, v in sparse_before["rows"].items():
            assert torch.equal(v, sparse_after["rows"][k]), name
    m = trainer.metrics()
    assert m["bad_batches"] == 8
    assert m["bad_batches_by_reason"] == {"not_a_batch": 1, "invalid_batch": 5,
                                          "invalid_features": 1, "dense_width": 1}
    assert "dense" in m["last_error"] and "dense_width" in m["last_error"]
    assert m["examples"] == metrics_before["examples"]
    assert m["log_loss"] == metrics_before["log_loss"]
    assert trainer.step(good[2]).trained  # and it keeps going
    assert trainer.metrics()["trained_examples"] == 2 * len(good[0])


def test_unknown_key_error_names_the_feature() -> None:
    trainer = OnlineTrainer(_model(), None)
    bad = _bad_batches(_batches(1)[0])["invalid_features:unknown-key"]
    result = trainer.step(bad)  # type: ignore[arg-type]
    assert result.error is not None and "'colour'" in result.error


def test_event_time_drives_expiry() -> None:
    model = _model(ttl=3600)
    trainer = OnlineTrainer(model, torch.optim.Adagrad(model.parameters(), lr=0.05),
                            TrainerConfig(evict_interval_s=600))
    trainer.fit(_batches(5, step_s=60))  # every id seen within 5 minutes
    sizes = trainer.metrics()["table_sizes"]
    assert sizes["user"] == 40 and trainer.expired == 0
    # two hours later only users 0..4 and item 0 come back; the rest expires
    late = T0 + 2 * 3600
    kjt = KeyedJaggedTensor(keys=list(FEATURES), values=torch.tensor([0, 1, 2, 3, 4] + [0] * 5),
                            lengths=torch.tensor([1] * 10 + [0] * 5), stride=5)
    batch = Batch(kjt, torch.zeros(5, 3), torch.ones(5), torch.full((5,), late), torch.arange(5))
    trainer.step(batch)
    m = trainer.metrics()
    assert m["event_time"] == late
    assert m["table_sizes"] == {"user": 5, "item": 1, "tags": 0}
    assert m["expired"] == sum(sizes.values()) - 6


def test_state_dict_round_trip_continues_identically() -> None:
    batches = _batches(12)

    def fresh() -> OnlineTrainer:
        model = _model()
        return OnlineTrainer(model, torch.optim.Adagrad(model.parameters(), lr=0.05),
                             TrainerConfig(metrics_window=200))

    a = fresh()
    a.fit(batches[:6])
    state = a.state_dict()
    sparse = a.sparse_modules[0].backend.state_dict()  # type: ignore[attr-defined]
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)  # plain tensors/numbers/strings only

    b = fresh()
    b.sparse_modules[0].backend.load_state_dict(sparse)  # type: ignore[attr-defined]
    torch.manual_seed(123)  # b's RNG must come from the state, not from here
    b.load_state_dict(loaded)
    assert torch.equal(torch.get_rng_state(), state["rng"])
    ma = a.fit(batches[6:])
    mb = b.fit(batches[6:])
    for k in ("auc", "window_auc", "log_loss", "calibration", "examples", "steps", "rows"):
        assert ma[k] == mb[k], k
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_progress_callback_and_max_steps() -> None:
    seen: list[int] = []
    trainer = OnlineTrainer(_model(), None)
    trainer.fit(_batches(7), max_steps=5, progress=lambda m: seen.append(m["examples"]),
                progress_every=2)
    assert seen == [128, 256, 320]
    assert trainer.steps == 5


def test_retriable_backend_error_is_raised_not_skipped() -> None:
    """A PS that does not answer must stop the trainer (to restart from a snapshot), not
    turn the stream into skipped batches."""
    from monolith_py.errors import UnavailableError

    class DownBackend(LocalBackend):
        def lookup(self, keys: Any, train: bool) -> dict[str, torch.Tensor]:
            raise UnavailableError("shard 0 at 127.0.0.1:1 does not answer")

    tables = [TableConfig(f, dim=8, feature_names=(f,)) for f in FEATURES]
    down = DownBackend({t.name: EmbeddingTable(t) for t in tables})
    ebc = DynamicEmbeddingBagCollection(tables, backend=down)
    model = DLRM(ebc, num_dense=3, bottom_mlp=(16, 8), top_mlp=(16,))
    trainer = OnlineTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(UnavailableError):
        trainer.step(_batches(1)[0])
    assert trainer.metrics()["bad_batches"] == 0
