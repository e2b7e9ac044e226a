"""``monolith ps`` / ``monolith trainer`` command lines: clear errors, clean shutdown."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[3]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "monolith_py.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=180)


def test_bad_command_lines_fail_with_a_clear_message(tmp_path: Path) -> None:
    p = _run("trainer", "--world-size", "2", "--features", "a", "--dim", "4")
    assert p.returncode == 2 and "several trainers need shared PS shards" in p.stderr
    bad = tmp_path / "job.toml"
    bad.write_text("[ps]\nadresses = []\n")
    p = _run("ps", "--shard", "0", "--num-shards", "1", "--port", "0", "--config", str(bad))
    assert p.returncode == 2 and "unknown key(s) ['adresses']" in p.stderr


def test_shard_stops_cleanly_on_sigterm(start_shards) -> None:
    shards = start_shards(1, ["--features", "a,b", "--dim", "4"])
    proc = shards.procs[0]
    assert proc is not None
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    assert '"event": "stopped"' in shards.log_tail(0)
