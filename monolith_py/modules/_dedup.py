"""Per-table deduplication of a batch's sparse ids, and the example-major bag layout, in
compiled passes.

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

__all__ = ["dedup_by_table", "example_major"]

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
    values: torch.Tensor | np.ndarray,
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
    vals = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else values
    if vals.dtype != np.int64:
        vals = vals.astype(np.int64)
    uniq, inverse, table_offsets = _dedup_kernel(
        vals,
        np.ascontiguousarray(seg_offsets, dtype=np.int64),
        np.ascontiguousarray(seg_table, dtype=np.int64),
        int(num_tables),
    )
    return torch.from_numpy(uniq), torch.from_numpy(inverse), table_offsets


@numba.njit(cache=True, nogil=True)
def _example_major_kernel(
    inverse: np.ndarray,
    lengths: np.ndarray,
    members: np.ndarray,
    mean: np.ndarray,
    weights: np.ndarray,
    base: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # lengths: int64 [F_kjt, B] (feature-major, as in the KJT); members: KJT positions of
    # this group's features in output order; mean: bool [F_kjt]; weights: float32 [N] or [0].
    n_feat, b = lengths.shape
    starts = np.empty((n_feat, b), np.int64)  # start of bag (f, e) in the KJT values
    acc = 0
    for f in range(n_feat):
        for e in range(b):
            starts[f, e] = acc
            acc += lengths[f, e]
    m = members.shape[0]
    total = 0
    for j in range(m):
        for e in range(b):
            total += lengths[members[j], e]
    offsets = np.empty(b * m + 1, np.int64)
    idx = np.empty(total, np.int64)
    has_w = weights.shape[0] > 0
    any_mean = False
    for j in range(m):
        if mean[members[j]]:
            any_mean = True
    out_w = np.empty(total if (has_w or any_mean) else 0, np.float32)
    pos = 0
    bag = 0
    for e in range(b):
        for j in range(m):
            f = members[j]
            offsets[bag] = pos
            bag += 1
            s = starts[f, e]
            n = lengths[f, e]
            scale = np.float32(1.0)
            if mean[f] and n > 0:
                scale = np.float32(1.0 / n)
            for i in range(s, s + n):
                idx[pos] = inverse[i] - base
                if out_w.shape[0]:
                    out_w[pos] = (weights[i] if has_w else np.float32(1.0)) * scale
                pos += 1
    offsets[bag] = pos
    return idx, offsets, out_w


def example_major(
    inverse: np.ndarray,
    lengths: np.ndarray,
    members: np.ndarray,
    mean: np.ndarray,
    weights: np.ndarray | None,
    base: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Reorder one embedding-width group's ids from the KJT's feature-major order to
    example-major bags, so pooling writes ``[B, F_g, d]`` directly (no transpose).

    Args:
        inverse: int64 ``[N]`` row of each KJT value (from :func:`dedup_by_table`).
        lengths: int64 ``[F_kjt, B]`` KJT lengths.
        members: int64 ``[F_g]`` KJT positions of the group's features, in output order.
        mean: bool ``[F_kjt]``, features pooled by mean.
        weights: float32 ``[N]`` KJT weights, or ``None``.
        base: subtracted from ``inverse`` (first row of the group's leaf).

    Returns:
        ``(idx, offsets, per_sample_weights)``: bag ``e * F_g + j`` (example ``e``, feature
        ``members[j]``) is ``idx[offsets[k]:offsets[k+1]]``; the weights (``None`` when all
        are 1) fold the KJT weights and ``1/len`` for mean pooling.

    Example::

        >>> import numpy as np
        >>> idx, off, w = example_major(np.array([0, 1, 2]), np.array([[1, 1], [0, 1]]),
        ...                             np.array([0, 1]), np.array([False, True]), None, 0)
        >>> idx.tolist(), off.tolist(), w.tolist()
        ([0, 1, 2], [0, 1, 1, 2, 3], [1.0, 1.0, 1.0])
    """
    w = np.zeros(0, np.float32) if weights is None else np.ascontiguousarray(weights, np.float32)
    idx, offsets, out_w = _example_major_kernel(
        np.ascontiguousarray(inverse, np.int64), np.ascontiguousarray(lengths, np.int64),
        np.ascontiguousarray(members, np.int64), np.ascontiguousarray(mean, np.bool_), w,
        int(base),
    )
    return (torch.from_numpy(idx), torch.from_numpy(offsets),
            torch.from_numpy(out_w) if out_w.shape[0] else None)
