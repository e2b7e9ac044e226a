"""Model specs: a JSON-able description of a ranking model that builds it.

Serving workers receive dense weights as plain tensors (never pickled modules), so they
need to know which class to build and with which arguments. :class:`ModelSpec` is that
description: the model ``kind``, its constructor arguments, ``num_dense`` and the
embedding tables' configs. ``to_dict()`` / ``from_dict()`` round-trip through JSON, and
``from_dict`` validates everything (unknown keys, types, sizes) because a spec may come
from the wire.

Example::

    >>> from monolith_py.table import TableConfig
    >>> spec = ModelSpec.dlrm([TableConfig("item", dim=8)], num_dense=3,
    ...                       bottom_mlp=(16, 8), top_mlp=(16,))
    >>> same = ModelSpec.from_json(spec.to_json())
    >>> same == spec, same.feature_names
    (True, ('item',))
    >>> model = same.build()
    >>> sorted(model.state_dict())[:2]
    ['bottom.0.bias', 'bottom.0.weight']
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from monolith_py.errors import ConfigError
from monolith_py.table.backend import SparseBackend
from monolith_py.table.config import OptimizerConfig, TableConfig

__all__ = ["ModelSpec", "MODEL_KINDS", "table_config_to_dict", "table_config_from_dict"]

SPEC_FORMAT = 1
MAX_TABLES = 1024
MAX_LAYERS = 16
MAX_WIDTH = 1 << 16
MAX_NUM_DENSE = 1 << 16

#: kind -> {argument: (type tag, default)}; type tags: "sizes" (list of positive ints),
#: or a tuple of allowed strings.
_KIND_ARGS: dict[str, dict[str, tuple[Any, Any]]] = {
    "dlrm": {
        "bottom_mlp": ("sizes", ()),
        "top_mlp": ("sizes", ()),
        "interaction": (("cat", "dot"), "dot"),
    },
    "deepfm": {"deep_mlp": ("sizes", ())},
}
MODEL_KINDS = tuple(_KIND_ARGS)

_OPT_FIELDS = {f.name for f in dataclasses.fields(OptimizerConfig)}
_TABLE_FIELDS = {f.name for f in dataclasses.fields(TableConfig)}


def _unknown(owner: str, got: Mapping[str, Any], allowed: set[str]) -> None:
    extra = sorted(set(got) - allowed)
    if extra:
        raise ConfigError(f"{owner}: unknown key(s) {extra}; allowed: {sorted(allowed)}")


def table_config_to_dict(cfg: TableConfig) -> dict[str, Any]:
    """A :class:`TableConfig` as a JSON-able dict (the optimizer nested)."""
    d = dataclasses.asdict(cfg)
    d["feature_names"] = list(cfg.feature_names)
    return d


def table_config_from_dict(d: Any) -> TableConfig:
    """Inverse of :func:`table_config_to_dict`; unknown keys and bad values raise
    :class:`~monolith_py.errors.ConfigError`."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"a table config must be an object, got {type(d).__name__}")
    _unknown("table config", d, _TABLE_FIELDS)
    kw = dict(d)
    opt = kw.pop("optimizer", None)
    if opt is not None:
        if not isinstance(opt, Mapping):
            raise ConfigError(f"table optimizer must be an object, got {type(opt).__name__}")
        _unknown("optimizer config", opt, _OPT_FIELDS)
        try:
            kw["optimizer"] = OptimizerConfig(**opt)
        except TypeError as exc:  # pragma: no cover - every field has a default
            raise ConfigError(f"bad optimizer config: {exc}") from exc
    names = kw.get("feature_names")
    if isinstance(names, list):
        kw["feature_names"] = tuple(names)
    try:
        return TableConfig(**kw)
    except TypeError as exc:
        raise ConfigError(f"bad table config: {exc}; required: name, dim") from exc


def _sizes(owner: str, value: Any) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ConfigError(f"{owner} must be a list of positive ints, got {value!r}")
    if len(value) > MAX_LAYERS:
        raise ConfigError(f"{owner} has {len(value)} layers, at most {MAX_LAYERS} allowed")
    out = []
    for s in value:
        if isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= MAX_WIDTH:
            raise ConfigError(f"{owner} sizes must be ints in [1, {MAX_WIDTH}], got {value!r}")
        out.append(int(s))
    return tuple(out)


