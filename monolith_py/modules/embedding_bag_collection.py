"""A drop-in for TorchRec's ``EmbeddingBagCollection`` backed by collisionless tables.

``KeyedJaggedTensor`` in, ``KeyedTensor`` out, same key order and layout as TorchRec's
EBC; the rows live in a :class:`~monolith_py.table.backend.SparseBackend` (in-process
tables by default, parameter-server shards in multi-process mode) instead of fixed-size
``nn.Parameter`` matrices.

How a training step flows:

1. ``forward(kjt)`` validates the KJT (before anything changes), deduplicates the ids per
   table in one compiled pass, fetches the unique rows of every table in **one** backend
   call, gathers them into one ``[U, dim]`` autograd leaf per embedding width, and pools
   the bags from that leaf straight into the example-major ``[B, F * dim]`` output
   (:mod:`monolith_py.modules._pooling`: compiled loops on CPU, ``embedding_bag``
   elsewhere).
2. ``loss.backward()`` therefore leaves the gradient of each *unique* row in that leaf's
   ``.grad`` -- the per-id gradient, already summed over every occurrence in the batch.
3. ``apply_sparse_gradients(now)`` hands those gradients to the backend (one call for all
   tables), whose tables run their own sparse optimizers.

In eval mode, or under ``torch.no_grad()``, the lookup is read-only: nothing is admitted
or inserted and nothing is remembered for a later update.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from monolith_py.errors import ConfigError, InvalidInputError, InvalidTypeError
from monolith_py.modules._dedup import dedup_by_table
from monolith_py.modules._pooling import pool_unique_rows
from monolith_py.table.backend import LocalBackend, SparseBackend

if TYPE_CHECKING:  # pragma: no cover
    from monolith_py.table import TableConfig

__all__ = ["DynamicEmbeddingBagCollection", "from_torchrec_config"]

# An EmbeddingBagConfig's num_embeddings is a fixed size in TorchRec; here tables grow, so
# it only pre-sizes them, up to this many rows (a 10^9-row config must not allocate 10^9).
_MAX_PRESIZE_ROWS = 1 << 20


def from_torchrec_config(config: Any, **overrides: Any) -> TableConfig:
    """A :class:`~monolith_py.table.TableConfig` from TorchRec's ``EmbeddingBagConfig``.

    ``name``, ``embedding_dim`` -> ``dim``, ``feature_names`` and ``pooling`` (SUM/MEAN)
    carry over; ``num_embeddings`` only pre-sizes the growing table (up to 2**20 rows);
    ``overrides`` set any other field (optimizer, admit_threshold, ttl_seconds, ...).

    Example::

        >>> from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
        >>> cfg = from_torchrec_config(EmbeddingBagConfig(
        ...     name="t_item", embedding_dim=8, num_embeddings=1000,
        ...     feature_names=["item"], pooling=PoolingType.MEAN), admit_threshold=2)
        >>> cfg.dim, cfg.feature_names, cfg.pooling, cfg.admit_threshold
        (8, ('item',), 'mean', 2)
    """
    from monolith_py.table import TableConfig

    pooling = getattr(getattr(config, "pooling", None), "name", "SUM").lower()
    if pooling not in ("sum", "mean"):
        raise ConfigError(
            f"table {config.name!r}: pooling {pooling.upper()} is not supported by "
            "DynamicEmbeddingBagCollection; use PoolingType.SUM or PoolingType.MEAN"
        )
    fields: dict[str, Any] = {
        "name": config.name,
        "dim": int(config.embedding_dim),
        "feature_names": tuple(config.feature_names),
        "pooling": pooling,
        "initial_capacity": max(1, min(int(config.num_embeddings), _MAX_PRESIZE_ROWS)),
    }
    fields.update(overrides)
    return TableConfig(**fields)


def _as_table_config(config: Any) -> TableConfig:
    if hasattr(config, "embedding_dim") and hasattr(config, "num_embeddings"):
        return from_torchrec_config(config)
    return config  # type: ignore[no-any-return]


@dataclass(frozen=True)
class _Layout:
    """Everything about a KJT key order that can be computed once and cached."""

    seg_table: np.ndarray  # int64 [F_kjt]: dedup-order table index of each KJT key
    members: tuple[np.ndarray, ...]  # per dim group: KJT positions of its features, config order
    mean: np.ndarray  # bool [F_kjt]: KJT keys pooled by mean
    # per config feature: (group, index among the group's features); None when there is one
    # group (its output already is the module's output)
    feature_src: tuple[tuple[int, int], ...] | None


@dataclass
class _Pending:
    """What one training forward leaves for :meth:`apply_sparse_gradients`."""

    keys: dict[str, torch.Tensor]  # table -> unique keys
    leaves: list[torch.Tensor]  # per dim group: gathered rows [U_g, d_g] (requires grad)
    # per table: (group index, start row, end row) inside that group's leaf
    slices: dict[str, tuple[int, int, int]]


class DynamicEmbeddingBagCollection(nn.Module):
    """Pooled embeddings of several sparse features from collisionless, growing tables.

    Args:
        tables: one :class:`~monolith_py.table.TableConfig` per table; a table serves the
            features named in its ``feature_names`` (its own name when empty), so several
            features may share one table. ``pooling`` ("sum" or "mean") and ``dim`` come
            from the config. TorchRec ``EmbeddingBagConfig``s are accepted too (see
            :func:`from_torchrec_config`), so ``EmbeddingBagCollection(tables=...)`` code
            ports by changing the class name.
        backend: where the rows live. ``None`` builds a
            :class:`~monolith_py.table.backend.LocalBackend` of new
            :class:`~monolith_py.table.EmbeddingTable`s on ``device``.
        device: where the output (and, for the default backend, the arenas) lives.
        is_weighted: as in TorchRec: when True the KJT must carry ``weights`` and each
            id's row is scaled by its weight before pooling; when False weights are ignored.

    Shapes: ``forward(kjt)`` takes a KJT with stride ``B`` whose keys are exactly the
    configured features (any order) and returns a ``KeyedTensor`` whose ``values()`` is
    float32 ``[B, sum of dims]``: features in config order (table by table, features in
    ``feature_names`` order), each ``dim`` wide. Empty bags pool to zeros.

    Example::

        >>> import torch
        >>> from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
        >>> from monolith_py.table import TableConfig
        >>> ebc = DynamicEmbeddingBagCollection([
        ...     TableConfig("user", dim=4, feature_names=("user",)),
        ...     TableConfig("item", dim=4, feature_names=("item", "clicked_items")),
        ... ])
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(
        ...     keys=["user", "item", "clicked_items"],
        ...     values=torch.tensor([7, 8, 100, 101, 100, 102, 103]),
        ...     lengths=torch.tensor([1, 1, 1, 1, 3, 0]))
        >>> out = ebc(kjt)
        >>> out.keys(), out.values().shape
        (['user', 'item', 'clicked_items'], torch.Size([2, 12]))
        >>> out.values().sum().backward()
        >>> ebc.apply_sparse_gradients(now=1_700_000_000)
    """

    def __init__(
        self,
        tables: Sequence[TableConfig],
        backend: SparseBackend | None = None,
        device: torch.device | str = "cpu",
        is_weighted: bool = False,
    ) -> None:
        super().__init__()
        if not tables:
            raise ConfigError("DynamicEmbeddingBagCollection needs at least one TableConfig")
        self._device = torch.device(device)
        self._is_weighted = bool(is_weighted)
        self._configs: tuple[TableConfig, ...] = tuple(_as_table_config(t) for t in tables)

        names = [c.name for c in self._configs]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ConfigError(f"table names must be unique, got duplicates {dup}")
        feature_names: list[str] = []
        feature_table: dict[str, str] = {}
        for c in self._configs:
            pooling = str(getattr(c, "pooling", "sum")).lower()
            if pooling not in ("sum", "mean"):
                raise ConfigError(
                    f"table {c.name!r}: pooling must be 'sum' or 'mean', got {pooling!r}"
                )
            for f in tuple(c.feature_names) or (c.name,):
                if f in feature_table:
                    raise ConfigError(
                        f"feature {f!r} is served by two tables ({feature_table[f]!r} and "
                        f"{c.name!r}); give each feature one table"
                    )
                feature_table[f] = c.name
                feature_names.append(f)
        self._feature_names: list[str] = feature_names
        self._feature_table = feature_table
        cfg_by_name = {c.name: c for c in self._configs}
        self._feature_dim = {f: int(cfg_by_name[t].dim) for f, t in feature_table.items()}
        self._feature_mean = {
            f: str(getattr(cfg_by_name[t], "pooling", "sum")).lower() == "mean"
            for f, t in feature_table.items()
        }
        self._length_per_key = [self._feature_dim[f] for f in feature_names]

        # Dim groups (one embedding_bag call each), in order of first appearance; tables
        # are deduplicated in group order so a group's unique rows are contiguous.
        dims: list[int] = []
        for c in self._configs:
            if int(c.dim) not in dims:
                dims.append(int(c.dim))
        self._group_dims = dims
        self._dedup_tables: list[str] = [
            c.name for d in dims for c in self._configs if int(c.dim) == d
        ]
        self._table_index = {n: i for i, n in enumerate(self._dedup_tables)}
        self._table_group = {c.name: dims.index(int(c.dim)) for c in self._configs}

        if backend is None:
            from monolith_py.table import EmbeddingTable

            backend = LocalBackend(
                {c.name: EmbeddingTable(c, device=self._device) for c in self._configs}
            )
        self._backend: SparseBackend = backend
        self._layouts: dict[tuple[str, ...], _Layout] = {}
        self._pending: list[_Pending] = []

    # -- introspection ---------------------------------------------------------------------

    @property
    def backend(self) -> SparseBackend:
        """The :class:`SparseBackend` holding the rows."""
        return self._backend

    @property
    def table_configs(self) -> tuple[TableConfig, ...]:
        return self._configs

    def embedding_bag_configs(self) -> list[Any]:
        """The tables as TorchRec ``EmbeddingBagConfig``s (what TorchRec models such as
        ``torchrec.models.dlrm.DLRM`` ask their embedding collection for);
        ``num_embeddings`` is the configured initial capacity, since tables grow."""
        from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType

        return [
            EmbeddingBagConfig(
                name=c.name, embedding_dim=int(c.dim),
                num_embeddings=int(c.initial_capacity),
                feature_names=list(c.feature_names) or [c.name],
                pooling=PoolingType.MEAN if c.pooling == "mean" else PoolingType.SUM,
            )
            for c in self._configs
        ]

    def feature_names(self) -> list[str]:
        """Output keys, in output order (config order)."""
        return list(self._feature_names)

    def embedding_dims(self) -> list[int]:
        """Width of each output key, in output order."""
        return list(self._length_per_key)

    def is_weighted(self) -> bool:
        return self._is_weighted

    @property
    def output_dim(self) -> int:
        """Width of ``forward(kjt).values()``."""
        return sum(self._length_per_key)

    @property
    def pending_updates(self) -> int:
        """Training forwards whose gradients have not been applied yet."""
        return len(self._pending)

    # -- validation ------------------------------------------------------------------------

    def validate_features(self, kjt: KeyedJaggedTensor) -> None:
        """Raise :class:`~monolith_py.errors.InvalidInputError` (naming the feature and the
        problem) unless ``kjt`` is a well-formed input for this module. Changes nothing;
        ``forward`` calls it before touching the backend."""
        if not isinstance(kjt, KeyedJaggedTensor):
            raise InvalidTypeError(f"expected a KeyedJaggedTensor, got {type(kjt).__name__}")
        keys = list(kjt.keys())
        seen: set[str] = set()
        for k in keys:
            if k not in self._feature_table:
                raise InvalidInputError(
                    f"KJT key {k!r} is not a feature of any table "
                    f"(configured features: {self._feature_names})"
                )
            if k in seen:
                raise InvalidInputError(f"KJT key {k!r} appears twice")
            seen.add(k)
        missing = [f for f in self._feature_names if f not in seen]
        if missing:
            raise InvalidInputError(
                f"feature(s) {missing} missing from the KJT (it has keys {keys}); every "
                "configured feature needs a key, with zero lengths when it has no ids"
            )
        values = kjt.values()
        if values.dtype not in (torch.int64, torch.int32):
            raise InvalidTypeError(
                f"feature ids must be int64 (or int32), got {values.dtype} for features {keys}"
            )
        if values.dim() != 1:
            raise InvalidInputError(f"KJT values must be 1-D, got shape {tuple(values.shape)}")
        if kjt.variable_stride_per_key():
            raise InvalidInputError("KJTs with a variable batch size per feature are not supported")
        lengths_t = kjt.lengths()
        b = kjt.stride()
        if lengths_t.numel() != len(keys) * b:
            raise InvalidInputError(
                f"KJT lengths has {lengths_t.numel()} entries, expected {len(keys)} features x "
                f"{b} examples"
            )
        if lengths_t.is_floating_point() or lengths_t.dtype == torch.bool:
            raise InvalidTypeError(f"KJT lengths must be integers, got {lengths_t.dtype}")
        lengths = lengths_t.detach().cpu().numpy().reshape(len(keys), b)
        if lengths.size and int(lengths.min()) < 0:
            bad = [keys[i] for i in np.flatnonzero((lengths < 0).any(axis=1))]
            raise InvalidInputError(f"negative lengths for feature(s) {bad}")
        total = int(lengths.sum()) if lengths.size else 0
        if total != values.numel():
            raise InvalidInputError(
                f"KJT lengths of features {keys} sum to {total} but there are "
                f"{values.numel()} ids"
            )
        if self._is_weighted:
            w = kjt.weights_or_none()
            if w is None:
                raise InvalidInputError(
                    "this collection is weighted (is_weighted=True) but the KJT has no weights"
                )
            if not w.is_floating_point() or w.shape != values.shape:
                raise InvalidInputError(
                    f"KJT weights must be float with the ids' shape {tuple(values.shape)}, got "
                    f"{w.dtype} {tuple(w.shape)}"
                )
            w_np = w.detach().cpu().numpy()
            if w_np.size and not bool(np.isfinite(w_np).all()):
                offs = np.concatenate([[0], np.cumsum(lengths.sum(axis=1))])
                bad_at = int(np.flatnonzero(~np.isfinite(w_np))[0])
                f_idx = int(np.searchsorted(offs, bad_at, side="right") - 1)
                raise InvalidInputError(f"KJT weights of feature {keys[f_idx]!r} contain NaN/inf")

    # -- forward ---------------------------------------------------------------------------

    def _layout(self, keys: tuple[str, ...]) -> _Layout:
        lay = self._layouts.get(keys)
        if lay is not None:
            return lay
        pos = {k: i for i, k in enumerate(keys)}
        group_of = {f: self._table_group[self._feature_table[f]] for f in self._feature_names}
        members = tuple(
            np.array([pos[f] for f in self._feature_names if group_of[f] == g], dtype=np.int64)
            for g in range(len(self._group_dims))
        )
        feature_src: tuple[tuple[int, int], ...] | None = None
        if len(self._group_dims) > 1:
            seen = [0] * len(self._group_dims)
            src = []
            for f in self._feature_names:
                src.append((group_of[f], seen[group_of[f]]))
                seen[group_of[f]] += 1
            feature_src = tuple(src)
        lay = _Layout(
            seg_table=np.array(
                [self._table_index[self._feature_table[k]] for k in keys], dtype=np.int64
            ),
            members=members,
            mean=np.array([self._feature_mean[k] for k in keys], dtype=np.bool_),
            feature_src=feature_src,
        )
        self._layouts[keys] = lay
        return lay

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """Pool each feature's rows: ``KeyedJaggedTensor`` (stride ``B``) ->
        ``KeyedTensor`` with values ``[B, sum of dims]`` (see the class docstring)."""
        self.validate_features(features)
        keys = tuple(features.keys())
        b = features.stride()
        train = self.training and torch.is_grad_enabled()
        lay = self._layout(keys)
        values = features.values()
        if b == 0 or values.numel() == 0:
            return self._zeros(b)

        # Bookkeeping in numpy: small torch ops pay for OpenMP regions on a busy machine.
        lengths = features.lengths().detach().cpu().numpy().astype(np.int64, copy=False)
        lengths = lengths.reshape(len(keys), b)
        seg_offsets = np.zeros(len(keys) + 1, dtype=np.int64)
        np.cumsum(lengths.sum(axis=1), out=seg_offsets[1:])
        uniq, inverse, table_offsets = dedup_by_table(
            values, seg_offsets, lay.seg_table, len(self._dedup_tables)
        )
        request: dict[str, torch.Tensor] = {}
        for t, name in enumerate(self._dedup_tables):
            lo, hi = int(table_offsets[t]), int(table_offsets[t + 1])
            if hi > lo:
                request[name] = uniq[lo:hi]
        rows = self._backend.lookup(request, train=train)

        weights = None
        if self._is_weighted:
            weights = features.weights().detach().cpu().numpy().astype(np.float32, copy=False)
        inv_np = inverse.numpy()
        leaves: list[torch.Tensor] = []
        slices: dict[str, tuple[int, int, int]] = {}
        outs: list[torch.Tensor] = []
        for g, d in enumerate(self._group_dims):
            # this width's unique rows, table after table, as one autograd leaf [U_g, d]
            parts: list[torch.Tensor] = []
            start = 0
            base = -1
            for t, name in enumerate(self._dedup_tables):
                if self._table_group[name] != g:
                    continue
                if base < 0:
                    base = int(table_offsets[t])
                if name in rows:
                    r = rows[name]
                    slices[name] = (g, start, start + r.shape[0])
                    start += r.shape[0]
                    parts.append(r)
            leaf = _concat_rows(parts, d, self._device)
            if train:
                leaf.requires_grad_(True)
            leaves.append(leaf)
            pooled = pool_unique_rows(
                leaf, inv_np, lengths, lay.members[g], lay.mean, weights, max(base, 0)
            )
            outs.append(pooled)  # [B, F_g * d]: example-major

        if lay.feature_src is None:
            out = outs[0]
        else:
            per_feature = [outs[g].view(b, -1, self._group_dims[g]) for g in range(len(outs))]
            out = torch.cat([per_feature[g][:, i] for g, i in lay.feature_src], dim=1)

        if train:
            self._pending.append(_Pending(keys=request, leaves=leaves, slices=slices))
        return KeyedTensor(
            keys=list(self._feature_names),
            length_per_key=list(self._length_per_key),
            values=out,
        )

    def _zeros(self, b: int) -> KeyedTensor:
        return KeyedTensor(
            keys=list(self._feature_names),
            length_per_key=list(self._length_per_key),
            values=torch.zeros(b, self.output_dim, device=self._device),
        )

    # -- sparse update ---------------------------------------------------------------------

    def apply_sparse_gradients(self, now: int) -> int:
        """Hand the per-id gradients of every training forward since the last call to the
        backend (one call for all tables) at event time ``now``; returns the number of
        (table, key) gradients sent. Call after ``loss.backward()``. Forwards whose rows
        got no gradient (not part of the loss) send nothing."""
        if not self._pending:
            return 0
        keys: dict[str, list[torch.Tensor]] = {}
        grads: dict[str, list[torch.Tensor]] = {}
        for p in self._pending:
            for name, (g, lo, hi) in p.slices.items():
                grad = p.leaves[g].grad
                if grad is None or hi == lo:
                    continue
                keys.setdefault(name, []).append(p.keys[name])
                grads.setdefault(name, []).append(grad[lo:hi])
        self._pending.clear()
        if not keys:
            return 0
        update = {
            name: (
                ks[0] if len(ks) == 1 else torch.cat(ks),
                grads[name][0] if len(ks) == 1 else torch.cat(grads[name]),
            )
            for name, ks in keys.items()
        }
        self._backend.apply_gradients(update, int(now))
        return sum(int(k.numel()) for k, _ in update.values())

    def discard_pending(self) -> None:
        """Forget training forwards without applying their gradients (e.g. after a step
        was abandoned because its loss was not finite)."""
        self._pending.clear()

    def evict_expired(self, now: int) -> dict[str, int]:
        """Evict rows older than each table's TTL at event time ``now`` (backend call)."""
        return self._backend.evict_expired(int(now))

    def sparse_stats(self) -> dict[str, dict[str, Any]]:
        """Per-table statistics from the backend."""
        return self._backend.stats()

    def extra_repr(self) -> str:
        parts = [f"{c.name}(dim={c.dim}, features={list(c.feature_names) or [c.name]})"
                 for c in self._configs]
        return ", ".join(parts)


def _concat_rows(parts: list[torch.Tensor], dim: int, device: torch.device) -> torch.Tensor:
    """Rows of several tables as one new float32 ``[sum n, dim]`` tensor on ``device``."""
    if not parts:
        return torch.zeros(0, dim, device=device)
    if all(p.device.type == "cpu" for p in parts) and device.type == "cpu":
        # numpy's copy is single-threaded: no OpenMP stall on a busy machine
        arrays = [p.detach().numpy().astype(np.float32, copy=False) for p in parts]
        return torch.from_numpy(np.concatenate(arrays) if len(arrays) > 1 else arrays[0].copy())
    return torch.cat([p.detach().to(device, torch.float32) for p in parts])
