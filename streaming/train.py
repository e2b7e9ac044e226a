"""``monolith train``: single-process online training from Kafka (or the MovieLens file).

The model is built from the stream itself: the first batch names the sparse features
(one collisionless table each) and the dense width, so the same command trains on the
MovieLens topic written by ``monolith replay movielens`` and on the synthetic topic of
``monolith generate``. The model is the MovieLens example's DLRM (dot interaction) with
Adagrad on embedding rows and dense layers.

The Kafka source's offsets are part of the result (``offsets``): with a snapshot of the
trainer and tables they are the position to resume from.

Example::

    >>> from streaming.source import KafkaExampleSource                    # doctest: +SKIP
    >>> src = KafkaExampleSource("127.0.0.1:9092", "movielens", end_of_stream=True)
    >>> train_stream(src, TrainSettings())["auc"]                          # doctest: +SKIP
    0.78...
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from monolith_py.errors import ConfigError, UnavailableError

if TYPE_CHECKING:
    from monolith_py.batch import Batch

__all__ = ["TrainSettings", "build_model", "train_stream"]


@dataclass(frozen=True)
class TrainSettings:
    """Model and optimizer settings of ``monolith train``."""

    dim: int = 16
    lr: float = 0.05
    dense_lr: float = 0.01
    init_scale: float = 0.05
    ttl_seconds: int | None = 5 * 365 * 86400
    evict_interval_s: int = 30 * 86400
    metrics_window: int = 5000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dim < 1 or self.lr <= 0 or self.dense_lr <= 0 or self.init_scale <= 0:
            raise ConfigError(f"dim, lr, dense_lr and init_scale must be positive, got "
                              f"{self.dim}, {self.lr}, {self.dense_lr}, {self.init_scale}")


def build_model(features: list[str], num_dense: int, s: TrainSettings) -> tuple[Any, Any]:
    """``(model, dense optimizer)``: a DLRM with one collisionless table per feature."""
    import torch

    from monolith_py.modules import DLRM, DynamicEmbeddingBagCollection
    from monolith_py.table import OptimizerConfig, TableConfig

    if not features:
        raise ConfigError("the stream's examples have no sparse features to embed")
    torch.manual_seed(s.seed)
    tables = [TableConfig(name=f, dim=s.dim, feature_names=(f,),
                          optimizer=OptimizerConfig("adagrad", lr=s.lr),
                          init_scale=s.init_scale, ttl_seconds=s.ttl_seconds)
              for f in features]
    model = DLRM(DynamicEmbeddingBagCollection(tables), num_dense=num_dense,
                 bottom_mlp=(32, s.dim), top_mlp=(64, 32), interaction="dot")
    return model, torch.optim.Adagrad(model.parameters(), lr=s.dense_lr)


def train_stream(batches: Iterable[Batch], settings: TrainSettings, *,
                 max_steps: int | None = None,
                 progress: Callable[[dict[str, Any]], None] | None = None,
                 progress_every: int = 50) -> dict[str, Any]:
    """Build the model from the first batch, then train on the whole stream with
    :class:`~monolith_py.training.OnlineTrainer`. Returns the trainer's final metrics."""
    from monolith_py.training import OnlineTrainer, TrainerConfig

    it = iter(batches)
    first = next(it, None)
    if first is None:
        raise UnavailableError("the stream ended before its first batch")
    model, optimizer = build_model(list(first.sparse.keys()), int(first.dense.shape[1]),
                                   settings)
    trainer = OnlineTrainer(model, optimizer, TrainerConfig(
        evict_interval_s=settings.evict_interval_s, metrics_window=settings.metrics_window))
    return trainer.fit(itertools.chain([first], it), max_steps=max_steps, progress=progress,
                       progress_every=progress_every)
