"""Bit-exact comparison of nested states (``state_dict()`` outputs), for tests.

:func:`state_diff` lists every difference between two states (arrays compared by dtype,
shape and bytes, so ``-0.0 != 0.0`` and NaNs compare by their bit pattern);
:func:`state_digest` hashes a state so two processes can compare without shipping it.

Example::

    >>> import numpy as np
    >>> a = {"w": np.zeros(2, np.float32), "step": 3}
    >>> state_diff(a, {"w": np.zeros(2, np.float32), "step": 3})
    []
    >>> state_diff(a, {"w": np.ones(2, np.float32), "step": 3})
    ['w: arrays differ (float32 (2,) vs float32 (2,))']
    >>> state_digest(a) == state_digest({"step": 3, "w": np.zeros(2, np.float32)})
    True
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["state_diff", "state_digest", "assert_states_equal"]


def _leaf_array(x: Any) -> np.ndarray | None:
    if isinstance(x, np.ndarray):
        return x
    if isinstance(x, np.generic):
        return np.asarray(x)
    if type(x).__module__.startswith("torch") and hasattr(x, "detach"):
        t = x.detach().cpu().contiguous()
        if str(t.dtype) == "torch.bfloat16":
            import torch

            t = t.view(torch.int16)
        return t.numpy()
    return None


def _same_array(a: np.ndarray, b: np.ndarray) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes())


def state_diff(a: Any, b: Any, path: str = "", limit: int = 50) -> list[str]:
    """Differences between ``a`` and ``b`` as ``"path: what"`` strings (``[]``: equal)."""
    out: list[str] = []

    def walk(x: Any, y: Any, p: str) -> None:
        if len(out) >= limit:
            return
        ax, ay = _leaf_array(x), _leaf_array(y)
        if ax is not None or ay is not None:
            if ax is None or ay is None:
                out.append(f"{p}: array vs {type(y if ax is not None else x).__name__}")
            elif not _same_array(ax, ay):
                out.append(f"{p}: arrays differ ({ax.dtype} {ax.shape} vs {ay.dtype} {ay.shape})")
            return
        if isinstance(x, Mapping) and isinstance(y, Mapping):
            for k in sorted(set(x) | set(y), key=repr):
                if k not in x or k not in y:
                    out.append(f"{p}{'.' if p else ''}{k}: only in {'b' if k not in x else 'a'}")
                else:
                    walk(x[k], y[k], f"{p}{'.' if p else ''}{k}")
            return
        if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
            if len(x) != len(y) or type(x) is not type(y):
                out.append(f"{p}: {type(x).__name__}[{len(x)}] vs {type(y).__name__}[{len(y)}]")
                return
            for i, (u, v) in enumerate(zip(x, y)):
                walk(u, v, f"{p}[{i}]")
            return
        if isinstance(x, float) and isinstance(y, float):
            if np.float64(x).tobytes() != np.float64(y).tobytes():
                out.append(f"{p}: {x!r} != {y!r}")
            return
        if type(x) is not type(y) or x != y:
            out.append(f"{p}: {x!r} != {y!r}")

    walk(a, b, path)
    return out


def state_digest(state: Any) -> str:
    """A sha256 over the state's structure and bytes (dict order does not matter)."""
    h = hashlib.sha256()

    def walk(x: Any) -> None:
        arr = _leaf_array(x)
        if arr is not None:
            h.update(f"A{arr.dtype.str}{arr.shape}".encode())
            h.update(np.ascontiguousarray(arr).tobytes())
        elif isinstance(x, Mapping):
            h.update(b"{")
            for k in sorted(x, key=repr):
                h.update(repr(k).encode())
                walk(x[k])
            h.update(b"}")
        elif isinstance(x, (list, tuple)):
            h.update(b"[" if isinstance(x, list) else b"(")
            for v in x:
                walk(v)
            h.update(b"]")
        elif isinstance(x, float):
            h.update(b"f" + np.float64(x).tobytes())
        else:
            h.update(f"{type(x).__name__}:{x!r}".encode())

    walk(state)
    return h.hexdigest()


def assert_states_equal(a: Any, b: Any, what: str = "state") -> None:
    """Raise ``AssertionError`` listing the differences when ``a`` and ``b`` differ."""
    diff = state_diff(a, b)
    if diff:
        raise AssertionError(f"{what} differs:\n  " + "\n  ".join(diff))