@dataclass(frozen=True)
class ModelSpec:
    """What to build: ``kind`` (``"dlrm"`` or ``"deepfm"``), its arguments, the tables.

    Args:
        kind: a name from :data:`MODEL_KINDS`.
        num_dense: width of the dense input ``[B, num_dense]``.
        tables: one :class:`TableConfig` per embedding table (features in their
            ``feature_names``).
        args: the kind's constructor arguments (``dlrm``: ``bottom_mlp``, ``top_mlp``,
            ``interaction``; ``deepfm``: ``deep_mlp``); missing ones take their default.
    """

    kind: str
    num_dense: int
    tables: tuple[TableConfig, ...]
    args: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in _KIND_ARGS:
            raise ConfigError(f"ModelSpec.kind must be one of {MODEL_KINDS}, got {self.kind!r}")
        nd = self.num_dense
        if isinstance(nd, bool) or not isinstance(nd, int) or not 0 <= nd <= MAX_NUM_DENSE:
            raise ConfigError(f"ModelSpec.num_dense must be an int in [0, {MAX_NUM_DENSE}], "
                              f"got {nd!r}")
        tables = tuple(self.tables)
        if not tables or len(tables) > MAX_TABLES:
            raise ConfigError(f"ModelSpec needs 1..{MAX_TABLES} tables, got {len(tables)}")
        if not all(isinstance(t, TableConfig) for t in tables):
            raise ConfigError("ModelSpec.tables must be TableConfig objects")
        object.__setattr__(self, "tables", tables)
        if not isinstance(self.args, Mapping):
            raise ConfigError(f"ModelSpec.args must be a mapping, got {type(self.args).__name__}")
        allowed = _KIND_ARGS[self.kind]
        _unknown(f"ModelSpec({self.kind}).args", self.args, set(allowed))
        args: dict[str, Any] = {}
        for name, (tag, default) in allowed.items():
            value = self.args.get(name, default)
            if tag == "sizes":
                args[name] = _sizes(f"ModelSpec({self.kind}).args.{name}", value)
            elif value not in tag:
                raise ConfigError(
                    f"ModelSpec({self.kind}).args.{name} must be one of {tag}, got {value!r}")
            else:
                args[name] = value
        object.__setattr__(self, "args", args)

    # -- constructors -------------------------------------------------------------------

    @classmethod
    def dlrm(cls, tables: Sequence[TableConfig], num_dense: int, bottom_mlp: Sequence[int],
             top_mlp: Sequence[int], interaction: str = "dot") -> ModelSpec:
        """Spec of :class:`~monolith_py.modules.DLRM`."""
        return cls("dlrm", num_dense, tuple(tables), {
            "bottom_mlp": tuple(bottom_mlp), "top_mlp": tuple(top_mlp),
            "interaction": interaction})

    @classmethod
    def deepfm(cls, tables: Sequence[TableConfig], num_dense: int,
               deep_mlp: Sequence[int]) -> ModelSpec:
        """Spec of :class:`~monolith_py.modules.DeepFM`."""
        return cls("deepfm", num_dense, tuple(tables), {"deep_mlp": tuple(deep_mlp)})

    # -- introspection --------------------------------------------------------------------

    @property
    def feature_names(self) -> tuple[str, ...]:
        """Sparse features in the embedding module's output order."""
        return tuple(f for t in self.tables for f in t.feature_names)

    def table_dims(self) -> dict[str, int]:
        """``{table name: dim}``."""
        return {t.name: int(t.dim) for t in self.tables}

    # -- JSON -----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (``json.dumps`` works on it)."""
        return {
            "format": SPEC_FORMAT,
            "kind": self.kind,
            "num_dense": self.num_dense,
            "args": {k: list(v) if isinstance(v, tuple) else v for k, v in self.args.items()},
            "tables": [table_config_to_dict(t) for t in self.tables],
        }

    @classmethod
    def from_dict(cls, d: Any) -> ModelSpec:
        """Validate and build a spec from :meth:`to_dict` output (possibly hostile)."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"a model spec must be an object, got {type(d).__name__}")
        _unknown("model spec", d, {"format", "kind", "num_dense", "args", "tables"})
        if d.get("format", SPEC_FORMAT) != SPEC_FORMAT:
            raise ConfigError(f"model spec format {d.get('format')!r} is not supported "
                              f"(expected {SPEC_FORMAT})")
        tables = d.get("tables")
        if not isinstance(tables, list):
            raise ConfigError("model spec 'tables' must be a list of table configs")
        if len(tables) > MAX_TABLES:
            raise ConfigError(f"model spec has {len(tables)} tables, at most {MAX_TABLES}")
        args = d.get("args", {})
        if not isinstance(args, Mapping):
            raise ConfigError("model spec 'args' must be an object")
        return cls(kind=d.get("kind"),  # type: ignore[arg-type]
                   num_dense=d.get("num_dense"),  # type: ignore[arg-type]
                   tables=tuple(table_config_from_dict(t) for t in tables), args=dict(args))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> ModelSpec:
        try:
            d = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"model spec is not JSON: {exc}") from exc
        return cls.from_dict(d)

    # -- building -------------------------------------------------------------------------

    def build(self, backend: SparseBackend | None = None, seed: int | None = None) -> nn.Module:
        """The model: ``model(dense [B, num_dense], kjt) -> logits [B]``.

        Args:
            backend: where the embedding rows live (default: new in-process tables).
            seed: seeds the dense layers' initialization (the global torch RNG is left
                as it was); ``None`` draws from the global RNG.
        """
        import torch

        from monolith_py.modules.embedding_bag_collection import DynamicEmbeddingBagCollection
        from monolith_py.modules.models import DLRM, DeepFM

        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(int(seed))
            ebc = DynamicEmbeddingBagCollection(list(self.tables), backend=backend)
            a = self.args
            if self.kind == "dlrm":
                return DLRM(ebc, num_dense=self.num_dense, bottom_mlp=a["bottom_mlp"],
                            top_mlp=a["top_mlp"], interaction=a["interaction"])
            return DeepFM(ebc, num_dense=self.num_dense, deep_mlp=a["deep_mlp"])
