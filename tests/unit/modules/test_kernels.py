"""The module's compiled kernels: per-table dedup and the unique-row pooling backward."""

from __future__ import annotations

import numpy as np
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


def test_pooling_gradient_matches_embedding_bag() -> None:
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(7, 3, generator=g)
    inverse = torch.randint(0, 7, (40,), generator=g)
    lengths = torch.tensor([0, 5, 1, 0, 20, 14])
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    weights = torch.rand(40, generator=g)
    grad_out = torch.randn(6, 3, generator=g)
    for w in (None, weights):
        a = rows.clone().requires_grad_(True)
        b = rows.clone().requires_grad_(True)
        out_a = pool_unique_rows(a, inverse, offsets, w)
        out_b = torch.nn.functional.embedding_bag(
            inverse, b, offsets, mode="sum", per_sample_weights=w, include_last_offset=True
        )
        torch.testing.assert_close(out_a, out_b)
        out_a.backward(grad_out)
        out_b.backward(grad_out)
        torch.testing.assert_close(a.grad, b.grad)
