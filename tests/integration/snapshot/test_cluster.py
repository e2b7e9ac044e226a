"""Real processes: 3 hosts (process groups) with an SMP each, 2 ``monolith ps`` shards with
snapshots, this test as the trainer and coordinator. kill -9 of a PS, of a whole host (the
erasure-coded path), of an SMP; a universal checkpoint restored onto 3 shards (2 -> 3)
with ``monolith checkpoint``. Every restored state is compared bit for bit with an
in-process reference fed the same pulls and pushes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import numpy as np
import pytest
import torch

from monolith_py.jobconfig import load_job
from monolith_py.ps import ClientOptions, PSClient, ShardedBackend
from monolith_py.ps.routing import shard_of
from monolith_py.snapshot.checkpoint import find_checkpoints, load_checkpoint
from monolith_py.snapshot.coordinator import SnapshotCoordinator
from monolith_py.snapshot.participant import ParticipantClient, TrainerParticipant
from monolith_py.snapshot.smp import smp_clients
from monolith_py.testing.hosts import LocalCluster, free_port
from monolith_py.testing.state import assert_states_equal, state_digest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

JOB = "cluster"
FEATURES = ["--features", "user,item", "--dim", "4"]


def _tables() -> Any:
    return load_job(None, {"model.features": "user,item", "table_defaults.dim": 4}).require_tables()


class Driver:
    """Trains the PS processes and an in-process reference with the same calls."""

    def __init__(self, addrs: list[str]) -> None:
        self.tables = _tables()
        self.client = PSClient(addrs, self.tables, ClientOptions(async_push=False, deadline_s=60))
        self.ref = ShardedBackend.build(self.tables, len(addrs))
        self.rng = np.random.default_rng(0)
        self.now = 100
        self.w = torch.zeros(3)
        self.step = 0

    def train(self, steps: int) -> None:
        for _ in range(steps):
            self.now += 7
            keys = {t.name: torch.from_numpy(np.unique(
                self.rng.zipf(1.3, 200).astype(np.int64) % 5000)) for t in self.tables}
            grads = {n: (k, torch.from_numpy(self.rng.standard_normal(
                (k.shape[0], 4)).astype(np.float32))) for n, k in keys.items()}
            for backend in (self.client, self.ref):
                backend.lookup(keys, train=True)
                backend.apply_gradients(grads, self.now)
            self.w += 0.5
            self.step += 1

    def digests(self) -> list[str]:
        return [state_digest(s.state_dict()) for s in self.ref.shards]


def _ps_cmd(cluster: LocalCluster, shard: int, n: int, host: int, port: int,
            restore: str = "none") -> list[str]:
    return [sys.executable, "-m", "monolith_py.cli", "ps", "--shard", str(shard),
            "--num-shards", str(n), "--port", str(port), *FEATURES,
            "--smp", cluster.smp_addresses[host], "--smp-group", ",".join(cluster.smp_addresses),
            "--host-id", str(host), "--job", JOB, "--restore", restore]


def test_kill_ps_host_smp_and_reshard(tmp_path: Any) -> None:
    with LocalCluster(3, job=JOB, k=2, m=3, keep=2, workdir=str(tmp_path)) as cluster:
        ports = [free_port(), free_port()]
        for i in range(2):  # shard i lives on host i
            cluster.spawn(i, "ps", _ps_cmd(cluster, i, 2, i, ports[i]), ready=True)
        addrs = [f"127.0.0.1:{p}" for p in ports]
        d = Driver(addrs)
        smps = smp_clients(cluster.smp_addresses)
        pss = [ParticipantClient(f"ps/{i}", a) for i, a in enumerate(addrs)]
        trainer_state = {"w": d.w}
        trainer = TrainerParticipant("trainer/0", smps[2], 2,
                                     lambda: {"w": d.w, "step": d.step},
                                     lambda st: trainer_state.update(st), group=smps, job=JOB)
        coord = SnapshotCoordinator(JOB, smps, [*pss, trainer], hosts=cluster.smp_addresses,
                                    info={"num_shards": 2})
        expected: dict[int, list[str]] = {}

        def snapshot() -> int:
            man = coord.snapshot(d.step)
            assert isinstance(man.snapshot_id, int)
            expected[man.snapshot_id] = d.digests()
            return man.snapshot_id

        for _ in range(3):
            d.train(4)
            sid = snapshot()
        assert coord.last_sealed is not None
        assert coord.last_sealed.parts["ps/0"].kind == "inc"
        assert [p.digest() for p in pss] == expected[sid]

        # 1. kill -9 of a PS: it restarts, re-attaches to its host's SMP, restores from memory
        cluster.hosts[0].kill_process("ps")
        out = cluster.spawn(0, "ps", _ps_cmd(cluster, 0, 2, 0, ports[0], "latest"), ready=True)
        assert out[1] == addrs[0]
        assert pss[0].digest() == expected[sid][0]
        assert "local SMP copy" in open(cluster.hosts[0].log_path("ps")).read()

        # 2. a whole host dies (SMP, PS and its memory): the EC path rebuilds shard 1 (its
        # new SMP is told not to rebuild its share first, so the PS reads the part's data
        # blocks from the peers; the parity went down with the host)
        d.train(3)
        sid = snapshot()
        cluster.hosts[1].kill()
        cluster.start_smp(1, extra=["--no-repair"])
        cluster.spawn(1, "ps", _ps_cmd(cluster, 1, 2, 1, ports[1], "latest"), ready=True)
        assert pss[1].digest() == expected[sid][1]
        assert "data blocks read from hosts" in open(cluster.hosts[1].log_path("ps")).read()
        assert pss[0].restore(sid)["snapshot_id"] == sid   # job-wide: same cut everywhere
        assert [p.digest() for p in pss] == expected[sid]

        # 3. an SMP dies alone: participants keep running; the restarted SMP rebuilds its
        # share from its peers; the next snapshots seal again. (Two snapshots first: host 1
        # came back without rebuilding its share, so the older chains are down to one block
        # and only the snapshots taken since are fully protected again.)
        for _ in range(2):
            d.train(2)
            snapshot()
        cluster.hosts[0].kill_process("smp")
        cluster.start_smp(0)
        smps[0].wait_ready()
        deadline = time.monotonic() + 120
        while smps[0].stats().get("repair") is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert smps[0].stats()["repair"]["failed"] == 0
        d.train(3)
        sid = snapshot()
        d.train(2)
        sid = snapshot()
        for p in pss:
            assert p.restore(sid)["snapshot_id"] == sid
        assert [p.digest() for p in pss] == expected[sid]
        r = trainer.restore(sid)
        assert r.step == d.step and torch.equal(trainer_state["w"], d.w)

        # 4. universal checkpoint, restored onto 3 new shards (2 -> 3)
        ckpt_dir = str(tmp_path / "ckpt")
        save = subprocess.run([sys.executable, "-m", "monolith_py.cli", "checkpoint", "save",
                               "--smp-group", ",".join(cluster.smp_addresses), "--job", JOB,
                               "--out", ckpt_dir], capture_output=True, timeout=300)
        assert save.returncode == 0, save.stderr.decode()[-3000:]
        path = find_checkpoints(ckpt_dir)[0]
        insp = subprocess.run([sys.executable, "-m", "monolith_py.cli", "checkpoint", "inspect",
                               ckpt_dir, "--num-shards", "3", "--json"],
                              capture_output=True, timeout=300)
        assert insp.returncode == 0, insp.stderr.decode()[-3000:]
        info = json.loads(insp.stdout.decode().strip().splitlines()[-1])
        assert info["snapshot_id"] == sid and info["source_shards"] == 2
        assert sum(info["spread"]["user"]) == info["tables"]["user"]["keys"]
        ck = load_checkpoint(path)
        assert ck.snapshot_id == sid
        for i in range(2):
            assert state_digest(ck.shard_state(i)) == expected[sid][i]
        new_ports = [free_port() for _ in range(3)]
        for i in range(3):
            cluster.spawn(i, f"ps3-{i}", _ps_cmd(cluster, i, 3, i, new_ports[i]) + [
                "--job", f"{JOB}3"], ready=True)
        new_addrs = [f"127.0.0.1:{p}" for p in new_ports]
        res = subprocess.run([sys.executable, "-m", "monolith_py.cli", "checkpoint", "restore",
                              path, "--num-shards", "3", "--ps", ",".join(new_addrs)],
                             capture_output=True, timeout=300)
        assert res.returncode == 0, res.stderr.decode()[-3000:]
        assert json.loads(res.stdout.decode().strip().splitlines()[-1])["event"] == "restored"
        for i, a in enumerate(new_addrs):
            c = ParticipantClient(f"ps/{i}", a)
            assert c.digest() == state_digest(ck.shard_state(i, 3))
            c.close()
        # the 3-shard job serves the same rows as the 2-shard reference
        keys = np.unique(np.random.default_rng(5).integers(0, 5000, 3000).astype(np.int64))
        c3 = PSClient(new_addrs, d.tables, ClientOptions(async_push=False))
        for t in d.tables:
            got = c3.lookup({t.name: torch.from_numpy(keys)}, train=False)[t.name]
            want = d.ref.lookup({t.name: torch.from_numpy(keys)}, train=False)[t.name]
            assert torch.equal(got, want)
        assert set(shard_of(keys, 3).tolist()) == {0, 1, 2}
        c3.close()
        coord.close()
        trainer.close()
        d.client.close()
        for p in pss:
            p.close()


def test_reshard_4_to_3_and_2_to_5_in_process() -> None:
    """N -> M through the universal form, bit for bit per key (no processes needed)."""
    from monolith_py.snapshot.checkpoint import UniversalState, merge_shard_states

    tables = _tables()
    for n, m in ((4, 3), (2, 5)):
        src = ShardedBackend.build(tables, n)
        rng = np.random.default_rng(n * 10 + m)
        for step in range(6):
            keys = {t.name: torch.from_numpy(np.unique(rng.integers(0, 3000, 300).astype(np.int64)))
                    for t in tables}
            src.lookup(keys, train=True)
            src.apply_gradients({k: (v, torch.ones(v.shape[0], 4)) for k, v in keys.items()},
                                10 + step)
        states = [s.state_dict() for s in src.shards]
        uni = UniversalState(1, 6, "j", merge_shard_states(states), {})
        dst = ShardedBackend.build(tables, m)
        for i, s in enumerate(dst.shards):
            s.load_state_dict(uni.shard_state(i, m))
        assert_states_equal(
            {k: {a: v for a, v in t.items() if a not in ("sources", "meta")}
             for k, t in merge_shard_states([s.state_dict() for s in dst.shards]).items()},
            {k: {a: v for a, v in t.items() if a not in ("sources", "meta")}
             for k, t in uni.tables.items()})
        probe = {t.name: torch.arange(0, 3000) for t in tables}
        got, want = dst.lookup(probe, train=False), src.lookup(probe, train=False)
        for name in got:
            assert torch.equal(got[name], want[name])
