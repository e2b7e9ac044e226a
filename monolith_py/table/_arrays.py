"""Input coercion shared by the table modules (private).

Everything that enters the index or the table goes through these helpers, which turn
numpy arrays, torch tensors or sequences into contiguous arrays of one dtype and raise
:class:`~monolith_py.errors.InvalidTypeError` / :class:`~monolith_py.errors.InvalidInputError`
naming the argument and the problem.
"""

from __future__ import annotations

import mmap
from typing import Any

import numpy as np

from monolith_py.errors import InvalidInputError, InvalidTypeError

__all__: list[str] = []  # private module

INT64_MIN = int(np.iinfo(np.int64).min)
_HUGE = 1 << 22  # arrays at least this big get their own mapping with huge pages


def _to_numpy(x: Any, name: str) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        torch = None  # type: ignore[assignment]
    if torch is not None and isinstance(x, torch.Tensor):
        t = x.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        return t.numpy() if t.dtype != torch.bfloat16 else t.float().numpy()
    if isinstance(x, (list, tuple, range)):
        arr = np.asarray(x)
        if arr.size == 0:
            return arr.astype(np.int64)
        return arr
    raise InvalidTypeError(
        f"{name} must be a numpy array, a torch tensor or a list, got {type(x).__name__}"
    )


def as_keys(x: Any, name: str = "keys") -> np.ndarray:
    """``x`` as a 1-D contiguous int64 array (zero copy when it already is one).

    Raises InvalidTypeError for non-integer dtypes (bool and float included) and
    InvalidInputError for other shapes, uint64 values beyond int64 and the reserved key
    ``INT64_MIN``.
    """
    arr = _to_numpy(x, name)
    if arr.dtype.kind not in "iu":
        raise InvalidTypeError(f"{name} must have an integer dtype (int64), got {arr.dtype}")
    if arr.ndim != 1:
        raise InvalidInputError(f"{name} must be 1-D [n], got shape {tuple(arr.shape)}")
    if arr.dtype == np.uint64 and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
        raise InvalidInputError(f"{name} has uint64 values above the int64 range")
    return np.ascontiguousarray(arr, dtype=np.int64)


def check_reserved(keys: np.ndarray, name: str = "keys") -> None:
    """Reject the reserved empty-slot marker ``INT64_MIN``."""
    if keys.size and int(keys.min()) == INT64_MIN:
        raise InvalidInputError(
            f"{name} contains {INT64_MIN} (INT64_MIN), which the index reserves as its "
            "empty-slot marker; map it to another id before inserting"
        )


def as_values(x: Any, n: int, name: str = "values") -> np.ndarray:
    """``x`` as a contiguous int64 array of length ``n`` (a scalar is broadcast)."""
    if isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_)):
        return np.full(n, int(x), dtype=np.int64)
    arr = _to_numpy(x, name)
    if arr.dtype.kind not in "iu":
        raise InvalidTypeError(f"{name} must have an integer dtype (int64), got {arr.dtype}")
    if arr.shape != (n,):
        raise InvalidInputError(f"{name} must have shape [{n}] like the keys, got {tuple(arr.shape)}")
    return np.ascontiguousarray(arr, dtype=np.int64)


def as_float_rows(x: Any, n: int, dim: int, name: str) -> np.ndarray:
    """``x`` as a C-contiguous float32 ``[n, dim]`` array with finite values only."""
    arr = _to_numpy(x, name)
    if arr.dtype.kind != "f":
        raise InvalidTypeError(f"{name} must be floating point, got {arr.dtype}")
    if arr.shape != (n, dim):
        raise InvalidInputError(
            f"{name} must have shape [{n}, {dim}] (one row of dim {dim} per key), "
            f"got {tuple(arr.shape)}"
        )
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if arr.size and not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).any(axis=1).sum())
        raise InvalidInputError(f"{name} contain NaN or inf in {bad} of {n} rows")
    return arr


def unique_sorted(a: np.ndarray) -> np.ndarray:
    """Sorted unique values of a 1-D array (faster than ``np.unique`` on small batches)."""
    if a.shape[0] <= 1:
        return a.copy()
    s = np.sort(a)
    keep = np.empty(s.shape[0], dtype=np.bool_)
    keep[0] = True
    np.not_equal(s[1:], s[:-1], out=keep[1:])
    return s[keep]


def aligned_empty(words: int) -> np.ndarray:
    """An uninitialized int64 array of ``words`` entries (see :func:`aligned_array`)."""
    return aligned_array((words,), np.int64)


_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


def prefaulted_zeros(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """A zero-filled C-contiguous array (page aligned when large) whose pages are all
    mapped now, for an array about to be written whole (a table load).

    Large arrays get their own anonymous mapping with ``MAP_POPULATE``: the kernel maps and
    zeroes every page in one call instead of one fault per page, in 4 KiB pages. Not huge
    pages at first: on VMs that hand free memory back to the host, a fresh huge page is
    what costs most (measured on our 2-core VM, per GiB: 2.0-2.4 s with huge pages,
    0.4 s populated with small pages). The mapping is then advised for huge pages, so
    khugepaged may merge it in the background later.
    """
    dt = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    nbytes = count * dt.itemsize
    if nbytes < _HUGE:
        return aligned_array(shape, dt, 0)
    mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _POPULATE)
    if hasattr(mm, "madvise") and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            mm.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # pragma: no cover - kernel without THP
            pass
    return np.frombuffer(mm, dtype=dt, count=count).reshape(shape)


def aligned_array(shape: tuple[int, ...], dtype: Any, fill: Any = None) -> np.ndarray:
    """A C-contiguous array whose data starts on a 64-byte boundary (``fill``: optional).

    Large arrays get their own anonymous mapping advised for transparent huge pages, which
    makes first-touch page faults and the TLB misses of random row accesses much cheaper,
    and are pre-faulted here: a page touched for the first time costs 5-20 us on a VM (a
    fresh huge page several ms), a cost that belongs to the allocation (or growth), not to
    the training step that happens to write the first row of a page.
    """
    dt = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    nbytes = count * dt.itemsize
    if nbytes >= _HUGE:
        mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mm, "madvise") and hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                mm.madvise(mmap.MADV_HUGEPAGE)
            except OSError:  # pragma: no cover - kernel without THP
                pass
        out = np.frombuffer(mm, dtype=dt, count=count).reshape(shape)
        if fill is not None and fill != 0:  # fresh anonymous pages are already zero
            out[...] = fill
        else:
            np.frombuffer(mm, dtype=np.uint8)[::4096] = 0  # pre-fault every page
        return out
    raw = np.empty(nbytes + 64, dtype=np.uint8)
    off = (-raw.ctypes.data) % 64
    out = raw[off : off + nbytes].view(dt).reshape(shape)
    if fill is not None:
        out[...] = fill
    return out
