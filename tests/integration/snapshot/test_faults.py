"""kill -9 at seeded random points of the snapshot path, over 20 cycles.

Each cycle arms a fault plan in one running process — the job process (capture, commit,
cut, seal) or one of the three SMPs (commit, encode, place, block receipt, seal) — which
then SIGKILLs itself at a phase drawn from the plan's seed. The victim is restarted: a restarted
SMP rebuilds its share from its peers; a restarted job process restores the newest sealed
snapshot. After every cycle the state restored from the SMPs (and, for a job restart, the
state the job itself restored) must equal, bit for bit, an uninterrupted reference run at
the restored step; the restored snapshot must be the newest sealed one.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Any

import pytest

from monolith_py.snapshot.recovery import Recovery
from monolith_py.snapshot.smp import smp_clients
from monolith_py.testing.faults import FILE_ENV, FaultPlan, arm, read_log
from monolith_py.testing.hosts import LocalCluster
from monolith_py.testing.state import state_digest
from tests.integration.snapshot.faultjob import JOB, PARTICIPANTS, State

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

CYCLES = 20
SMP_PHASES = ("smp.commit", "smp.encode", "smp.place", "smp.block", "smp.seal")
JOB_PHASES = ("ps.capture", "ps.commit", "trainer.capture", "trainer.commit", "coord.cut",
              "coord.seal.begin", "coord.seal")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))


class Reference:
    """Uninterrupted run, advanced on demand (restarted from scratch to go back)."""

    def __init__(self) -> None:
        self.st = State(0)

    def at(self, step: int) -> dict[str, str]:
        if step < self.st.step:
            self.st = State(0)
        while self.st.step < step:
            self.st.train_step()
        return self.st.digests()


def _events(path: str) -> list[dict[str, Any]]:
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


def _wait(pred: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_kill9_during_snapshot_encode_and_seal(tmp_path: Any) -> None:
    results, faults = str(tmp_path / "results.jsonl"), str(tmp_path / "faults.log")
    plans = {v: str(tmp_path / f"plan-{v}") for v in ("job", 0, 1, 2)}
    ref = Reference()
    with LocalCluster(3, job=JOB, k=2, m=3, keep=2, full_every=3, workdir=str(tmp_path),
                      place_timeout_s=2.0, smp_env=lambda h: {FILE_ENV: plans[h]}) as cluster:
        smps = smp_clients(cluster.smp_addresses, timeout_s=10.0)
        job_cmd = [sys.executable, "-m", "tests.integration.snapshot.faultjob",
                   "--smp-group", ",".join(cluster.smp_addresses), "--results", results,
                   "--every", "3", "--pace-s", "0.03"]

        def start_job() -> None:
            n = len(_events(results))
            expect = newest_sealed()
            cluster.hosts[2].spawn("job", job_cmd, {"PYTHONPATH": ROOT, FILE_ENV: plans["job"]})
            ev = _wait(lambda: [e for e in _events(results)[n:] if e["event"] in ("restored", "fresh")],
                       180, "the job to start")[0]
            if ev["event"] == "restored":  # the restarted job restored the newest sealed cut
                assert ev["digests"] == ref.at(ev["step"]), ev
                assert ev["snapshot_id"] == expect, ev

        def newest_sealed() -> int:
            return max(Recovery(smps, job=JOB).catalog().manifests, default=-1)

        def sealed_after(sid: int) -> bool:
            return any(e["event"] == "sealed" and e["snapshot_id"] > sid for e in _events(results))

        def job_alive() -> bool:
            return cluster.hosts[2].procs["job"].poll() is None

        start_job()
        _wait(lambda: sealed_after(-1), 120, "a first sealed snapshot")
        victims = ["job", 0, 1, 2, 0] * (CYCLES // 5)
        for cycle, victim in enumerate(victims):
            n_faults = len(read_log(faults))
            phases = JOB_PHASES if victim == "job" else SMP_PHASES
            arm(plans[victim], FaultPlan(seed=cycle, phases={p: 0.3 for p in phases},
                                         label=str(victim), log_path=faults, max_faults=1))
            _wait(lambda: len(read_log(faults)) > n_faults, 120, f"cycle {cycle}: the fault")
            arm(plans[victim], None)
            if victim == "job":
                _wait(lambda: not job_alive(), 60, "the job's death")
                start_job()
            else:
                h = int(victim)
                _wait(lambda: cluster.hosts[h].procs["smp"].poll() is not None, 30, "SMP death")
                cluster.start_smp(h)
                _wait(lambda: smps[h].stats().get("repair") is not None, 120, "SMP repair")
            assert len(read_log(faults)) == n_faults + 1, f"cycle {cycle}: no fault happened"
            assert job_alive()
            base = newest_sealed()
            _wait(lambda: sealed_after(base), 120, f"cycle {cycle}: a new seal")
            # a freshly restarted process (this test) restores the newest sealed snapshot;
            # the job is frozen meanwhile (it seals every ~0.1 s and keeps only 2)
            job = cluster.hosts[2].procs["job"]
            os.kill(job.pid, signal.SIGSTOP)
            try:
                rec = Recovery(smps, job=JOB)
                cat = rec.catalog()
                man = rec.newest_common(PARTICIPANTS, cat)
                assert man is not None
                got = {p: rec.restore(p, man.snapshot_id, catalog=cat) for p in PARTICIPANTS}
                rec.close()
            finally:
                os.kill(job.pid, signal.SIGCONT)
            want = ref.at(man.step)
            assert {p: state_digest(r.state) for p, r in got.items()} == want, f"cycle {cycle}"
        hit = {phase for _, phase in read_log(faults)}
        assert len(read_log(faults)) == CYCLES
        assert len(hit & set(SMP_PHASES)) >= 3 and len(hit & set(JOB_PHASES)) >= 2, hit
        # and one more kill -9 of the job at an arbitrary moment, outside any phase
        cluster.hosts[2].kill_process("job")
        start_job()
        cluster.hosts[2].kill_process("job")
