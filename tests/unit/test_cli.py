"""The ``monolith`` dispatcher discovers its subcommands through entry points."""

from __future__ import annotations

import subprocess
import sys

import pytest

from monolith_py import cli
from monolith_py.errors import InvalidInputError, ShardError, UnavailableError


def test_help_lists_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in ("bench", "broker", "serve"):
        assert name in out


def test_console_script_runs() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "monolith_py.cli", "--help"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "bench" in proc.stdout


def test_library_does_not_import_deployables() -> None:
    code = (
        "import sys, monolith_py, monolith_py.cli, monolith_py.errors;"
        "bad=[m for m in sys.modules if m.split('.')[0] in ('serving','streaming')];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_error_tree_flags() -> None:
    assert isinstance(InvalidInputError("x"), ValueError)
    assert UnavailableError("down").retriable
    err = ShardError("pull", {0: UnavailableError("a"), 1: UnavailableError("b")})
    assert err.retriable and "shard 0" in str(err) and "shard 1" in str(err)
    mixed = ShardError("pull", {0: UnavailableError("a"), 1: InvalidInputError("b")})
    assert not mixed.retriable
