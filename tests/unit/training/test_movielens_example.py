"""``examples/movielens_online.py`` runs (on a slice of the replay) and prints progressive AUC."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "movielens_online.py"


def test_example_runs_and_reports_auc(monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "argv", [str(EXAMPLE), "--limit", "1536", "--every", "2"])
    runpy.run_path(str(EXAMPLE), run_name="__main__")
    out = capsys.readouterr().out
    assert "progressive AUC" in out
    assert out.count("auc=") >= 2  # progress lines while it runs
    assert "1,536 examples" in out
