"""Frozen, validated configuration of an embedding table and its sparse optimizer."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from monolith_py.errors import ConfigError

__all__ = ["OptimizerConfig", "TableConfig", "OPTIMIZERS", "INITIALIZERS", "POOLINGS"]

OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad", "adam", "ftrl")
INITIALIZERS = ("zeros", "uniform", "normal")
POOLINGS = ("sum", "mean")

_EPS_DEFAULT = {"adagrad": 1e-10, "rowwise_adagrad": 1e-8, "adam": 1e-8}
_ACC_DEFAULT = {"adagrad": 0.0, "rowwise_adagrad": 0.0, "ftrl": 0.1}


def _finite_number(owner: str, name: str, value: Any, *, lo: float | None = None,
                   lo_open: bool = False, hi: float | None = None, hi_open: bool = False,
                   fix: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{owner}.{name} must be a finite number, got {value!r}. {fix}".strip())
    bad_lo = lo is not None and (value <= lo if lo_open else value < lo)
    bad_hi = hi is not None and (value >= hi if hi_open else value > hi)
    if bad_lo or bad_hi:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        rng = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"
        raise ConfigError(f"{owner}.{name} must be in {rng}, got {value!r}. {fix}".strip())


@dataclass(frozen=True)
class OptimizerConfig:
    """The sparse optimizer of one table, applied to the unique rows of each batch.

    Args:
        kind: ``"sgd"``, ``"adagrad"``, ``"rowwise_adagrad"``, ``"adam"`` or ``"ftrl"``.
        lr: learning rate (FTRL's alpha).
        eps: added to the denominator (Adagrad/Adam); ``None`` = the kind's default
            (1e-10 adagrad as in ``torch.optim.Adagrad``, 1e-8 rowwise_adagrad and adam).
        beta1, beta2: Adam's moment decay rates.
        initial_accumulator_value: starting value of the Adagrad sum / FTRL ``n``;
            ``None`` = 0 for Adagrad, 0.1 for FTRL.
        l1, l2: FTRL regularization strengths.
        beta: FTRL's beta (denominator smoothing).

    Example::

        >>> OptimizerConfig("adam", lr=1e-3).kind
        'adam'
    """

    kind: str = "adagrad"
    lr: float = 0.01
    eps: float | None = None
    beta1: float = 0.9
    beta2: float = 0.999
    initial_accumulator_value: float | None = None
    l1: float = 0.0
    l2: float = 0.0
    beta: float = 1.0

    def __post_init__(self) -> None:
        o = "OptimizerConfig"
        if self.kind not in OPTIMIZERS:
            raise ConfigError(f"{o}.kind must be one of {OPTIMIZERS}, got {self.kind!r}")
        _finite_number(o, "lr", self.lr, lo=0.0, lo_open=True, fix="Use e.g. lr=0.01.")
        if self.eps is not None:
            _finite_number(o, "eps", self.eps, lo=0.0, lo_open=True)
        _finite_number(o, "beta1", self.beta1, lo=0.0, hi=1.0, hi_open=True)
        _finite_number(o, "beta2", self.beta2, lo=0.0, hi=1.0, hi_open=True)
        if self.initial_accumulator_value is not None:
            _finite_number(o, "initial_accumulator_value", self.initial_accumulator_value, lo=0.0)
        _finite_number(o, "l1", self.l1, lo=0.0)
        _finite_number(o, "l2", self.l2, lo=0.0)
        _finite_number(o, "beta", self.beta, lo=0.0)
        if self.kind == "ftrl" and self.resolved_accumulator() == 0.0 and self.beta == 0.0:
            raise ConfigError(
                f"{o}: ftrl with initial_accumulator_value=0 and beta=0 divides by zero "
                "on rows without gradient; set beta > 0 or initial_accumulator_value > 0"
            )

    def resolved_eps(self) -> float:
        """``eps`` with the kind's default filled in."""
        return float(self.eps) if self.eps is not None else _EPS_DEFAULT.get(self.kind, 0.0)

    def resolved_accumulator(self) -> float:
        """``initial_accumulator_value`` with the kind's default filled in."""
        if self.initial_accumulator_value is not None:
            return float(self.initial_accumulator_value)
        return _ACC_DEFAULT.get(self.kind, 0.0)


@dataclass(frozen=True)
class TableConfig:
    """One collisionless embedding table.

    Args:
        name: table name (unique within a model).
        dim: embedding width.
        feature_names: sparse features looked up in this table (default: ``(name,)``,
            used by :class:`~monolith_py.modules.DynamicEmbeddingBagCollection`).
        pooling: ``"sum"`` or ``"mean"`` (used by the module, not the table).
        optimizer: the sparse optimizer.
        initializer: ``"zeros"``, ``"uniform"`` (in ``[-init_scale, init_scale)``) or
            ``"normal"`` (std ``init_scale``). The initial row of a key depends only on
            ``(seed, key)``.
        init_scale: ``None`` = ``1 / sqrt(dim)``.
        seed: initializer seed (the admission filter's hashes are fixed, not seeded).
        admit_threshold: a key is inserted once it has been sighted this many times
            (1 = on first sight); at most 255.
        filter_memory_bytes: memory of the admission count-min sketch (used when
            ``admit_threshold > 1``).
        ttl_seconds: rows whose last update is older than this (event time) are evicted
            by ``evict_expired``; ``None`` = never.
        initial_capacity: rows (and index slots) to allocate up front.
        max_load_factor: of the cuckoo index.

    Example::

        >>> cfg = TableConfig("item", dim=16, optimizer=OptimizerConfig("adam", lr=1e-3),
        ...                   admit_threshold=2, ttl_seconds=86400)
        >>> cfg.feature_names
        ('item',)
    """

    name: str
    dim: int
    feature_names: tuple[str, ...] = ()
    pooling: str = "sum"
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    initializer: str = "uniform"
    init_scale: float | None = None
    seed: int = 0
    admit_threshold: int = 1
    filter_memory_bytes: int = 1 << 20
    ttl_seconds: int | None = None
    initial_capacity: int = 1024
    max_load_factor: float = 0.9

    def __post_init__(self) -> None:
        t = f"TableConfig({self.name!r})" if isinstance(self.name, str) else "TableConfig"
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"TableConfig.name must be a non-empty string, got {self.name!r}")
        if isinstance(self.dim, bool) or not isinstance(self.dim, int) or not 1 <= self.dim <= 65536:
            raise ConfigError(f"{t}.dim must be an int in [1, 65536], got {self.dim!r}")
        names = self.feature_names
        if isinstance(names, str) or not all(isinstance(f, str) and f for f in names):
            raise ConfigError(
                f"{t}.feature_names must be a tuple of non-empty strings, got {names!r}"
            )
        object.__setattr__(self, "feature_names", tuple(names) if names else (self.name,))
        if len(set(self.feature_names)) != len(self.feature_names):
            raise ConfigError(f"{t}.feature_names has duplicates: {self.feature_names}")
        if self.pooling not in POOLINGS:
            raise ConfigError(f"{t}.pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if not isinstance(self.optimizer, OptimizerConfig):
            raise ConfigError(
                f"{t}.optimizer must be an OptimizerConfig, got {type(self.optimizer).__name__}"
            )
        if self.initializer not in INITIALIZERS:
            raise ConfigError(
                f"{t}.initializer must be one of {INITIALIZERS}, got {self.initializer!r}"
            )
        if self.init_scale is not None:
            _finite_number(t, "init_scale", self.init_scale, lo=0.0)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ConfigError(f"{t}.seed must be an int in [0, 2**63), got {self.seed!r}")
        a = self.admit_threshold
        if isinstance(a, bool) or not isinstance(a, int) or not 1 <= a <= 255:
            raise ConfigError(
                f"{t}.admit_threshold must be an int in [1, 255] (1 admits on first sight), "
                f"got {a!r}"
            )
        m = self.filter_memory_bytes
        if isinstance(m, bool) or not isinstance(m, int) or not 64 <= m <= 1 << 36:
            raise ConfigError(
                f"{t}.filter_memory_bytes must be an int in [64, 2**36], got {m!r}; about "
                "1 byte per distinct id expected between evictions keeps over-counting low"
            )
        ttl = self.ttl_seconds
        if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int) or ttl <= 0):
            raise ConfigError(f"{t}.ttl_seconds must be a positive int or None, got {ttl!r}")
        c = self.initial_capacity
        if isinstance(c, bool) or not isinstance(c, int) or not 1 <= c <= 1 << 34:
            raise ConfigError(f"{t}.initial_capacity must be an int in [1, 2**34], got {c!r}")
        _finite_number(t, "max_load_factor", self.max_load_factor, lo=0.0, lo_open=True, hi=0.97,
                       fix="0.9 is a good value.")

    @property
    def resolved_init_scale(self) -> float:
        """``init_scale`` with its default (``1/sqrt(dim)``) filled in."""
        return float(self.init_scale) if self.init_scale is not None else 1.0 / math.sqrt(self.dim)
