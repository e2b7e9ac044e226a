"""MovieLens replay: ordering, features, labels, causality of dense features, speed."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from monolith_py.datasets import (
    DENSE_FEATURES,
    SPARSE_FEATURES,
    default_movielens_dir,
    load_movielens,
    movielens_batches,
)
from monolith_py.errors import ConfigError


@pytest.fixture(scope="module")
def replay():  # type: ignore[no-untyped-def]
    return load_movielens()


def test_copy_ships_with_its_license() -> None:
    d = default_movielens_dir()
    assert (d / "README.txt").is_file()
    assert "redistribute" in (d / "README.txt").read_text(encoding="utf-8")


def test_loads_fast_and_in_time_order(replay) -> None:  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    load_movielens()
    assert time.perf_counter() - t0 < 5.0  # ~0.5 s alone; generous for a loaded machine
    assert len(replay) == 100_836
    assert (np.diff(replay.timestamps) >= 0).all()
    assert np.unique(replay.example_ids).size == len(replay)
    assert 0.4 < replay.labels.mean() < 0.6
    assert replay.dense.shape == (len(replay), len(DENSE_FEATURES))


def test_labels_and_example_ids_match_the_file(replay) -> None:  # type: ignore[no-untyped-def]
    lines = (default_movielens_dir() / "ratings.csv").read_text().splitlines()
    for i in (0, 17, 5000, len(replay) - 1):
        user, movie, rating, ts = lines[int(replay.example_ids[i])].split(",")
        assert int(ts) == replay.timestamps[i]
        assert float(rating) == replay.ratings[i]
        assert replay.labels[i] == (float(rating) >= 4.0)
        b = replay.batch(i, i + 1)
        d = b.sparse.to_dict()
        assert d["user"].values().tolist() == [int(user)]
        assert d["movie"].values().tolist() == [int(movie)]
        assert d["hour"].values().item() == (int(ts) % 86400) // 3600


def test_multi_valued_genres_and_crosses(replay) -> None:  # type: ignore[no-untyped-def]
    movies = (default_movielens_dir() / "movies.csv").read_text().splitlines()
    toy_story = next(m for m in movies if m.startswith("1,"))
    n_genres = len(toy_story.rsplit(",", 1)[1].split("|"))
    i = int(np.flatnonzero(replay.features["movie"].values == 1)[0])
    d = replay.batch(i, i + 1).sparse.to_dict()
    assert d["genres"].values().numel() == n_genres == 5
    user = d["user"].values().item()
    assert (d["user_genre"].values() // 64 == user).all()
    assert (d["user_genre"].values() % 64 == d["genres"].values()).all()
    assert d["year"].values().tolist() == [1995]


def test_dense_features_are_causal(replay) -> None:  # type: ignore[no-untyped-def]
    users = replay.features["user"].values
    u = users[0]
    rows = np.flatnonzero(users == u)
    np.testing.assert_allclose(np.expm1(replay.dense[rows, 0]), np.arange(rows.size), rtol=1e-5)
    # positive-rate feature of the k-th rating only uses ratings before it
    k = 10
    prior = replay.labels[rows[:k]].sum()
    base = replay.labels.mean()
    np.testing.assert_allclose(replay.dense[rows[k], 2], (prior + 5 * base) / (k + 5), rtol=1e-5)


def test_batches_cover_everything_and_validate(replay) -> None:  # type: ignore[no-untyped-def]
    sizes = []
    for b in replay.batches(4096):
        b.validate()
        assert b.sparse.keys() == list(SPARSE_FEATURES)
        sizes.append(len(b))
    assert sum(sizes) == len(replay)
    assert sizes[:-1] == [4096] * (len(sizes) - 1)
    first = next(movielens_batches(100, limit=250))
    assert len(first) == 100
    assert sum(len(b) for b in movielens_batches(100, limit=250)) == 250


def test_missing_or_malformed_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_movielens(tmp_path)
    (tmp_path / "ratings.csv").write_text("a,b,c\n1,2,3\n")
    (tmp_path / "movies.csv").write_text("movieId,title,genres\n")
    with pytest.raises(ConfigError, match="header"):
        load_movielens(tmp_path)


def test_small_directory(tmp_path: Path) -> None:
    (tmp_path / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n1,10,5.0,200\n2,11,1.0,100\n1,99,4.0,300\n"
    )
    (tmp_path / "movies.csv").write_text(
        'movieId,title,genres\n10,"Movie, The (2001)",Drama|Comedy\n11,Other,(no genres listed)\n'
    )
    r = load_movielens(tmp_path)
    assert r.timestamps.tolist() == [100, 200, 300]
    assert r.example_ids.tolist() == [2, 1, 3]
    d = r.batch(0, 3).sparse.to_dict()
    assert d["genres"].lengths().tolist() == [0, 2, 0]  # none listed; unknown movie 99
    assert d["year"].values().tolist() == [2001]
