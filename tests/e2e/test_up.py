"""``monolith up`` end to end: the whole pipeline (broker, producer, joiner, 2 PS shards, 3
SMPs on 3 simulated hosts, trainer, serving, supervisor) as real processes.

* a CI-sized run (``--duration 60``, MovieLens, what ``make demo`` runs): while it runs the
  serving worker answers a prediction and the status page, opened in headless Chromium,
  draws every chart with data; it ends with examples trained, none lost or duplicated,
  snapshots sealed, and no process left behind;
* a chaos run (seeded kills of PS shards, whole hosts, serving...): the same guarantees.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]

CHARTS = ("chart-quality", "chart-throughput", "chart-lag", "chart-tables", "chart-freshness",
          "chart-steps", "chart-rpc")


class Up:
    """``monolith up`` in a subprocess, its stdout collected line by line."""

    def __init__(self, tmp: Path, *args: str) -> None:
        self.summary_path = tmp / "summary.json"
        self.run_dir = tmp / "run"
        cmd = [sys.executable, "-m", "monolith_py.cli", "up", "--run-dir", str(self.run_dir),
               "--json-summary", str(self.summary_path), *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def output(self) -> str:
        return "\n".join(self.lines[-80:])

    def wait_for(self, pattern: str, timeout: float = 300) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            for line in list(self.lines):
                m = re.search(pattern, line)
                if m:
                    return m
            assert self.proc.poll() is None, f"monolith up exited:\n{self.output()}"
            assert time.monotonic() < deadline, f"no {pattern!r} within {timeout}s:\n" \
                                                f"{self.output()}"
            time.sleep(0.5)

    def finish(self, timeout: float = 600) -> dict[str, Any]:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"monolith up did not finish:\n{self.output()}") from None
        self._reader.join(timeout=10)
        assert self.summary_path.exists(), self.output()
        summary = json.loads(self.summary_path.read_text())
        assert rc == 0, (summary, self.output())
        return dict(summary)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # monolith up stops its roles on SIGTERM
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)


def _get(url: str, timeout: float = 10) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def _poll(cond: Callable[[], Any], timeout: float, what: str, up: Up) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        assert up.proc.poll() is None, f"monolith up exited while waiting for {what}:\n" \
                                       f"{up.output()}"
        try:
            last = cond()
            if last:
                return last
        except (OSError, ValueError, KeyError) as exc:
            last = exc
        time.sleep(1.0)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})\n{up.output()}")


def _chromium() -> str:
    for name in ("/usr/bin/chromium", "chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    raise AssertionError("headless Chromium is needed for the status-page test: "
                         "apt-get install -y chromium (.ci/run does it)")


def _dump_dom(url: str) -> str:
    profile = tempfile.mkdtemp(prefix="monolith-chromium-")
    try:
        run = subprocess.run(
            [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={profile}", "--virtual-time-budget=8000",
             "--dump-dom", url], capture_output=True, text=True, timeout=120)
        return run.stdout
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def _attr_counts(dom: str) -> dict[str, int]:
    """``{chart id: data-points}`` plus the timeline's snapshots and the roles table."""
    out: dict[str, int] = {}
    for tag in re.findall(r"<figure[^>]*>", dom):
        ident = re.search(r'id="([^"]+)"', tag)
        for attr in ("data-points", "data-snapshots"):
            m = re.search(attr + r'="(\d+)"', tag)
            if ident and m:
                out[ident.group(1)] = int(m.group(1))
    rows = re.search(r'<table id="roles"[^>]*data-rows="(\d+)"', dom)
    out["roles"] = int(rows.group(1)) if rows else 0
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def _assert_clean(summary: dict[str, Any], up: Up) -> None:
    assert summary["ok"], (summary, up.output())
    assert summary["examples_trained"] > 0
    assert summary["lost"] == 0 and summary["duplicated"] == 0, summary
    assert summary["ledger_match"] and summary["join_lost"] == 0
    assert summary["topic_duplicates"] == 0
    assert summary["examples_trained"] == summary["unique_examples"] == summary["impressions"]
    assert summary["snapshots_taken"] > 0
    assert summary["serving"]["predict_ok"], summary["serving"]
    assert 0.5 < summary["final_auc"] <= 1.0
    assert (up.run_dir / "events.jsonl").exists() and (up.run_dir / "summary.json").exists()


