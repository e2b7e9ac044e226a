"""`monolith bench table` runs and prints the documented fields (tiny size, no timing checks)."""

from __future__ import annotations

import argparse

import pytest

from benchmarks.bench_table import register, run

FIELDS = ("keys", "find_mops", "find_or_insert_mops", "erase_mops", "dict_find_mops",
          "dict_insert_mops", "mch_remap_mops", "bytes_per_key", "load_factor")


@pytest.mark.parametrize("dist", ["uniform", "zipf"])
def test_bench_table_fields(dist: str) -> None:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["table", "--keys", "5000", "--dist", dist, "--repeat", "1",
                              "--batch", "2000"])
    result = run(args)
    for field in FIELDS:
        assert field in result, field
        assert result[field] is not None and result[field] > 0, field
    assert result["keys"] == 5000 and result["dist"] == dist
    assert 0 < result["load_factor"] <= 0.9
    assert result["bytes_per_key"] == pytest.approx(16 / result["load_factor"])
    assert result["bytes_per_key"] <= 16 / 0.9 + 0.1  # the map sized for its keys
    assert 0 < result["load_factor_grown"] <= 0.9
    assert result["bytes_per_key_grown"] == pytest.approx(16 / result["load_factor_grown"])
