"""Deterministic row initializers: the initial row of a key depends only on ``(seed, key)``.

Every element is drawn from a counter-based generator (a 64-bit mix of the seed, the key
and the element index), so whichever shard, process or replay creates a key creates the
same row, without any RNG state to carry around.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from monolith_py.errors import ConfigError
from monolith_py.table._arrays import as_keys
from monolith_py.table._kernels import mix64

__all__ = ["initial_rows", "INIT_KINDS"]

INIT_KINDS = {"zeros": 0, "uniform": 1, "normal": 2}
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_SEED_SALT = np.uint64(0xD1B54A32D192ED03)
_S11 = np.uint64(11)
_TWO_PI = 2.0 * math.pi
_INV53 = 1.0 / 9007199254740992.0  # 2**-53


@njit(cache=True)
def init_rows(weights, rows, keys, kind, scale, seed):  # type: ignore[no-untyped-def]
    """weights[rows[i]] = initial row of keys[i] (kind 0 zeros, 1 uniform, 2 normal)."""
    dim = weights.shape[1]
    s = mix64(np.uint64(seed) * _GOLDEN + _SEED_SALT)
    for i in range(rows.shape[0]):
        r = rows[i]
        if kind == 0:
            for j in range(dim):
                weights[r, j] = 0.0
            continue
        base = mix64(np.uint64(keys[i]) ^ s)
        for j in range(dim):
            h = mix64(base + np.uint64(2 * j + 1) * _GOLDEN)
            u1 = (np.float64(h >> _S11) + 1.0) * _INV53  # (0, 1]
            if kind == 1:
                weights[r, j] = np.float32((2.0 * u1 - 1.0) * scale)
            else:
                h2 = mix64(base + np.uint64(2 * j + 2) * _GOLDEN)
                u2 = np.float64(h2 >> _S11) * _INV53
                z = math.sqrt(-2.0 * math.log(u1)) * math.cos(_TWO_PI * u2)
                weights[r, j] = np.float32(z * scale)


def initial_rows(keys: object, dim: int, initializer: str = "uniform", scale: float = 0.25,
                 seed: int = 0) -> np.ndarray:
    """Initial rows of ``keys`` as float32 ``[n, dim]``.

    ``uniform`` draws from ``[-scale, scale)``, ``normal`` from N(0, scale**2), ``zeros``
    gives zeros. Same ``(seed, key)``, same row.

    Example::

        >>> a = initial_rows([5, 6], dim=4, seed=1)
        >>> b = initial_rows([6], dim=4, seed=1)
        >>> bool((a[1] == b[0]).all())
        True
    """
    if initializer not in INIT_KINDS:
        raise ConfigError(f"initializer must be one of {tuple(INIT_KINDS)}, got {initializer!r}")
    k = as_keys(keys)
    out = np.empty((k.shape[0], int(dim)), dtype=np.float32)
    init_rows(out, np.arange(k.shape[0], dtype=np.int64), k, INIT_KINDS[initializer],
              float(scale), int(seed))
    return out
