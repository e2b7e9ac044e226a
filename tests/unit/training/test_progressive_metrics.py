"""Progressive metrics against references: torchmetrics and a brute-force pairwise AUC."""

from __future__ import annotations

import math

import pytest
import torch
from torchmetrics.functional.classification import binary_auroc

from monolith_py.errors import ConfigError, InvalidInputError
from monolith_py.training import ProgressiveMetrics, binary_auc, histogram_auc


def pairwise_auc(p: torch.Tensor, y: torch.Tensor) -> float:
    """O(P*N) definition: P(score_pos > score_neg) + 1/2 P(tie)."""
    pos = p[y >= 0.5].double()
    neg = p[y < 0.5].double()
    gt = (pos[:, None] > neg[None, :]).double().sum()
    eq = (pos[:, None] == neg[None, :]).double().sum()
    return float((gt + 0.5 * eq) / (pos.numel() * neg.numel()))


def _data(n: int, seed: int, ties: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, generator=g) < 0.35).float()
    p = torch.sigmoid(torch.randn(n, generator=g) + 1.2 * y)
    if ties:
        p = torch.round(p * 20) / 20
    return p, y


@pytest.mark.parametrize("ties", [False, True])
def test_binary_auc_matches_bruteforce_and_torchmetrics(ties: bool) -> None:
    p, y = _data(2000, 1, ties)
    ref = pairwise_auc(p, y)
    assert binary_auc(p, y) == pytest.approx(ref, abs=1e-12)
    assert binary_auc(p, y) == pytest.approx(float(binary_auroc(p, y.long())), abs=1e-6)


def test_binary_auc_single_class_is_nan() -> None:
    assert math.isnan(binary_auc(torch.tensor([0.1, 0.9]), torch.tensor([1.0, 1.0])))


def test_histogram_auc_within_reported_bound() -> None:
    p, y = _data(5000, 2)
    bins = 64
    idx = (p.double() * bins).long().clamp(0, bins - 1)
    pos = torch.bincount(idx[y > 0.5], minlength=bins)
    neg = torch.bincount(idx[y < 0.5], minlength=bins)
    auc, bound = histogram_auc(pos, neg)
    assert abs(auc - pairwise_auc(p, y)) <= bound + 1e-12
    assert bound > 0


def test_progressive_metrics_cumulative_and_windowed() -> None:
    p, y = _data(7000, 3)
    m = ProgressiveMetrics(window=1500)
    for i in range(0, 7000, 333):  # batches that straddle the ring buffer's end
        m.update(p[i:i + 333], y[i:i + 333])
    r = m.compute()
    assert r["examples"] == 7000
    exact = pairwise_auc(p, y)
    assert abs(r["auc"] - exact) <= r["auc_error_bound"] + 1e-12
    assert r["auc"] == pytest.approx(exact, abs=1e-4)
    assert r["window_examples"] == 1500
    assert r["window_auc"] == pytest.approx(pairwise_auc(p[-1500:], y[-1500:]), abs=1e-12)
    pc = p.double().clamp(1e-7, 1 - 1e-7)
    ll = float(-(y * pc.log() + (1 - y) * (1 - pc).log()).mean())
    assert r["log_loss"] == pytest.approx(ll, rel=1e-6)
    w = slice(5500, 7000)
    wll = float(-(y[w] * pc[w].log() + (1 - y[w]) * (1 - pc[w]).log()).mean())
    assert r["window_log_loss"] == pytest.approx(wll, rel=1e-6)
    assert r["calibration"] == pytest.approx(float(p.double().sum() / y.double().sum()), rel=1e-6)
    assert r["window_calibration"] == pytest.approx(
        float(p[w].double().sum() / y[w].double().sum()), rel=1e-5
    )


def test_batch_larger_than_window_keeps_newest() -> None:
    p, y = _data(300, 4)
    m = ProgressiveMetrics(window=100)
    m.update(p, y)
    assert m.compute()["window_auc"] == pytest.approx(pairwise_auc(p[-100:], y[-100:]))


def test_empty_and_undefined() -> None:
    m = ProgressiveMetrics(window=10)
    r = m.compute()
    assert r["examples"] == 0 and math.isnan(r["auc"]) and math.isnan(r["log_loss"])
    m.update(torch.tensor([]), torch.tensor([]))
    assert m.count == 0


def test_state_dict_round_trip_continues_identically() -> None:
    p, y = _data(3000, 5)
    a = ProgressiveMetrics(window=700)
    a.update(p[:1700], y[:1700])
    b = ProgressiveMetrics(window=700)
    b.load_state_dict(a.state_dict())
    for m in (a, b):
        m.update(p[1700:], y[1700:])
    assert a.compute() == b.compute()
    for v in a.state_dict().values():
        assert isinstance(v, (torch.Tensor, int, float))


def test_bad_input() -> None:
    m = ProgressiveMetrics(window=10)
    with pytest.raises(InvalidInputError):
        m.update(torch.tensor([0.5, float("nan")]), torch.tensor([0.0, 1.0]))
    with pytest.raises(InvalidInputError):
        m.update(torch.tensor([1.5]), torch.tensor([1.0]))
    with pytest.raises(InvalidInputError):
        m.update(torch.tensor([0.5]), torch.tensor([1.0, 0.0]))
    assert m.count == 0
    with pytest.raises(ConfigError):
        ProgressiveMetrics(window=0)
    with pytest.raises(InvalidInputError):
        ProgressiveMetrics(window=5).load_state_dict(m.state_dict())
