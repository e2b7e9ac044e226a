"""MovieLens ratings replayed as a timestamp-ordered stream of :class:`~monolith_py.batch.Batch`es.

The ``ml-latest-small`` data set (100k ratings of 9.7k movies by 610 users, 1996-2018) is
a real timestamped event stream; a copy ships in ``examples/data/movielens-latest-small``
with its README.txt (its license allows redistribution under the same terms).

Each rating is one example: label ``rating >= 4``, event time = the rating's timestamp.
Sparse features (one KJT key each, in :data:`SPARSE_FEATURES` order):

==============  ==========================================  =====================
key             ids                                         ids per example
==============  ==========================================  =====================
``user``        userId                                      1
``movie``       movieId                                     1
``genres``      genre index (1..) of each of the movie's    0-10 (0: none listed)
``user_genre``  ``userId * 64 + genre`` (user x genre)      as ``genres``
``year``        release year from the title                 0-1 (0: no year)
``hour``        hour of day (UTC) of the rating             1
``weekday``     day of week (Monday = 0)                    1
==============  ==========================================  =====================

Dense features (:data:`DENSE_FEATURES`, float32, computed causally -- only from ratings
strictly earlier in the replay): ``log1p`` of the user's and the movie's number of earlier
ratings, and their smoothed earlier positive rates.

Loading is vectorized (``csv`` + numpy; no pandas): about 0.3 s for the 100k ratings.

Example::

    >>> from monolith_py.datasets import load_movielens
    >>> replay = load_movielens()
    >>> first = next(replay.batches(256))
    >>> len(first), first.sparse.keys()[:2]
    (256, ['user', 'movie'])
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from monolith_py.batch import Batch
from monolith_py.errors import ConfigError, InvalidInputError

__all__ = [
    "SPARSE_FEATURES",
    "DENSE_FEATURES",
    "MovieLensReplay",
    "default_movielens_dir",
    "load_movielens",
    "movielens_batches",
]

SPARSE_FEATURES: tuple[str, ...] = (
    "user", "movie", "genres", "user_genre", "year", "hour", "weekday",
)
DENSE_FEATURES: tuple[str, ...] = (
    "log_user_count", "log_movie_count", "user_pos_rate", "movie_pos_rate",
)
_POSITIVE_RATING = 4.0
_PRIOR_WEIGHT = 5.0  # pseudo-count pulling an early positive rate towards the global one
_YEAR = re.compile(r"\((\d{4})\)\s*$")


def default_movielens_dir() -> Path:
    """``examples/data/movielens-latest-small`` of this source checkout."""
    return Path(__file__).resolve().parents[2] / "examples" / "data" / "movielens-latest-small"


@dataclass(frozen=True)
class _Jagged:
    """Per-example variable-length ids: example ``i`` has ``values[offsets[i]:offsets[i+1]]``."""

    offsets: np.ndarray  # int64 [N + 1]
    values: np.ndarray  # int64 [offsets[-1]]

    @staticmethod
    def scalar(v: np.ndarray) -> _Jagged:
        return _Jagged(np.arange(v.shape[0] + 1, dtype=np.int64), v.astype(np.int64))


@dataclass(frozen=True)
class MovieLensReplay:
    """The whole replay as flat arrays in event-time order (ties keep file order).

    Attributes:
        timestamps: int64 ``[N]`` event time, seconds, non-decreasing.
        labels: float32 ``[N]``, 1.0 when rating >= 4.
        ratings: float32 ``[N]``, the raw rating (0.5-5.0).
        example_ids: int64 ``[N]``, the rating's line number in ``ratings.csv`` (unique).
        dense: float32 ``[N, len(DENSE_FEATURES)]``.
        features: feature name -> per-example ids (``SPARSE_FEATURES`` order).
    """

    timestamps: np.ndarray
    labels: np.ndarray
    ratings: np.ndarray
    example_ids: np.ndarray
    dense: np.ndarray
    features: dict[str, _Jagged]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def distinct_ids(self, feature: str) -> int:
        """Number of distinct ids ``feature`` takes over the whole replay."""
        return int(np.unique(self.features[feature].values).shape[0])

    def batch(self, start: int, stop: int) -> Batch:
        """Examples ``[start, stop)`` of the replay as one :class:`Batch`."""
        n = len(self)
        if not 0 <= start <= stop <= n:
            raise InvalidInputError(f"batch range [{start}, {stop}) outside [0, {n}]")
        lengths: list[np.ndarray] = []
        values: list[np.ndarray] = []
        for name in SPARSE_FEATURES:
            jag = self.features[name]
            off = jag.offsets[start:stop + 1]
            lengths.append(np.diff(off))
            values.append(jag.values[off[0]:off[-1]])
        kjt = KeyedJaggedTensor(
            keys=list(SPARSE_FEATURES),
            values=torch.from_numpy(np.concatenate(values)),
            lengths=torch.from_numpy(np.concatenate(lengths)),
            stride=stop - start,
        )
        return Batch(
            sparse=kjt,
            dense=torch.from_numpy(self.dense[start:stop]),
            labels=torch.from_numpy(self.labels[start:stop]),
            timestamps=torch.from_numpy(self.timestamps[start:stop]),
            example_ids=torch.from_numpy(self.example_ids[start:stop]),
        )

    def batches(self, batch_size: int, start: int = 0, stop: int | None = None) -> Iterator[Batch]:
        """Consecutive batches of ``batch_size`` examples (the last may be smaller) over
        ``[start, stop)``, in event-time order."""
        if batch_size <= 0:
            raise ConfigError(f"batch_size must be positive, got {batch_size}")
        end = len(self) if stop is None else min(int(stop), len(self))
        for a in range(int(start), end, batch_size):
            yield self.batch(a, min(a + batch_size, end))


def _read_csv(path: Path, header: list[str]) -> list[list[str]]:
    if not path.is_file():
        raise ConfigError(
            f"MovieLens file {path} not found; pass the directory holding ratings.csv and "
            "movies.csv (ml-latest-small layout)"
        )
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows or [h.strip() for h in rows[0]] != header:
        got = rows[0] if rows else []
        raise ConfigError(f"{path}: expected header {header}, got {got}")
    return rows[1:]


def _prior_counts(group: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each event (already in time order): how many earlier events and earlier
    positives its group had. Vectorized: stable sort by group, cumulative sums."""
    order = np.argsort(group, kind="stable")
    g = group[order]
    starts = np.ones(g.shape[0], dtype=bool)
    starts[1:] = g[1:] != g[:-1]
    idx = np.arange(g.shape[0])
    first = np.maximum.accumulate(np.where(starts, idx, 0))
    count = (idx - first).astype(np.float64)
    cum = np.cumsum(labels[order], dtype=np.float64)
    pos = cum - labels[order] - np.where(first > 0, cum[first - 1], 0.0)
    out_count = np.empty_like(count)
    out_pos = np.empty_like(pos)
    out_count[order] = count
    out_pos[order] = pos
    return out_count, out_pos


