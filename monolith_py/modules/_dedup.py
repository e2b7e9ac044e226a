"""Per-table deduplication of a batch's sparse ids in one compiled pass.

The embedding module looks up each distinct id of a table once per batch, whichever
features (sharing that table) and examples it came from. :func:`dedup_by_table` turns the
KJT's flat value array into the concatenated unique keys of every table (tables in a
given order, first-occurrence order inside a table) plus, for every value, the position of
its key in that concatenation -- the ``input`` of one ``embedding_bag`` call.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

__all__ = ["dedup_by_table"]

_MIX = np.uint64(0x9E3779B97F4A7C15)


@numba.njit(cache=True, nogil=True)
def _dedup_kernel(
    values: np.ndarray,
    seg_offsets: np.ndarray,
    seg_table: np.ndarray,
    num_tables: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # values: int64 [N]; segment s covers values[seg_offsets[s]:seg_offsets[s + 1]] and
    # belongs to table seg_table[s] (tables numbered 0..num_tables-1).
    n = values.shape[0]
    n_seg = seg_table.shape[0]
    inverse = np.empty(n, np.int64)
    uniq = np.empty(n, np.int64)
    table_offsets = np.zeros(num_tables + 1, np.int64)
    u = 0
    for t in range(num_tables):
        size = 0
        for s in range(n_seg):
            if seg_table[s] == t:
                size += seg_offsets[s + 1] - seg_offsets[s]
        if size > 0:
            bits = 1
            while (1 << bits) < 2 * size:
                bits += 1
            cap = 1 << bits
            mask = cap - 1
            shift = np.uint64(64 - bits)
            slots = np.full(cap, -1, np.int64)
            for s in range(n_seg):
                if seg_table[s] != t:
                    continue
                for i in range(seg_offsets[s], seg_offsets[s + 1]):
                    v = values[i]
                    h = np.int64((np.uint64(v) * _MIX) >> shift)
                    while True:
                        slot = slots[h]
                        if slot == -1:
                            slots[h] = u
                            uniq[u] = v
                            inverse[i] = u
                            u += 1
                            break
                        if uniq[slot] == v:
                            inverse[i] = slot
                            break
                        h = (h + 1) & mask
        table_offsets[t + 1] = u
    return uniq[:u].copy(), inverse, table_offsets


def dedup_by_table(
    values: torch.Tensor,
    seg_offsets: np.ndarray,
    seg_table: np.ndarray,
    num_tables: int,
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Deduplicate ``values`` per table.

    Args:
        values: int64 ``[N]`` ids (CPU), segment after segment.
        seg_offsets: int64 ``[S + 1]``; segment ``s`` is ``values[seg_offsets[s]:seg_offsets[s+1]]``.
        seg_table: int64 ``[S]``, the table (``0..num_tables-1``) of each segment.
        num_tables: number of tables.

    Returns:
        ``(unique, inverse, table_offsets)``: ``unique`` int64 ``[U]`` holds the distinct
        ids of table 0, then table 1, ...; table ``t``'s are
        ``unique[table_offsets[t]:table_offsets[t+1]]``; ``inverse`` int64 ``[N]`` gives
        ``unique[inverse[i]] == values[i]`` (and the position lies in the value's table).

    Example::

        >>> import numpy as np, torch
        >>> u, inv, off = dedup_by_table(torch.tensor([5, 5, 7, 5]),
        ...     np.array([0, 3, 4]), np.array([0, 1]), 2)
        >>> u.tolist(), inv.tolist(), off.tolist()
        ([5, 7, 5], [0, 0, 1, 2], [0, 2, 3])
    """
    vals = values.detach().cpu().numpy()
    if vals.dtype != np.int64:
        vals = vals.astype(np.int64)
    uniq, inverse, table_offsets = _dedup_kernel(
        vals,
        np.ascontiguousarray(seg_offsets, dtype=np.int64),
        np.ascontiguousarray(seg_table, dtype=np.int64),
        int(num_tables),
    )
    return torch.from_numpy(uniq), torch.from_numpy(inverse), table_offsets
