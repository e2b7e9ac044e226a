"""The supervisor with real processes (small stand-in roles, no torch): deaths, hangs,
stragglers, host kills by chaos, finite and fatal roles, the status server, no orphans."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from monolith_py.supervisor import ChaosConfig, RoleSpec, StatusServer, Supervisor
from monolith_py.supervisor.pipeline import free_port
from monolith_py.supervisor.supervisor import SupervisorConfig

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

FAKE = str(Path(__file__).with_name("fakerole.py"))


def _role(name: str, kind: str, host: int | None, tmp: Path, *extra: str,
          ready: bool = False, **kw: Any) -> RoleSpec:
    port = free_port()
    argv = [sys.executable, FAKE, name, str(port), *extra]
    rf = None
    if ready:
        rf = str(tmp / f"{name.replace('/', '-')}.ready")
        argv += ["--ready", rf]
    return RoleSpec(name, kind, tuple(argv), host=host, ready_file=rf,
                    metrics_url=f"http://127.0.0.1:{port}/metrics", start_timeout_s=60, **kw)


def _until(sup: Supervisor, cond: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, (sup.status(), sup.events.events())
        sup.tick()
        time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead too
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def _cfg(**kw: Any) -> SupervisorConfig:
    return SupervisorConfig(interval_s=0.2, heartbeat_interval_s=1.0, stop_grace_s=5, **kw)


def test_death_restarts_by_policy_and_shutdown_leaves_nothing(tmp_path: Path) -> None:
    roles = [_role("smp/0", "smp", 0, tmp_path, ready=True),
             _role("ps/0", "ps", 0, tmp_path, ready=True),
             _role("trainer/0", "trainer", 1, tmp_path),
             _role("joiner/0", "joiner", 1, tmp_path)]
    sup = Supervisor(roles, str(tmp_path / "run"), config=_cfg())
    try:
        sup.start()
        _until(sup, lambda: all(st.status == "running" for st in sup.roles.values()))
        trainer_pid = sup.roles["trainer/0"].proc.pid  # type: ignore[union-attr]
        sup.roles["ps/0"].proc.kill()  # type: ignore[union-attr]
        _until(sup, lambda: sup.roles["ps/0"].restarts == 1 and not sup.recovering
               and all(st.status == "running" for st in sup.roles.values()))
        # a PS death restarts every trainer (job-wide restore), not the joiner or the SMP
        assert sup.roles["trainer/0"].restarts == 1
        assert sup.roles["trainer/0"].proc.pid != trainer_pid  # type: ignore[union-attr]
        assert sup.roles["joiner/0"].restarts == 0 and sup.roles["smp/0"].restarts == 0
        kinds = [e["kind"] for e in sup.events.events()]
        assert {"died", "restart", "recovered"} <= set(kinds)
        pids = [st.proc.pid for st in sup.roles.values()]  # type: ignore[union-attr]
    finally:
        sup.shutdown()
    assert not any(_alive(p) for p in pids)
    lines = (tmp_path / "run" / "events.jsonl").read_text().splitlines()
    assert any(json.loads(x)["kind"] == "died" and json.loads(x)["role"] == "ps/0"
               for x in lines)
    assert (tmp_path / "run" / "ps-0.log").exists()


def test_hung_role_is_killed_and_restarted(tmp_path: Path) -> None:
    flag = str(tmp_path / "hung-once")
    roles = [_role("joiner/0", "joiner", 0, tmp_path, "--hang-once", flag)]
    sup = Supervisor(roles, str(tmp_path / "run"), config=_cfg())
    try:
        sup.start()
        first = sup.roles["joiner/0"].proc.pid  # type: ignore[union-attr]
        _until(sup, lambda: sup.events.count("hung") == 1, timeout=60)
        hung = [e for e in sup.events.events() if e["kind"] == "hung"][0]
        assert hung["role"] == "joiner/0" and "heartbeat" in hung["message"]
        assert not _alive(first)
        _until(sup, lambda: sup.roles["joiner/0"].restarts == 1
               and sup.roles["joiner/0"].status == "running")
        # the second incarnation keeps beating: no second hang
        t = time.monotonic()
        _until(sup, lambda: time.monotonic() - t > 4.0)
        assert sup.events.count("hung") == 1
    finally:
        sup.shutdown()


def test_straggler_is_flagged(tmp_path: Path) -> None:
    roles = [_role("trainer/0", "trainer", 0, tmp_path, "--step-s", "0.01"),
             _role("trainer/1", "trainer", 0, tmp_path, "--step-s", "0.05"),
             _role("trainer/2", "trainer", 0, tmp_path, "--step-s", "0.011")]
    sup = Supervisor(roles, str(tmp_path / "run"), config=_cfg())
    try:
        sup.start()
        _until(sup, lambda: sup.roles["trainer/1"].straggler, timeout=60)
        assert not sup.roles["trainer/0"].straggler and not sup.roles["trainer/2"].straggler
        ev = [e for e in sup.events.events() if e["kind"] == "straggler"]
        assert [e["role"] for e in ev] == ["trainer/1"]
        assert sup.status()["roles"][1]["straggler"] is True
    finally:
        sup.shutdown()


def test_finite_done_and_never_restart_is_fatal(tmp_path: Path) -> None:
    roles = [_role("producer", "producer", None, tmp_path, "--exit-after", "1", finite=True,
                   restart="never", heartbeat=False),
             _role("broker", "broker", None, tmp_path, heartbeat=False, restart="never")]
    sup = Supervisor(roles, str(tmp_path / "run"), config=_cfg())
    try:
        sup.start()
        _until(sup, lambda: sup.roles["producer"].status == "done")
        assert sup.fatal is None and sup.roles["producer"].restarts == 0
        sup.roles["broker"].proc.kill()  # type: ignore[union-attr]
        _until(sup, lambda: sup.fatal is not None)
        assert "broker" in sup.fatal  # type: ignore[operator]
        assert sup.events.count("error") == 1
    finally:
        sup.shutdown()


def test_chaos_kills_a_whole_host_and_it_comes_back(tmp_path: Path) -> None:
    shm = tmp_path / "shm-h1"
    roles = [_role("smp/0", "smp", 0, tmp_path, ready=True),
             _role("smp/1", "smp", 1, tmp_path, ready=True),
             _role("ps/1", "ps", 1, tmp_path, ready=True),
             _role("serve/0", "serve", 0, tmp_path, chaos=False)]
    chaos = ChaosConfig(seed=0, first_after_s=0.0, mean_interval_s=0.1, min_gap_s=0.0,
                        host_probability=1.0, max_kills=1)
    sup = Supervisor(roles, str(tmp_path / "run"), hosts={1: str(shm)},
                     config=_cfg(chaos=chaos))
    try:
        sup.start()
        shm.mkdir()
        (shm / "segment").write_bytes(b"x")
        _until(sup, lambda: sup.events.count("chaos") == 1)
        ev = [e for e in sup.events.events() if e["kind"] == "chaos"][0]
        assert ev["host"] == 1 and sorted(ev["victims"]) == ["ps/1", "smp/1"]
        assert not shm.exists()                                # the host's memory is gone
        _until(sup, lambda: sup.roles["smp/1"].restarts == 1 and sup.roles["ps/1"].restarts == 1
               and not sup.recovering
               and all(st.status == "running" for st in sup.roles.values()))
        assert sup.roles["smp/0"].restarts == 0
    finally:
        sup.shutdown()


def test_keepers_kill_everything_when_the_supervisor_dies(tmp_path: Path) -> None:
    """``kill -9`` of the supervisor itself leaves no orphans (the keepers clean up)."""
    pids_file = tmp_path / "pids"
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(Path(FAKE).parent)!r})
        from monolith_py.supervisor import RoleSpec, Supervisor
        roles = [RoleSpec(f"ps/{{i}}", "ps", ("sleep", "300"), host=i % 2, heartbeat=False)
                 for i in range(3)]
        roles.append(RoleSpec("broker", "broker", ("sleep", "300"), heartbeat=False))
        sup = Supervisor(roles, {str(tmp_path / 'run')!r})
        sup.start()
        pids = [st.proc.pid for st in sup.roles.values()]
        pids += [g.pgid for g in sup.groups.values() if g.pgid]
        open({str(pids_file)!r}, "w").write(" ".join(map(str, pids)))
        time.sleep(300)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 60
        while not pids_file.exists():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.1)
        pids = [int(p) for p in pids_file.read_text().split()]
        assert len(pids) == 4 + 3 and all(_alive(p) for p in pids)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in pids):
        assert time.monotonic() < deadline, [p for p in pids if _alive(p)]
        time.sleep(0.2)


def test_status_server_serves_page_and_api(tmp_path: Path) -> None:
    roles = [_role("ps/0", "ps", 0, tmp_path)]
    sup = Supervisor(roles, str(tmp_path / "run"), config=_cfg())
    srv = StatusServer(lambda: {**sup.status(), "extra": {"trained": 1}}, sup.series,
                       sup.events).start()
    try:
        sup.start()
        _until(sup, lambda: sup.series.last("step_s:ps/0") is not None)

        def get(path: str) -> tuple[int, bytes, str]:
            with urllib.request.urlopen(srv.url + path, timeout=10) as r:
                return r.status, r.read(), r.headers["Content-Type"]

        code, body, ctype = get("")
        assert code == 200 and b"chart-quality" in body and ctype.startswith("text/html")
        assert b"http" not in body.replace(b"http://www.w3.org", b"")  # no external resources
        _, js, ctype = get("app.js")
        assert b"data-points" in js or b"dataset.points" in js
        status = json.loads(get("api/status")[1])
        assert status["roles"][0]["name"] == "ps/0" and status["extra"]["trained"] == 1
        series = json.loads(get("api/series")[1])
        assert series["step_s:ps/0"] and len(series["step_s:ps/0"][0]) == 2
        t_last = series["step_s:ps/0"][-1][0]
        assert all(p[0] > t_last for p in json.loads(
            get(f"api/series?since={t_last}")[1]).get("step_s:ps/0", []))
        evs = json.loads(get("api/events?since=0")[1])
        assert evs and evs[0]["seq"] == 1
        assert b"monolith_supervisor_role_up" in get("metrics")[1]
        with pytest.raises(urllib.error.HTTPError) as err:
            get("nope")
        assert err.value.code == 404
    finally:
        srv.close()
        sup.shutdown()


def test_frozen_role_without_heartbeat_is_hung(tmp_path: Path) -> None:
    """A role watched only through its /metrics (serving): SIGSTOP freezes it whole."""
    roles = [_role("serve/0", "serve", 0, tmp_path, heartbeat=False)]
    sup = Supervisor(roles, str(tmp_path / "run"), config=_cfg())
    try:
        sup.start()
        _until(sup, lambda: sup.roles["serve/0"].status == "running"
               and sup.roles["serve/0"].beats is not None)
        first = sup.roles["serve/0"].proc
        assert first is not None
        os.kill(first.pid, signal.SIGSTOP)
        _until(sup, lambda: sup.events.count("hung") == 1, timeout=60)
        assert first.poll() is not None                       # killed although stopped
        _until(sup, lambda: sup.roles["serve/0"].restarts == 1
               and sup.roles["serve/0"].status == "running")
    finally:
        sup.shutdown()