def load_movielens(data_dir: str | Path | None = None) -> MovieLensReplay:
    """Read ``ratings.csv`` and ``movies.csv`` from ``data_dir`` (default:
    :func:`default_movielens_dir`) into a :class:`MovieLensReplay`."""
    root = Path(data_dir) if data_dir is not None else default_movielens_dir()
    ratings = _read_csv(root / "ratings.csv", ["userId", "movieId", "rating", "timestamp"])
    movies = _read_csv(root / "movies.csv", ["movieId", "title", "genres"])
    try:
        arr = np.array(ratings, dtype=np.float64)
    except ValueError as exc:
        raise ConfigError(f"{root / 'ratings.csv'}: non-numeric field ({exc})") from None
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ConfigError(f"{root / 'ratings.csv'}: expected 4 columns per row")
    user = arr[:, 0].astype(np.int64)
    movie = arr[:, 1].astype(np.int64)
    rating = arr[:, 2].astype(np.float32)
    ts = arr[:, 3].astype(np.int64)

    # Movies: genres (multi-valued) and release year, looked up per rating through a
    # sorted movieId index.
    genre_index: dict[str, int] = {}
    m_ids = np.empty(len(movies), dtype=np.int64)
    m_year = np.zeros(len(movies), dtype=np.int64)
    g_lens = np.zeros(len(movies), dtype=np.int64)
    g_vals: list[int] = []
    for i, (mid, title, genres) in enumerate(movies):
        m_ids[i] = int(mid)
        m = _YEAR.search(title)
        m_year[i] = int(m.group(1)) if m else 0
        names = [] if genres == "(no genres listed)" else genres.split("|")
        g_lens[i] = len(names)
        g_vals.extend(genre_index.setdefault(name, len(genre_index) + 1) for name in names)
    g_off = np.zeros(len(movies) + 1, dtype=np.int64)  # CSR in file order
    np.cumsum(g_lens, out=g_off[1:])
    g_vals_arr = np.asarray(g_vals, dtype=np.int64)
    sort = np.argsort(m_ids, kind="stable")
    sorted_ids = m_ids[sort]
    if len(sorted_ids):
        pos = np.minimum(np.searchsorted(sorted_ids, movie), len(sorted_ids) - 1)
        known = sorted_ids[pos] == movie
        file_idx = sort[pos]  # the rated movie's row in movies.csv
    else:
        known = np.zeros(movie.shape, dtype=bool)
        file_idx = np.zeros(movie.shape, dtype=np.int64)
        g_lens = m_year = np.zeros(1, dtype=np.int64)

    order = np.argsort(ts, kind="stable")
    user, movie, rating, ts, file_idx, known = (
        user[order], movie[order], rating[order], ts[order], file_idx[order], known[order]
    )
    example_ids = order.astype(np.int64) + 1  # line number of the rating in ratings.csv
    labels = (rating >= _POSITIVE_RATING).astype(np.float32)
    n = user.shape[0]

    # genres of each rating: gather the movie's CSR slice (vectorized).
    glen = np.where(known, g_lens[file_idx], 0).astype(np.int64)
    goff = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(glen, out=goff[1:])
    within = np.arange(goff[-1], dtype=np.int64) - np.repeat(goff[:-1], glen)
    genre_vals = g_vals_arr[np.repeat(g_off[file_idx], glen) + within]
    user_genre = np.repeat(user, glen) * 64 + genre_vals
    year = np.where(known, m_year[file_idx], 0)
    has_year = year > 0
    yoff = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(has_year, out=yoff[1:])

    days = ts // 86400
    features = {
        "user": _Jagged.scalar(user),
        "movie": _Jagged.scalar(movie),
        "genres": _Jagged(goff, genre_vals),
        "user_genre": _Jagged(goff, user_genre),
        "year": _Jagged(yoff, year[has_year].astype(np.int64)),
        "hour": _Jagged.scalar((ts % 86400) // 3600),
        "weekday": _Jagged.scalar((days + 3) % 7),  # 1970-01-01 was a Thursday
    }

    u_count, u_pos = _prior_counts(user, labels)
    m_count, m_pos = _prior_counts(movie, labels)
    base = float(labels.mean()) if n else 0.5
    dense = np.stack([
        np.log1p(u_count),
        np.log1p(m_count),
        (u_pos + _PRIOR_WEIGHT * base) / (u_count + _PRIOR_WEIGHT),
        (m_pos + _PRIOR_WEIGHT * base) / (m_count + _PRIOR_WEIGHT),
    ], axis=1).astype(np.float32) if n else np.zeros((0, len(DENSE_FEATURES)), np.float32)
    return MovieLensReplay(
        timestamps=np.ascontiguousarray(ts),
        labels=labels,
        ratings=rating,
        example_ids=example_ids,
        dense=np.ascontiguousarray(dense),
        features=features,
    )


def movielens_batches(
    batch_size: int,
    data_dir: str | Path | None = None,
    limit: int | None = None,
) -> Iterator[Batch]:
    """Load the data set and yield :class:`Batch`es of ``batch_size`` in timestamp order
    (the first ``limit`` examples when given). Used by the examples, the quality benchmark
    and ``monolith replay movielens``."""
    replay = load_movielens(data_dir)
    yield from replay.batches(batch_size, 0, limit)
