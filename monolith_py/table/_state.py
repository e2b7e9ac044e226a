"""Validation of a table state dict (private). States come from snapshots and checkpoints,
i.e. from outside: every field is checked before anything is loaded."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from numba import njit, prange

from monolith_py.errors import InvalidInputError

__all__: list[str] = []  # private module

STATE_FORMAT = "monolith_py.table/1"
_COUNTERS = ("admitted", "filtered", "evicted", "erased")


@njit(cache=True, parallel=True)
def _count_nonfinite(a):  # type: ignore[no-untyped-def]
    """NaN and inf entries of a 2-D float array, without a temporary as large as ``a`` (a
    restored table's weights and slots are most of its memory)."""
    bad = 0
    for i in prange(a.shape[0]):
        for j in range(a.shape[1]):
            v = a[i, j]
            if v - v != 0:
                bad += 1
    return bad


@njit(cache=True)
def _increasing(keys):  # type: ignore[no-untyped-def]
    for i in range(1, keys.shape[0]):
        if keys[i] <= keys[i - 1]:
            return False
    return True


def _array(state: Mapping[str, Any], name: str, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
    if name not in state:
        raise InvalidInputError(f"table state lacks {name!r}")
    value = state[name]
    if hasattr(value, "detach"):  # torch tensor
        value = value.detach().cpu().numpy()
    if not isinstance(value, np.ndarray):
        raise InvalidInputError(f"table state {name!r} must be an array, got {type(value).__name__}")
    if value.dtype != np.dtype(dtype):
        raise InvalidInputError(f"table state {name!r} must be {np.dtype(dtype)}, got {value.dtype}")
    if len(shape) != value.ndim or any(s >= 0 and s != v for s, v in zip(shape, value.shape)):
        want = "[" + ", ".join("*" if s < 0 else str(s) for s in shape) + "]"
        raise InvalidInputError(f"table state {name!r} must have shape {want}, got {value.shape}")
    return value


def _int(state: Mapping[str, Any], name: str, lo: int = 0) -> int:
    value: Any = state.get(name)
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < lo:
        raise InvalidInputError(f"table state {name!r} must be an int >= {lo}, got {value!r}")
    return int(value)


def check_state(
    state: Mapping[str, Any],
    dim: int,
    optimizer: str,
    specs: Mapping[str, tuple[int, float]],
    filter_counters: np.ndarray | None,
) -> dict[str, Any]:
    """Validate ``state`` against the table's shape; return the fields as typed values."""
    if not isinstance(state, Mapping):
        raise InvalidInputError(f"table state must be a mapping, got {type(state).__name__}")
    if state.get("format") != STATE_FORMAT:
        raise InvalidInputError(f"table state format must be {STATE_FORMAT!r}, got {state.get('format')!r}")
    if _int(state, "dim", 1) != dim:
        raise InvalidInputError(f"table state has dim {state['dim']}, this table has dim {dim}")
    if state.get("optimizer") != optimizer:
        raise InvalidInputError(
            f"table state was trained with optimizer {state.get('optimizer')!r}, this table "
            f"uses {optimizer!r}"
        )
    keys = _array(state, "keys", np.int64, (-1,))
    n = keys.shape[0]
    if n and (keys[0] == np.iinfo(np.int64).min or not _increasing(keys)):
        raise InvalidInputError("table state keys must be strictly increasing and not INT64_MIN")
    out: dict[str, Any] = {"keys": keys}
    out["weights"] = _array(state, "weights", np.float32, (n, dim))
    for name, (width, _) in specs.items():
        out[f"slot.{name}"] = _array(state, f"slot.{name}", np.float32, (n, width))
    for name in ("weights", *(f"slot.{s}" for s in specs)):
        if n and _count_nonfinite(out[name]):
            raise InvalidInputError(f"table state {name!r} contains NaN or inf")
    for name in ("last_update", "update_count", "row_version"):
        out[name] = _array(state, name, np.int64, (n,))
    if n and int(out["update_count"].min()) < 0:
        raise InvalidInputError("table state 'update_count' must be >= 0")
    out["version"] = _int(state, "version")
    out["clock"] = _int(state, "clock", lo=-(2**62))
    if n and int(out["row_version"].max()) > out["version"]:
        raise InvalidInputError("table state has a row version above the table version")
    out["pending"] = _array(state, "pending", np.int64, (-1,))
    dk = _array(state, "deleted_keys", np.int64, (-1,))
    out["deleted_keys"] = dk
    out["deleted_versions"] = _array(state, "deleted_versions", np.int64, (dk.shape[0],))
    for name in _COUNTERS:
        out[f"stat.{name}"] = _int(state, f"stat.{name}")
    if filter_counters is not None:
        out["filter.counters"] = _array(
            state, "filter.counters", np.uint8, tuple(filter_counters.shape)
        )
    return out
