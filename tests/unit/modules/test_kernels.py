"""The module's compiled kernels: per-table dedup and the unique-row pooling backward."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from monolith_py.modules._dedup import dedup_by_table
from monolith_py.modules._pooling import pool_unique_rows


@given(
    st.lists(st.lists(st.integers(-(2**63), 2**63 - 1) | st.integers(0, 5), max_size=30),
             min_size=1, max_size=6),
    st.data(),
)
def test_dedup_by_table_matches_python_model(segments: list[list[int]], data: st.DataObject) -> None:
    num_tables = data.draw(st.integers(1, 3))
    seg_table = np.array([data.draw(st.integers(0, num_tables - 1)) for _ in segments])
    values = torch.tensor([v for s in segments for v in s], dtype=torch.int64)
    offsets = np.cumsum([0] + [len(s) for s in segments])
    uniq, inverse, table_offsets = dedup_by_table(values, offsets, seg_table, num_tables)
    assert (uniq[inverse] == values).all()
    for t in range(num_tables):
        mine = uniq[table_offsets[t]:table_offsets[t + 1]].tolist()
        expect: list[int] = []
        for s, seg in enumerate(segments):
            if seg_table[s] == t:
                expect.extend(v for v in seg if v not in expect)
        assert mine == expect  # distinct, first-occurrence order
    for s, seg in enumerate(segments):
        pos = inverse[offsets[s]:offsets[s + 1]]
        t = seg_table[s]
        assert ((pos >= table_offsets[t]) & (pos < table_offsets[t + 1])).all()


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("mean", [False, True])
def test_pooling_matches_embedding_bag(weighted: bool, mean: bool) -> None:
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(7, 3, generator=g)
    lengths = np.array([[0, 5, 1], [0, 20, 14]])  # [F, B]: empty, long and short bags
    n = int(lengths.sum())
    inverse = torch.randint(0, 7, (n,), generator=g)
    weights = torch.rand(n, generator=g) if weighted else None
    members = np.array([1, 0])  # output order differs from KJT order
    mean_flags = np.array([mean, False])
    grad_out = torch.randn(3, 6, generator=g)

    a = rows.clone().requires_grad_(True)
    out_a = pool_unique_rows(a, inverse.numpy(), lengths, members, mean_flags,
                             None if weights is None else weights.numpy())
    # reference: one embedding_bag per KJT key, then example-major concat
    b = rows.clone().requires_grad_(True)
    offsets = np.concatenate([[0], np.cumsum(lengths.reshape(-1))])
    per_key = []
    for f in range(2):
        lo, hi = offsets[f * 3], offsets[f * 3 + 3]
        w = None if weights is None else weights[lo:hi]
        mode = "mean" if mean_flags[f] else "sum"
        if w is not None and mode == "mean":
            lens = torch.from_numpy(lengths[f]).repeat_interleave(torch.from_numpy(lengths[f]))
            w, mode = w / lens, "sum"
        per_key.append(torch.nn.functional.embedding_bag(
            inverse[lo:hi], b, torch.from_numpy(offsets[f * 3:f * 3 + 4] - lo), mode=mode,
            per_sample_weights=w, include_last_offset=True))
    out_b = torch.cat([per_key[1], per_key[0]], dim=1)
    torch.testing.assert_close(out_a, out_b)
    out_a.backward(grad_out)
    out_b.backward(grad_out)
    torch.testing.assert_close(a.grad, b.grad)
