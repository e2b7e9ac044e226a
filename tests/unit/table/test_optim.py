"""Each sparse optimizer against a dense reference (torch.optim where one exists)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from monolith_py.table import EmbeddingTable, OptimizerConfig, TableConfig

DIM = 8
KEYS = torch.tensor([3, -7, 11, 2**40, 5], dtype=torch.int64)


def _steps(n_steps: int = 6, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches over the same 5 keys, with a repeated key in each batch (grads summed)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_steps):
        keys = torch.cat([KEYS, KEYS[:2]])
        out.append((keys, torch.randn(keys.shape[0], DIM, generator=g)))
    return out


def _summed(keys: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Dense gradient [len(KEYS), DIM] with repeated keys summed."""
    pos = {int(k): i for i, k in enumerate(KEYS)}
    dense = torch.zeros(len(KEYS), DIM)
    for k, g in zip(keys.tolist(), grads):
        dense[pos[k]] += g
    return dense


def _run_table(opt: OptimizerConfig) -> tuple[EmbeddingTable, torch.Tensor]:
    t = EmbeddingTable(TableConfig("t", dim=DIM, optimizer=opt, initializer="normal",
                                   init_scale=0.5, seed=3))
    start = t.lookup(KEYS, train=True).clone()
    for i, (keys, grads) in enumerate(_steps()):
        t.apply_gradients(keys, grads, now=100 + i)
    return t, start


def _run_torch(start: torch.Tensor, make: type, **kw: float) -> torch.Tensor:
    p = torch.nn.Parameter(start.clone())
    o = make([p], **kw)
    for keys, grads in _steps():
        o.zero_grad()
        p.grad = _summed(keys, grads)
        o.step()
    return p.detach()


@pytest.mark.parametrize(
    ("opt", "make", "kw"),
    [
        (OptimizerConfig("sgd", lr=0.1), torch.optim.SGD, {"lr": 0.1}),
        (OptimizerConfig("adagrad", lr=0.3, eps=1e-10), torch.optim.Adagrad,
         {"lr": 0.3, "eps": 1e-10}),
        (OptimizerConfig("adagrad", lr=0.3, initial_accumulator_value=0.5), torch.optim.Adagrad,
         {"lr": 0.3, "eps": 1e-10, "initial_accumulator_value": 0.5}),
        (OptimizerConfig("adam", lr=0.05, beta1=0.8, beta2=0.99, eps=1e-7), torch.optim.Adam,
         {"lr": 0.05, "betas": (0.8, 0.99), "eps": 1e-7}),
    ],
    ids=["sgd", "adagrad", "adagrad-acc", "adam"],
)
def test_matches_torch_optim(opt: OptimizerConfig, make: type, kw: dict) -> None:
    t, start = _run_table(opt)
    want = _run_torch(start, make, **kw)
    torch.testing.assert_close(t.lookup(KEYS), want, atol=1e-6, rtol=0)


def test_rowwise_adagrad_matches_dense_reference() -> None:
    lr, eps = 0.2, 1e-8
    t, start = _run_table(OptimizerConfig("rowwise_adagrad", lr=lr, eps=eps))
    w = start.double().clone()
    acc = torch.zeros(len(KEYS), 1, dtype=torch.float64)
    for keys, grads in _steps():
        g = _summed(keys, grads).double()
        acc += (g * g).mean(dim=1, keepdim=True)
        w -= lr * g / (acc.sqrt() + eps)
    torch.testing.assert_close(t.lookup(KEYS), w.float(), atol=1e-6, rtol=0)


def test_ftrl_matches_dense_reference() -> None:
    lr, l1, l2, beta, acc0 = 0.5, 0.05, 0.1, 1.0, 0.1
    t, start = _run_table(OptimizerConfig("ftrl", lr=lr, l1=l1, l2=l2, beta=beta))
    w = start.double().clone()
    z = torch.zeros_like(w)
    n = torch.full_like(w, acc0)
    for keys, grads in _steps():
        g = _summed(keys, grads).double()
        n_new = n + g * g
        sigma = (n_new.sqrt() - n.sqrt()) / lr
        z = z + g - sigma * w
        n = n_new
        w = torch.where(
            z.abs() <= l1,
            torch.zeros_like(z),
            -(z - torch.sign(z) * l1) / ((beta + n.sqrt()) / lr + l2),
        )
    torch.testing.assert_close(t.lookup(KEYS), w.float(), atol=1e-6, rtol=0)
    assert (t.lookup(KEYS) == 0).any()  # l1 produced exact zeros somewhere


def test_adam_is_lazy_per_row() -> None:
    """A row skipped in a step keeps its moments and its own step count."""
    opt = OptimizerConfig("adam", lr=0.1)
    t = EmbeddingTable(TableConfig("t", dim=2, optimizer=opt, initializer="zeros"))
    t.apply_gradients(torch.tensor([1, 2]), torch.ones(2, 2), now=1)
    t.apply_gradients(torch.tensor([1]), torch.ones(1, 2), now=2)
    t.apply_gradients(torch.tensor([2]), torch.ones(1, 2), now=3)
    rows = t.lookup(torch.tensor([1, 2]))
    # constant gradient: Adam moves each coordinate by exactly lr per step (bias-corrected)
    assert torch.allclose(rows, torch.full((2, 2), -0.2), atol=1e-6)
    assert t.state_dict()["update_count"].tolist() == [2, 2]
    assert math.isclose(float(t.state_dict()["slot.exp_avg"][0, 0]), 0.19, rel_tol=1e-6)


def test_step_cost_is_small() -> None:
    """Not a timing assertion: just exercise a realistic batch through every optimizer."""
    keys = torch.from_numpy(np.random.default_rng(0).integers(0, 10**9, 4096))
    for kind in ("sgd", "adagrad", "rowwise_adagrad", "adam", "ftrl"):
        t = EmbeddingTable(TableConfig("t", dim=16, optimizer=OptimizerConfig(kind)))
        t.lookup(keys, train=True)
        t.apply_gradients(keys, torch.randn(4096, 16), now=1)
        assert torch.isfinite(t.lookup(keys)).all()