def test_up_duration_serving_and_status_page(tmp_path: Path) -> None:
    up = Up(tmp_path, "--duration", "60")
    pids: set[int] = set()
    try:
        status_url = up.wait_for(r"status page\s+(http://\S+)").group(1)
        serve = up.wait_for(r"serving\s+(http://127\.0\.0\.1:\d+)/v1/predict").group(1)

        def trained() -> bool:
            st = _get(status_url + "api/status")
            pids.update(r["pid"] for r in st["roles"] if r["pid"])
            return bool((st["extra"].get("trained") or 0) > 0)

        _poll(trained, 400, "examples trained", up)
        # serving follows the PS shards: it answers while training goes on
        model = _poll(lambda: (m := _get(serve + "/v1/model")).get("ready") and m, 300,
                      "serving ready", up)["model"]
        body = json.dumps({"examples": [
            {"features": {f: [1 + i] for f in model["features"]},
             "dense": [0.1] * model["num_dense"]} for i in range(3)]}).encode()
        req = urllib.request.Request(serve + "/v1/predict", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            out = json.loads(r.read())
        assert r.status == 200 and len(out["scores"]) == 3, out
        assert all(0.0 <= s <= 1.0 for s in out["scores"])
        # the status page in a real (headless) browser: every chart drawn with data
        counts: dict[str, int] = {}

        def rendered() -> bool:
            counts.update(_attr_counts(_dump_dom(status_url)))
            return all(counts.get(c, 0) > 0 for c in CHARTS) and \
                counts.get("timeline", 0) > 0 and counts.get("roles", 0) >= 9

        _poll(rendered, 240, "every chart rendered with data", up)
        summary = up.finish()
    finally:
        up.stop()
    _assert_clean(summary, up)
    assert summary["restarts"] == 0 and summary["chaos_kills"] == 0
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in pids):
        assert time.monotonic() < deadline, [p for p in pids if _alive(p)]
        time.sleep(0.5)


def test_up_chaos_loses_nothing(tmp_path: Path) -> None:
    # seed 8 kills, in order: ps/1, host 0 (its SMP, ps/0 and the trainer; snapshots come
    # back from the erasure-coded blocks on hosts 1 and 2), serve/0, host 1, ...
    up = Up(tmp_path, "--generator", "--examples", "1000000", "--rate", "1000",
            "--duration", "150", "--chaos", "--chaos-seed", "8", "--chaos-interval-s", "20",
            "--chaos-first-s", "15")
    try:
        summary = up.finish(timeout=800)
    finally:
        up.stop()
    _assert_clean(summary, up)
    assert summary["chaos_kills"] >= 3, summary
    assert summary["restarts"] >= 3, summary
    events = [json.loads(x) for x in (up.run_dir / "events.jsonl").read_text().splitlines()]
    chaos = [e for e in events if e["kind"] == "chaos"]
    assert any("host" in e for e in chaos), chaos             # a whole host was lost
    assert sum(e["kind"] == "recovered" for e in events) >= 3
    assert any(e["kind"] == "restore" and "job-wide restore of snapshot" in e["message"]
               for e in events)
    assert not any(e["kind"] == "error" and e["role"] is None for e in events), \
        [e for e in events if e["kind"] == "error"]
    assert os.path.exists(up.run_dir / "trainer-0.log")


def test_up_ctrl_c_stops_everything(tmp_path: Path) -> None:
    up = Up(tmp_path, "--generator", "--rate", "500")
    pids: set[int] = set()
    try:
        status_url = up.wait_for(r"status page\s+(http://\S+)").group(1)

        def all_running() -> bool:
            st = _get(status_url + "api/status")
            pids.update(r["pid"] for r in st["roles"] if r["pid"])
            return st["phase"] == "running" and all(r["status"] == "running"
                                                    for r in st["roles"])

        _poll(all_running, 400, "every role running", up)
        up.proc.send_signal(2)  # Ctrl-C
        rc = up.proc.wait(timeout=180)
    finally:
        up.stop()
    summary = json.loads(up.summary_path.read_text())
    assert rc == 1 and not summary["ok"] and summary["reason"] == "interrupted", summary
    assert "every role stopped" in (up.run_dir / "events.jsonl").read_text()
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in pids):
        assert time.monotonic() < deadline, [p for p in pids if _alive(p)]
        time.sleep(0.5)
    assert not list(Path("/dev/shm").glob(f"monolith-up-{up.proc.pid}-h*"))
