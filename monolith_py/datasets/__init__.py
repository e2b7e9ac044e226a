"""Data sets replayed as streams of :class:`~monolith_py.batch.Batch` (examples, benchmarks,
the Kafka replayer)."""

from monolith_py.datasets.movielens import (
    DENSE_FEATURES,
    SPARSE_FEATURES,
    MovieLensReplay,
    default_movielens_dir,
    load_movielens,
    movielens_batches,
)

__all__ = [
    "DENSE_FEATURES",
    "SPARSE_FEATURES",
    "MovieLensReplay",
    "default_movielens_dir",
    "load_movielens",
    "movielens_batches",
]
