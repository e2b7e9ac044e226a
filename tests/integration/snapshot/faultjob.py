"""A small deterministic job process for the fault-injection tests.

Two PS shards (in-process :class:`PSShard` objects; their parts homed on hosts 0 and 1) and
one trainer state (a torch model, its Adam optimizer, the torch RNG, the step; homed on
host 2) train on data that is a pure function of ``(seed, step)``; a coordinator snapshots
them to the SMP group every ``--every`` steps. At start the process restores the newest
sealed snapshot (if any) and appends what it restored — ids and state digests — to the
results file; so the test can check it against :func:`reference` run in-process.

Run: ``python -m tests.integration.snapshot.faultjob --smp-group a,b,c --results FILE``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import numpy as np
import torch

from monolith_py.ps import PSShard
from monolith_py.ps.routing import shard_of
from monolith_py.table import OptimizerConfig, TableConfig

JOB = "faults"
TABLES = [
    TableConfig("user", dim=4, optimizer=OptimizerConfig("adagrad", lr=0.1), admit_threshold=2,
                filter_memory_bytes=1024, ttl_seconds=60, initial_capacity=64),
    TableConfig("item", dim=2, optimizer=OptimizerConfig("adam", lr=0.01), initial_capacity=64),
]
PARTICIPANTS = ("ps/0", "ps/1", "trainer/0")


class State:
    """Everything the job trains (deterministic given the seed)."""

    def __init__(self, seed: int) -> None:
        torch.set_num_threads(1)
        self.seed = seed
        self.shards = [PSShard(i, 2, TABLES) for i in range(2)]
        torch.manual_seed(seed)
        self.model = torch.nn.Linear(3, 1)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=0.01)
        self.step = 0

    def trainer_state(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "opt": self.opt.state_dict(),
                "rng": torch.get_rng_state(), "step": self.step}

    def load_trainer(self, st: Any) -> None:
        self.model.load_state_dict(st["model"])
        self.opt.load_state_dict(st["opt"])
        torch.set_rng_state(st["rng"])
        self.step = int(st["step"])

    def train_step(self) -> None:
        rng = np.random.default_rng([self.seed, self.step])
        now = 1000 + 5 * self.step
        for cfg in TABLES:
            keys = np.unique(rng.zipf(1.3, 30).astype(np.int64) % 400)
            owner = shard_of(keys, 2)
            for i, shard in enumerate(self.shards):
                k = keys[owner == i]
                shard.pull(cfg.name, k, train=True)
                shard.push(cfg.name, k, rng.standard_normal((k.shape[0], cfg.dim)).astype(
                    np.float32), now)
        if self.step % 7 == 6:
            for s in self.shards:
                s.evict_expired(now)
        self.opt.zero_grad()
        self.model(torch.randn(4, 3)).sum().backward()
        self.opt.step()
        self.step += 1

    def digests(self) -> dict[str, str]:
        from monolith_py.testing.state import state_digest

        return {"ps/0": state_digest(self.shards[0].state_dict()),
                "ps/1": state_digest(self.shards[1].state_dict()),
                "trainer/0": state_digest(self.trainer_state())}


def reference(seed: int, steps: int) -> dict[str, str]:
    """The digests after ``steps`` uninterrupted steps."""
    st = State(seed)
    while st.step < steps:
        st.train_step()
    return st.digests()


def _log(path: str, event: dict[str, Any]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(event) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smp-group", required=True)
    ap.add_argument("--results", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--every", type=int, default=3)
    ap.add_argument("--pace-s", type=float, default=0.02)
    ap.add_argument("--max-steps", type=int, default=1_000_000)
    args = ap.parse_args()

    from monolith_py.errors import MonolithError
    from monolith_py.snapshot.coordinator import SnapshotCoordinator
    from monolith_py.snapshot.participant import PSParticipant, TrainerParticipant
    from monolith_py.snapshot.recovery import Recovery
    from monolith_py.snapshot.smp import smp_clients

    smps = smp_clients(args.smp_group.split(","), timeout_s=10.0)
    st = State(args.seed)
    parts = [PSParticipant(s, smps[i], i, group=smps, job=JOB) for i, s in enumerate(st.shards)]
    trainer = TrainerParticipant("trainer/0", smps[2], 2, st.trainer_state, st.load_trainer,
                                 group=smps, job=JOB)
    man = Recovery(smps, job=JOB).newest_common(PARTICIPANTS)
    if man is not None:
        for p in (*parts, trainer):
            p.restore(man.snapshot_id)
        _log(args.results, {"event": "restored", "snapshot_id": man.snapshot_id,
                            "step": st.step, "digests": st.digests(), "pid": os.getpid()})
    else:
        _log(args.results, {"event": "fresh", "pid": os.getpid()})
    coord = SnapshotCoordinator(JOB, smps, [*parts, trainer], timeout_s=15.0,
                                hosts=args.smp_group.split(","))
    while st.step < args.max_steps:
        st.train_step()
        if st.step % args.every == 0:
            try:
                m = coord.snapshot(st.step)
                _log(args.results, {"event": "sealed", "snapshot_id": m.snapshot_id,  # type: ignore[union-attr]
                                    "step": st.step})
            except MonolithError as exc:
                _log(args.results, {"event": "failed", "step": st.step, "error": str(exc)[:300]})
        time.sleep(args.pace_s)
    _log(args.results, {"event": "done", "step": st.step})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
