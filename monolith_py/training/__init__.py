"""Online training: the score-then-train loop and progressive metrics."""

from monolith_py.training.metrics import ProgressiveMetrics, binary_auc, histogram_auc
from monolith_py.training.progress import TqdmProgress, format_progress
from monolith_py.training.trainer import (
    BAD_BATCH_REASONS,
    OnlineTrainer,
    StepResult,
    TrainerConfig,
)

__all__ = [
    "BAD_BATCH_REASONS",
    "OnlineTrainer",
    "ProgressiveMetrics",
    "StepResult",
    "TqdmProgress",
    "TrainerConfig",
    "binary_auc",
    "format_progress",
    "histogram_auc",
]
