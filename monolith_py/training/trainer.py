"""Online training with progressive validation: each batch is scored, measured, then trained on.

:class:`OnlineTrainer` consumes any ``Iterable[Batch]`` (the MovieLens replay, a Kafka
source, in-memory test data). Per batch:

1. **validate** -- ``Batch.validate()``, the embedding modules' ``validate_features`` and
   the model's dense width. A bad batch is counted under a reason and skipped before
   anything changes (no lookup, no admission count, no parameter update).
2. **score** -- one training-mode forward; its predictions come from the parameters
   *before* this batch (progressive validation) and feed the metrics.
3. **metrics** -- AUC, log loss, calibration (windowed and cumulative).
4. **train** -- ``loss.backward()``, the dense torch optimizer's ``step()``, then each
   embedding module's ``apply_sparse_gradients(now)``.
5. **expire** -- event time ``now`` is the newest example timestamp seen; every
   ``evict_interval_s`` of event time the tables evict rows older than their TTL.

One forward does both scoring and training: a new id admitted in this batch is scored with
its initial row, exactly what serving would see before any update.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from monolith_py.batch import Batch
from monolith_py.errors import ConfigError, InvalidInputError, MonolithError
from monolith_py.modules.embedding_bag_collection import DynamicEmbeddingBagCollection
from monolith_py.training.metrics import ProgressiveMetrics

__all__ = ["TrainerConfig", "StepResult", "OnlineTrainer", "BAD_BATCH_REASONS"]

#: Reasons a batch is skipped, as counted in ``metrics()["bad_batches_by_reason"]``.
BAD_BATCH_REASONS: tuple[str, ...] = (
    "not_a_batch",        # the source yielded something else
    "invalid_batch",      # Batch.validate(): shapes, NaN/inf dense, labels outside [0, 1]
    "invalid_features",   # unknown/missing KJT key, lengths vs values, id dtype, weights
    "dense_width",        # dense has a different number of columns than the model
    "rejected_by_table",  # a table refused an id during the lookup (e.g. a reserved key)
    "non_finite_loss",    # the forward produced NaN/inf; nothing was trained
)


@dataclass(frozen=True)
class TrainerConfig:
    """Settings of :class:`OnlineTrainer`.

    Args:
        evict_interval_s: event-time seconds between ``evict_expired`` calls (0: never).
        metrics_window: examples covered by the windowed metrics.
        auc_bins: histogram bins of the cumulative AUC.
    """

    evict_interval_s: int = 3600
    metrics_window: int = 10_000
    auc_bins: int = 1 << 16

    def __post_init__(self) -> None:
        if self.evict_interval_s < 0:
            raise ConfigError(
                f"evict_interval_s must be >= 0 seconds (0 disables), got {self.evict_interval_s}"
            )
        if self.metrics_window <= 0:
            raise ConfigError(f"metrics_window must be positive, got {self.metrics_window}")
        if self.auc_bins < 2:
            raise ConfigError(f"auc_bins must be >= 2, got {self.auc_bins}")


@dataclass(frozen=True)
class StepResult:
    """Outcome of :meth:`OnlineTrainer.step`: ``trained`` or skipped with ``reason``."""

    trained: bool
    examples: int
    loss: float = math.nan
    reason: str | None = None
    error: str | None = None


class OnlineTrainer:
    """Score-then-train loop over a stream of :class:`~monolith_py.batch.Batch`.

    Args:
        model: ``model(dense [B, D], kjt) -> logits [B]``; its
            :class:`~monolith_py.modules.DynamicEmbeddingBagCollection`s are found by
            walking ``model.modules()`` unless ``sparse_modules`` is given.
        dense_optimizer: torch optimizer over the model's dense parameters (``None`` when
            the model has none).
        config: :class:`TrainerConfig`.
        sparse_modules: the embedding modules whose sparse gradients to apply.

    Example::

        >>> import torch
        >>> from monolith_py.datasets import load_movielens, DENSE_FEATURES, SPARSE_FEATURES
        >>> from monolith_py.modules import DynamicEmbeddingBagCollection, DLRM
        >>> from monolith_py.table import TableConfig
        >>> ebc = DynamicEmbeddingBagCollection(
        ...     [TableConfig(f, dim=8, feature_names=(f,)) for f in SPARSE_FEATURES])
        >>> model = DLRM(ebc, len(DENSE_FEATURES), bottom_mlp=(16, 8), top_mlp=(16,))
        >>> trainer = OnlineTrainer(model, torch.optim.Adam(model.parameters(), lr=1e-3))
        >>> summary = trainer.fit(load_movielens().batches(512, stop=2048))
        >>> summary["examples"], summary["trained_examples"]
        (2048, 2048)
    """

    def __init__(
        self,
        model: nn.Module,
        dense_optimizer: torch.optim.Optimizer | None,
        config: TrainerConfig | None = None,
        sparse_modules: Iterable[DynamicEmbeddingBagCollection] | None = None,
    ) -> None:
        self.model = model
        self.optimizer = dense_optimizer
        self.config = config or TrainerConfig()
        self.sparse_modules: list[DynamicEmbeddingBagCollection] = (
            list(sparse_modules) if sparse_modules is not None
            else [m for m in model.modules() if isinstance(m, DynamicEmbeddingBagCollection)]
        )
        self.progressive = ProgressiveMetrics(self.config.metrics_window, self.config.auc_bins)
        self._num_dense: int | None = getattr(model, "num_dense", None)
        self.event_time: int = 0  # newest example timestamp seen (seconds)
        self._last_evict: int | None = None
        self.steps = 0
        self.examples = 0
        self.trained_examples = 0
        self.bad_batches = 0
        self.expired = 0
        self.bad_by_reason: dict[str, int] = {r: 0 for r in BAD_BATCH_REASONS}
        self.last_error: str = ""
        self._busy_s = 0.0
        self._last_loss = math.nan

    # -- one batch -------------------------------------------------------------------------

    def _skip(self, reason: str, err: BaseException | str, examples: int) -> StepResult:
        self.bad_batches += 1
        self.bad_by_reason[reason] = self.bad_by_reason.get(reason, 0) + 1
        self.last_error = f"{reason}: {err}"
        for m in self.sparse_modules:
            m.discard_pending()
        return StepResult(False, examples, reason=reason, error=str(err))

    def validate(self, batch: Any) -> tuple[str, BaseException] | None:
        """``None`` when ``batch`` can be trained on, else ``(reason, error)``. Changes
        nothing."""
        if not isinstance(batch, Batch):
            return "not_a_batch", InvalidInputError(
                f"expected a Batch, got {type(batch).__name__}"
            )
        try:
            batch.validate()
        except MonolithError as exc:
            return "invalid_batch", exc
        try:
            for m in self.sparse_modules:
                m.validate_features(batch.sparse)
        except MonolithError as exc:
            return "invalid_features", exc
        if self._num_dense is not None and batch.dense.shape[1] != self._num_dense:
            return "dense_width", InvalidInputError(
                f"dense has {batch.dense.shape[1]} columns, the model expects {self._num_dense}"
            )
        return None

    def step(self, batch: Batch) -> StepResult:
        """Validate, score, update the metrics and train on one batch (see the module
        docstring). A bad batch is counted and skipped, never raised; a retriable error
        of the sparse backend (a PS shard that does not answer) is raised, since skipping
        would silently drop the stream."""
        t0 = time.perf_counter()
        try:
            return self._step(batch)
        finally:
            self._busy_s += time.perf_counter() - t0

    def _step(self, batch: Batch) -> StepResult:
        bad = self.validate(batch)
        n = len(batch) if isinstance(batch, Batch) else 0
        if bad is not None:
            return self._skip(bad[0], bad[1], n)
        self.steps += 1
        if n == 0:
            return StepResult(True, 0, loss=math.nan)
        self.model.train()
        labels = batch.labels.to(torch.float32)
        try:
            logits = self.model(batch.dense.to(torch.float32), batch.sparse)
        except MonolithError as exc:
            if exc.retriable:
                raise  # the sparse parameters are unreachable (a PS is down): not a bad batch
            return self._skip("rejected_by_table", exc, n)
        if logits.shape != (n,):
            raise InvalidInputError(
                f"the model returned logits of shape {tuple(logits.shape)}, expected [{n}]"
            )
        loss = F.binary_cross_entropy_with_logits(logits, labels.to(logits.device))
        if not bool(torch.isfinite(loss)):
            return self._skip("non_finite_loss", f"loss is {float(loss)}", n)
        self.progressive.update(torch.sigmoid(logits.detach()), labels)
        self.examples += n

        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.optimizer is not None:
            self.optimizer.step()
        self.event_time = max(self.event_time, int(batch.timestamps.max()))
        for m in self.sparse_modules:
            m.apply_sparse_gradients(self.event_time)
        self.trained_examples += n
        self._last_loss = float(loss.detach())
        self._maybe_evict()
        return StepResult(True, n, loss=self._last_loss)

    def _maybe_evict(self) -> None:
        interval = self.config.evict_interval_s
        if interval <= 0:
            return
        if self._last_evict is None:
            self._last_evict = self.event_time
            return
        if self.event_time - self._last_evict >= interval:
            for m in self.sparse_modules:
                self.expired += sum(m.evict_expired(self.event_time).values())
            self._last_evict = self.event_time

    # -- a stream --------------------------------------------------------------------------

    def fit(
        self,
        source: Iterable[Any],
        max_steps: int | None = None,
        progress: Callable[[dict[str, Any]], None] | None = None,
        progress_every: int = 20,
    ) -> dict[str, Any]:
        """Run :meth:`step` over ``source`` (at most ``max_steps`` batches, bad ones
        included); call ``progress(self.metrics())`` every ``progress_every`` batches and
        at the end. Returns the final :meth:`metrics`."""
        if progress_every <= 0:
            raise ConfigError(f"progress_every must be positive, got {progress_every}")
        done = 0
        for batch in source:
            if max_steps is not None and done >= max_steps:
                break
            self.step(batch)
            done += 1
            if progress is not None and done % progress_every == 0:
                progress(self.metrics())
        final = self.metrics()
        if progress is not None and done % progress_every != 0:
            progress(final)
        return final

    # -- observability ---------------------------------------------------------------------

    def metrics(self, tables: bool = True) -> dict[str, Any]:
        """Progressive metrics (``auc``, ``window_auc``, ``log_loss``, ``calibration``...),
        counters (``steps``, ``examples``, ``trained_examples``, ``bad_batches``,
        ``bad_batches_by_reason``, ``last_error``), ``examples_per_s`` (over time spent in
        :meth:`step`), ``event_time``, and with ``tables`` the per-table sizes and the
        ``admitted``/``filtered``/``expired`` totals."""
        out: dict[str, Any] = dict(self.progressive.compute())
        out.update(
            steps=self.steps,
            examples=self.examples,
            trained_examples=self.trained_examples,
            bad_batches=self.bad_batches,
            bad_batches_by_reason={k: v for k, v in self.bad_by_reason.items() if v},
            last_error=self.last_error,
            loss=self._last_loss,
            examples_per_s=self.examples / self._busy_s if self._busy_s > 0 else 0.0,
            event_time=self.event_time,
            expired=self.expired,
        )
        if tables:
            sizes: dict[str, int] = {}
            totals = {"admitted": 0, "filtered": 0}
            for m in self.sparse_modules:
                for name, st in m.sparse_stats().items():
                    sizes[name] = int(st.get("size", 0))
                    for k in totals:
                        totals[k] += int(st.get(k, 0))
            out["table_sizes"] = sizes
            out["rows"] = sum(sizes.values())
            out.update(totals)
        return out

    # -- state ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Dense model, dense optimizer, torch RNG, metric accumulators and counters --
        tensors, ints, floats and strings only. Sparse rows live in the backend and are
        snapshotted through it."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else {},
            "rng": torch.get_rng_state(),
            "metrics": self.progressive.state_dict(),
            "counters": {
                "steps": self.steps,
                "examples": self.examples,
                "trained_examples": self.trained_examples,
                "bad_batches": self.bad_batches,
                "expired": self.expired,
                "event_time": self.event_time,
                "last_evict": -1 if self._last_evict is None else self._last_evict,
            },
            "bad_by_reason": dict(self.bad_by_reason),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        missing = {"model", "optimizer", "rng", "metrics", "counters"} - set(state)
        if missing:
            raise InvalidInputError(f"trainer state lacks {sorted(missing)}")
        self.model.load_state_dict(state["model"])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        self.progressive.load_state_dict(state["metrics"])
        c = state["counters"]
        self.steps = int(c["steps"])
        self.examples = int(c["examples"])
        self.trained_examples = int(c["trained_examples"])
        self.bad_batches = int(c["bad_batches"])
        self.expired = int(c["expired"])
        self.event_time = int(c["event_time"])
        self._last_evict = None if int(c["last_evict"]) < 0 else int(c["last_evict"])
        self.bad_by_reason = {r: 0 for r in BAD_BATCH_REASONS}
        self.bad_by_reason.update({k: int(v) for k, v in state.get("bad_by_reason", {}).items()})
