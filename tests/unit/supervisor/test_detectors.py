"""Heartbeat (hung) and straggler rules: pure functions over fake time series."""

from __future__ import annotations

import math

import pytest

from monolith_py.errors import ConfigError
from monolith_py.observe import metrics
from monolith_py.observe.heartbeat import Heartbeat, is_hung
from monolith_py.observe.stragglers import StragglerPolicy, find_stragglers, straggler_ratios


# -- hung ------------------------------------------------------------------------------------

def test_hung_after_two_intervals_without_progress() -> None:
    assert not is_hung(100.0, 100.0, interval_s=5.0)
    assert not is_hung(100.0, 110.0, interval_s=5.0)          # exactly 2 intervals: not yet
    assert is_hung(100.0, 110.01, interval_s=5.0)
    assert not is_hung(100.0, 114.0, interval_s=5.0, misses=3)
    assert is_hung(100.0, 115.5, interval_s=5.0, misses=3)


def test_starting_role_judged_by_its_start_timeout() -> None:
    assert not is_hung(None, 50.0, 5.0, started=0.0, start_timeout_s=60.0)
    assert is_hung(None, 61.0, 5.0, started=0.0, start_timeout_s=60.0)
    assert not is_hung(None, 1e9, 5.0)                         # never started: not hung


def test_hung_rejects_bad_settings() -> None:
    with pytest.raises(ConfigError):
        is_hung(0.0, 1.0, interval_s=0.0)
    with pytest.raises(ConfigError):
        is_hung(0.0, 1.0, interval_s=1.0, misses=0)


def test_heartbeat_metrics_move() -> None:
    hb = Heartbeat("unit/7", clock=lambda: 1234.0)
    text = metrics.render().decode()
    before = _value(text, 'monolith_heartbeat_beats_total{role="unit/7"}')
    hb.beat()
    hb.step(0.5, examples=10)
    text = metrics.render().decode()
    assert _value(text, 'monolith_heartbeat_beats_total{role="unit/7"}') == before + 2
    assert _value(text, 'monolith_steps_total{role="unit/7"}') >= 1
    assert _value(text, 'monolith_step_last_seconds{role="unit/7"}') == 0.5
    assert _value(text, 'monolith_heartbeat_timestamp_seconds{role="unit/7"}') == 1234.0
    with pytest.raises(ConfigError):
        Heartbeat("")


def _value(text: str, key: str) -> float:
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# -- stragglers ------------------------------------------------------------------------------

def _series(n: int, slow: dict[int, float] | None = None, base: float = 0.1,
            members: int = 4) -> dict[str, list[float | None]]:
    out: dict[str, list[float | None]] = {f"trainer/{m}": [base] * n for m in range(members)}
    for i, v in (slow or {}).items():
        out["trainer/1"][i] = v
    return out


def test_straggler_needs_k_consecutive_slow_intervals() -> None:
    s = _series(10, {i: 0.2 for i in range(5, 10)})          # slow for the last 5 intervals
    assert find_stragglers(s, factor=1.5, k=5) == ["trainer/1"]
    assert find_stragglers(s, factor=1.5, k=6) == []          # 6th interval back was fine
    s["trainer/1"][7] = 0.12                                   # one interval within the band
    assert find_stragglers(s, factor=1.5, k=5) == []


def test_factor_is_strict_and_relative_to_the_median() -> None:
    s = _series(5, {i: 0.15 for i in range(5)})               # exactly 1.5x: not above
    assert find_stragglers(s, factor=1.5, k=5) == []
    s = _series(5, {i: 0.16 for i in range(5)})
    assert find_stragglers(s, factor=1.5, k=5) == ["trainer/1"]
    # everybody slow together is not a straggler (the median moves with them)
    s = {f"t/{m}": [1.0] * 5 for m in range(3)}
    assert find_stragglers(s, factor=1.5, k=5) == []


def test_missing_intervals_and_lone_members() -> None:
    s = _series(6, {i: 0.5 for i in range(6)})
    s["trainer/1"][3] = None                                   # no step in that interval
    assert find_stragglers(s, factor=1.5, k=5) == []
    assert find_stragglers({"trainer/0": [9.0] * 10}, k=3) == []    # nobody to compare with
    assert find_stragglers({}, k=3) == []
    s2 = {"a": [0.1] * 3, "b": [math.nan, 0.1, 0.1], "c": [1.0] * 3}
    assert find_stragglers(s2, factor=1.5, k=2) == ["c"]
    assert find_stragglers(s2, factor=1.5, k=3) == ["c"]       # 2 values define interval 0


def test_two_members() -> None:
    # median of two is their mean: the slow one is flagged when > 3x the fast one
    assert find_stragglers({"ps/0": [1.0] * 5, "ps/1": [3.5] * 5}, k=5) == ["ps/1"]
    assert find_stragglers({"ps/0": [1.0] * 5, "ps/1": [2.5] * 5}, k=5) == []


def test_short_history_is_not_enough() -> None:
    s = _series(3, {0: 1.0, 1: 1.0, 2: 1.0})
    assert find_stragglers(s, k=5) == []
    r = straggler_ratios(s, k=5)
    assert math.isnan(r["trainer/1"][0]) and r["trainer/1"][-1] == pytest.approx(10.0)


@pytest.mark.parametrize("factor,k", [(1.0, 5), (0.5, 5), (math.inf, 5), (1.5, 0), (1.5, 2.5)])
def test_policy_validation(factor: float, k: object) -> None:
    with pytest.raises(ConfigError):
        StragglerPolicy(factor, k)  # type: ignore[arg-type]
