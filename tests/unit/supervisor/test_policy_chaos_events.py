"""Recovery policy, chaos schedule and event log (no processes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from monolith_py.errors import ConfigError
from monolith_py.supervisor.chaos import Chaos, ChaosConfig
from monolith_py.supervisor.events import EventLog
from monolith_py.supervisor.policy import plan_recovery
from monolith_py.supervisor.spec import RoleSpec


def _roles(trainers: int = 2) -> dict[str, RoleSpec]:
    specs = [("broker", "broker", "never"), ("producer", "producer", "never"),
             ("smp/0", "smp", "always"), ("smp/1", "smp", "always"),
             ("ps/0", "ps", "always"), ("ps/1", "ps", "always"),
             ("joiner/0", "joiner", "always"), ("serve/0", "serve", "always")]
    specs += [(f"trainer/{r}", "trainer", "always") for r in range(trainers)]
    return {n: RoleSpec(n, k, ("x",), heartbeat=False, restart=p) for n, k, p in specs}


def test_ps_failure_restarts_every_trainer_with_a_restore() -> None:
    plan = plan_recovery({"ps/1"}, _roles())
    assert plan.fatal is None and plan.restore
    assert plan.stop == ("trainer/0", "trainer/1")
    assert plan.start == ("ps/1", "trainer/0", "trainer/1")


def test_trainer_failure_is_job_wide_but_keeps_the_ps() -> None:
    plan = plan_recovery({"trainer/1"}, _roles())
    assert plan.stop == ("trainer/0",) and plan.start == ("trainer/0", "trainer/1")
    assert plan.restore


def test_whole_host_in_dependency_order() -> None:
    plan = plan_recovery({"trainer/0", "ps/0", "smp/0", "serve/0", "joiner/0"}, _roles())
    assert plan.start == ("smp/0", "ps/0", "joiner/0", "serve/0", "trainer/0", "trainer/1")
    assert plan.stop == ("trainer/1",)


@pytest.mark.parametrize("role", ["smp/1", "joiner/0", "serve/0"])
def test_roles_that_restart_alone(role: str) -> None:
    plan = plan_recovery({role}, _roles())
    assert plan.start == (role,) and plan.stop == () and not plan.restore


def test_unrecoverable_and_unknown_roles() -> None:
    assert "broker" in (plan_recovery({"broker", "ps/0"}, _roles()).fatal or "")
    assert plan_recovery({"producer"}, _roles()).fatal is not None
    assert plan_recovery({"nope/3"}, _roles()).fatal is not None


def test_finished_trainers_are_not_restarted() -> None:
    plan = plan_recovery({"ps/0"}, _roles(), finished={"trainer/1"})
    assert plan.start == ("ps/0", "trainer/0") and plan.stop == ("trainer/0",)


def test_role_spec_validation() -> None:
    with pytest.raises(ConfigError):
        RoleSpec("Bad Name", "ps", ("x",), heartbeat=False)
    with pytest.raises(ConfigError):
        RoleSpec("ps/0", "nope", ("x",), heartbeat=False)
    with pytest.raises(ConfigError):
        RoleSpec("ps/0", "ps", ())
    with pytest.raises(ConfigError):
        RoleSpec("ps/0", "ps", ("x",))                       # heartbeat needs a metrics URL
    with pytest.raises(ConfigError):
        RoleSpec("ps/0", "ps", ("x",), heartbeat=False, restart="sometimes")
    assert RoleSpec("ps/12", "ps", ("x",), heartbeat=False).index == 12


# -- chaos -----------------------------------------------------------------------------------

def _decisions(seed: int, n: int = 20) -> list[tuple[float, tuple[str, str | int]]]:
    c = Chaos(ChaosConfig(seed=seed, mean_interval_s=10, first_after_s=5, min_gap_s=2),
              start=0.0)
    out = []
    now = 0.0
    while len(out) < n:
        now += 0.5
        if c.due(now):
            out.append((c.next_at, c.pick(["trainer/0", "ps/0", "ps/1", "smp/2"], [0, 1, 2])))
            c.struck(now)
    return out


def test_chaos_is_reproducible_per_seed() -> None:
    a, b = _decisions(3), _decisions(3)
    assert a == b
    assert a != _decisions(4)
    times = [t for t, _ in a]
    assert times[0] >= 5.0 + 2.0 and all(t2 - t1 >= 2.0 for t1, t2 in zip(times, times[1:]))
    kinds = {d[0] for _, d in a}
    assert kinds == {"host", "role"}                          # both happen over 20 kills


def test_chaos_limits_and_probabilities() -> None:
    c = Chaos(ChaosConfig(seed=1, first_after_s=0, mean_interval_s=1, min_gap_s=0,
                          max_kills=1, host_probability=1.0), start=0.0)
    assert c.pick(["ps/0"], [0, 1])[0] == "host"
    assert c.pick(["ps/0"], [])[0] == "role"                  # no host to take
    c.struck(0.0)
    assert not c.due(1e9)
    c0 = Chaos(ChaosConfig(seed=1, host_probability=0.0), start=0.0)
    assert all(c0.pick(["ps/0", "ps/1"], [0])[0] == "role" for _ in range(50))
    with pytest.raises(ConfigError):
        c0.pick([], [])
    for bad in (dict(mean_interval_s=0), dict(host_probability=1.5), dict(max_kills=-1)):
        with pytest.raises(ConfigError):
            ChaosConfig(**bad)  # type: ignore[arg-type]


# -- events ----------------------------------------------------------------------------------

def test_event_log_writes_json_lines(tmp_path: Path) -> None:
    seen: list[dict] = []
    path = tmp_path / "events.jsonl"
    log = EventLog(str(path), keep=3, clock=iter(range(100, 200)).__next__, echo=seen.append)
    log.record("died", "ps/1", "exit status -9", exit_code=-9)
    for i in range(4):
        log.record("snapshot", None, f"snapshot {i}")
    log.close()
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [e["kind"] for e in lines] == ["died"] + ["snapshot"] * 4
    assert lines[0]["exit_code"] == -9 and lines[0]["role"] == "ps/1" and lines[0]["seq"] == 1
    assert lines[0]["elapsed"] == 1.0
    assert len(log.events()) == 3 and [e["seq"] for e in log.events(since_seq=3)] == [4, 5]
    assert log.counts() == {"died": 1, "snapshot": 4} and len(seen) == 5
    with pytest.raises(ConfigError):
        log.record("weird", None, "x")
