"""The snapshot pipeline in one process: cut, seal, retention, compaction, recovery policy
(local -> erasure decode -> older snapshot -> disk), corrupt blocks, truncated manifests,
universal checkpoints and N -> M resharding."""

from __future__ import annotations

import copy
import time
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from monolith_py.errors import DecodeError, NoValidSnapshotError
from monolith_py.ps import PSShard
from monolith_py.ps.routing import shard_of
from monolith_py.snapshot.checkpoint import (
    find_checkpoints,
    load_checkpoint,
    merge_shard_states,
    write_checkpoint,
)
from monolith_py.snapshot.coordinator import SnapshotCoordinator
from monolith_py.snapshot.manifest import Manifest
from monolith_py.snapshot.participant import PSParticipant, TrainerParticipant
from monolith_py.snapshot.recovery import Recovery
from monolith_py.table import OptimizerConfig, TableConfig
from monolith_py.testing.smpgroup import LocalGroup
from monolith_py.testing.state import assert_states_equal

TABLES = [
    TableConfig("user", dim=4, optimizer=OptimizerConfig("adagrad", lr=0.1), admit_threshold=2,
                filter_memory_bytes=2048, ttl_seconds=40, initial_capacity=16),
    TableConfig("item", dim=3, optimizer=OptimizerConfig("rowwise_adagrad", lr=0.05),
                initial_capacity=16),
]


class Job:
    """Two PS shards (hosts 0 and 1) and one trainer (host 2) on a LocalGroup."""

    def __init__(self, group: LocalGroup, ckpt_dir: str | None = None, seed: int = 0) -> None:
        self.group = group
        self.rng = np.random.default_rng(seed)
        self.shards = [PSShard(i, 2, TABLES) for i in range(2)]
        self.parts = [PSParticipant(s, group.source(i), i, group=group.sources(), job="test",
                                    checkpoint_dir=ckpt_dir) for i, s in enumerate(self.shards)]
        torch.manual_seed(seed)
        self.model = torch.nn.Linear(3, 2)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=0.01)
        self.counter = 0
        self.trainer = TrainerParticipant("trainer/0", group.source(2), 2, self.state,
                                          self.load, group=group.sources(), job="test",
                                          checkpoint_dir=ckpt_dir)
        self.coord = SnapshotCoordinator("test", group.sources(), [*self.parts, self.trainer],
                                         checkpoint_dir=ckpt_dir, timeout_s=30.0,
                                         info={"num_shards": 2})
        self.now = 1000
        self.expected: dict[int, dict[str, Any]] = {}

    def state(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "opt": self.opt.state_dict(),
                "counter": self.counter, "rng": torch.get_rng_state()}

    def load(self, st: Any) -> None:
        self.model.load_state_dict(st["model"])
        self.opt.load_state_dict(st["opt"])
        self.counter = st["counter"]
        torch.set_rng_state(st["rng"])

    def train(self, steps: int = 3) -> None:
        for _ in range(steps):
            self.now += int(self.rng.integers(1, 15))
            for cfg in TABLES:
                keys = np.unique(self.rng.zipf(1.4, 60).astype(np.int64) % 500)
                owner = shard_of(keys, 2)
                for i, shard in enumerate(self.shards):
                    k = keys[owner == i]
                    shard.pull(cfg.name, k, train=True)
                    shard.push(cfg.name, k, self.rng.standard_normal(
                        (k.shape[0], cfg.dim)).astype(np.float32), self.now)
            if self.rng.random() < 0.3:
                for s in self.shards:
                    s.evict_expired(self.now)
            self.model(torch.randn(4, 3)).sum().backward()
            self.opt.step()
            self.counter += 1

    def snapshot(self) -> int:
        man = self.coord.snapshot(self.counter)
        self.expected[man.snapshot_id] = {
            "ps/0": self.shards[0].state_dict(), "ps/1": self.shards[1].state_dict(),
            "trainer/0": copy.deepcopy(self.state())}
        return man.snapshot_id

    def close(self) -> None:
        self.coord.close()
        for p in [*self.parts, self.trainer]:
            p.close()


@pytest.fixture
def group(tmp_path: Any) -> Iterator[LocalGroup]:
    g = LocalGroup(3, k=2, m=3, root=str(tmp_path / "shm"), job="test", keep=2)
    yield g
    g.close()


def _restore(group: LocalGroup, who: str, host: int, sid: int | None = None,
             ckpt: str | None = None) -> Any:
    rec = Recovery(group.sources(), host, job="test", checkpoint_dir=ckpt)
    try:
        return rec.restore(who, sid)
    finally:
        rec.close()


def _restore_staged(group: LocalGroup, who: str, host: int, sid: int | None = None) -> Any:
    """As a restarted PS restores: composed into a new shard's tables (rows of remote
    parts streamed into them); ``state`` is then that shard's state_dict."""
    if not who.startswith("ps/"):
        return _restore(group, who, host, sid)
    fresh = PSShard(int(who.split("/")[1]), 2, TABLES)
    rec = Recovery(group.sources(), host, job="test", stream_min_bytes=0)
    try:
        r = rec.restore(who, sid, stage=lambda t, n: fresh.tables[t].staged_state(n))
    finally:
        rec.close()
    fresh.load_state_dict(r.state)
    r.state = fresh.state_dict()
    return r


@pytest.fixture(params=["buffered", "staged"])
def restore(request: Any) -> Any:
    return _restore if request.param == "buffered" else _restore_staged


def test_local_then_erasure_decode_after_host_loss(group: LocalGroup, restore: Any) -> None:
    job = Job(group)
    for _ in range(4):
        job.train()
        last = job.snapshot()
    assert [job.coord.last_sealed.parts[p].kind for p in ("ps/0", "trainer/0")] == ["inc", "full"]
    r = restore(group, "ps/0", 0)
    assert r.snapshot_id == last and any("local SMP copy" in s for s in r.log)
    assert_states_equal(r.state, job.expected[last]["ps/0"])
    group.kill(0)                # the whole host and its memory
    group.restart(0)             # comes back empty
    r = restore(group, "ps/0", 0)
    assert r.snapshot_id == last and any("data blocks read from hosts 1, 2" in s for s in r.log)
    if restore is _restore_staged:  # every part of the chain streamed into the tables
        streamed = [s for s in r.log if "rows stream into the tables" in s]
        assert len(streamed) == len(job.coord.last_sealed.chain("ps/0")) > 1
    assert_states_equal(r.state, job.expected[last]["ps/0"])
    t = restore(group, "trainer/0", 2)
    assert_states_equal(t.state, job.expected[last]["trainer/0"])
    # a restored participant loads the state and continues with a full part
    job.parts[0].shard.load_state_dict(PSShard(0, 2, TABLES).state_dict())
    job.parts[0].restore()
    assert_states_equal(job.shards[0].state_dict(), job.expected[last]["ps/0"])
    job.train()
    job.snapshot()
    assert job.coord.last_sealed.parts["ps/0"].kind == "full"
    assert job.coord.last_sealed.parts["ps/1"].kind == "inc"
    job.close()


def test_restarted_smp_repairs_its_share(group: LocalGroup) -> None:
    job = Job(group)
    job.train()
    job.snapshot()
    job.train()
    last = job.snapshot()
    group.kill(0)
    group.restart(0)
    done = group.store(0).repair({h: group.source(h) for h in (1, 2)})
    assert done["parts"] >= 1 and done["blocks"] >= 1 and done["failed"] == 0
    assert last in group.store(0).stats()["manifests"]
    group.kill(1)  # a second loss is survivable only because host 0 rebuilt its share
    for who, host in (("ps/0", 0), ("ps/1", 1), ("trainer/0", 2)):
        r = _restore(group, who, host)
        assert r.snapshot_id == last
        assert_states_equal(r.state, job.expected[last][who])
    job.close()


def test_corrupt_copies_are_excluded_and_older_snapshot_used(group: LocalGroup, restore: Any) -> None:
    job = Job(group)
    job.train()
    first = job.snapshot()
    job.train()
    last = job.snapshot()
    rec = job.coord.last_sealed.parts["ps/0"]
    assert rec.placement == (1, 2, 0)  # data blocks on the next hosts, parity at home
    group.flip_part(0, rec.key, byte=rec.size // 4)   # the home copy
    r = restore(group, "ps/0", 0)
    assert any("local copy corrupt" in s for s in r.log)
    assert r.snapshot_id == last
    assert_states_equal(r.state, job.expected[last]["ps/0"])
    # a flipped data block on host 1 is excluded; the parity kept at home rebuilds it
    group.flip_block(1, (*rec.key, 0), byte=7)
    r = restore(group, "ps/0", 0)
    assert any("block 0 on host 1 corrupt" in s for s in r.log)
    assert r.snapshot_id == last
    assert_states_equal(r.state, job.expected[last]["ps/0"])
    # the parity flipped too leaves one good block: not enough for k=2, so the newest
    # snapshot is skipped (with its reasons) and the previous one is restored
    group.flip_block(0, (*rec.key, 2), byte=7)
    r = restore(group, "ps/0", 0)
    assert r.snapshot_id == first
    assert any("block 2 on host 0 corrupt: excluded" in s for s in r.log)
    assert_states_equal(r.state, job.expected[first]["ps/0"])
    job.close()


@pytest.mark.parametrize("flip", [[1], [0, 2]])  # a data block; a data and a parity block
def test_flipped_block_rebuilt_from_parity(tmp_path: Any, flip: list[int], restore: Any) -> None:
    g = LocalGroup(5, k=2, m=4, root=str(tmp_path / "shm"), job="test")
    try:
        job = Job(g)
        job.train()
        sid = job.snapshot()
        rec = job.coord.last_sealed.parts["ps/0"]
        assert rec.placement == (1, 2, 3, 4)  # a group larger than m: no block at home
        g.kill(0)
        for i in flip:
            g.flip_block(rec.placement[i], (*rec.key, i), byte=3)
        r = restore(g, "ps/0", 0)
        if restore is _restore_staged:  # the stream (or its first read: block 0 holds the
            # frame's header) found the corrupt block; the blocks were then decoded
            assert any("streaming the rows failed" in s or "sparse read failed" in s
                       for s in r.log)
        assert r.snapshot_id == sid
        for i in flip:
            assert any(f"block {i} on host {rec.placement[i]} corrupt" in s for s in r.log)
        assert_states_equal(r.state, job.expected[sid]["ps/0"])
        job.close()
    finally:
        g.close()


def test_truncated_manifest_and_unsealed_snapshots_are_never_used(group: LocalGroup) -> None:
    job = Job(group)
    job.train()
    sealed = job.snapshot()
    job.train()
    cut = job.coord.cut(job.counter)          # captured and placed, but never sealed
    for p in job.parts:
        p.wait_shipped()
    job.trainer.wait_shipped()
    group.drain()
    assert _restore(group, "ps/1", 1).snapshot_id == sealed
    # a truncated manifest is rejected by the SMP and skipped by recovery, even though the
    # parts it names are all there
    raw = job.coord.last_sealed.encode()
    with pytest.raises(DecodeError):
        group.store(0).seal(raw[: len(raw) - 9])
    homes = {"ps/0": 0, "ps/1": 1, "trainer/0": 2}
    parts = {p: group.store(h).wait_part(p, cut.snapshot_id, cut.captured[p]["kind"], 5.0)
             for p, h in homes.items()}
    chains = {p: job.coord.last_sealed.chain(p) for p, r in parts.items() if r.kind == "inc"}
    whole = Manifest("test", cut.snapshot_id, cut.step, parts, chains=chains).encode()
    for h in range(3):
        group.store(h)._manifests[cut.snapshot_id] = (Manifest.decode(whole), whole[:-40])
    r = _restore(group, "ps/1", 1)
    assert r.snapshot_id == sealed and any("manifest skipped" in s for s in r.log)
    for h in range(3):  # the same manifest intact is restorable: only the truncation was wrong
        group.store(h)._manifests[cut.snapshot_id] = (Manifest.decode(whole), whole)
    assert _restore(group, "ps/1", 1).snapshot_id == cut.snapshot_id
    job.close()


def test_retention_and_compaction_bound_memory(tmp_path: Any) -> None:
    g = LocalGroup(3, k=2, m=3, root=str(tmp_path / "shm"), job="test", keep=2, full_every=2)
    try:
        job = Job(g)
        for _ in range(7):
            job.train(2)
            last = job.snapshot()
            g.drain()
        stats = [g.store(h).stats() for h in range(3)]
        assert all(len(s["manifests"]) <= 4 for s in stats), stats
        assert sum(s["records"] for s in stats) > 0  # composed full parts were recorded
        r = _restore(g, "ps/0", 0)
        assert_states_equal(r.state, job.expected[last]["ps/0"])
        before = r.snapshot_id
        g.kill(0)
        g.restart(0)
        r = _restore(g, "ps/0", 0)
        assert r.snapshot_id == before
        assert_states_equal(r.state, job.expected[last]["ps/0"])
        job.close()
    finally:
        g.close()


def test_smps_in_repair_mode_do_not_rebuild_chains_compaction_freed(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """An SMP started with repair rebuilds after each seal what the manifest places on it
    but it lacks. The parts of a chain that a composed full part replaced are listed by
    the manifest but freed on purpose: rebuilding them (from the peers, every seal) once
    cost the SMPs several CPU seconds per snapshot."""
    from monolith_py.snapshot import maintenance

    rebuilt: list[Any] = []
    real = maintenance._rebuild

    def spy(store: Any, rec: Any, records: list[Any], done: dict[str, int]) -> None:
        rebuilt.extend(r.key for r in records)
        real(store, rec, records, done)

    monkeypatch.setattr(maintenance, "_rebuild", spy)
    g = LocalGroup(3, k=2, m=3, root=str(tmp_path / "shm"), job="test", keep=1, full_every=2)
    try:
        for h in range(3):
            g.store(h).start_repair({p: g.source(p) for p in range(3) if p != h})
        job = Job(g)
        for _ in range(7):
            job.train(2)
            last = job.snapshot()
            g.drain()
        assert sum(g.store(h).stats()["records"] for h in range(3)) > 0  # compactions ran
        assert rebuilt == []
        r = _restore(g, "ps/0", 0)
        assert_states_equal(r.state, job.expected[last]["ps/0"])
        job.close()
    finally:
        g.close()


def test_disk_checkpoint_fallback_and_resharding(group: LocalGroup, tmp_path: Any) -> None:
    ckpt_dir = str(tmp_path / "ckpt")
    job = Job(group, ckpt_dir=ckpt_dir)
    job.train()
    sid = job.snapshot()
    path = job.coord.checkpoint()
    assert find_checkpoints(ckpt_dir) == [path]
    assert not [n for n in os.listdir(ckpt_dir) if n.startswith(".tmp")]
    ck = load_checkpoint(path)
    assert ck.snapshot_id == sid and ck.num_shards == 2
    # same shard count: every per-shard scalar and array comes back exactly
    for i in range(2):
        assert_states_equal(ck.shard_state(i), job.expected[sid][f"ps/{i}"])
    assert_states_equal(ck.trainer_state(0)[0], job.expected[sid]["trainer/0"])
    original = merge_shard_states([job.expected[sid]["ps/0"], job.expected[sid]["ps/1"]])
    for m in (1, 3, 5):
        states = [ck.shard_state(i, m) for i in range(m)]
        for i, st in enumerate(states):
            PSShard(i, m, TABLES).load_state_dict(st)  # validated: owned keys, shapes
            for t in st["tables"].values():
                assert (shard_of(t["keys"], m) == i).all()
        merged = merge_shard_states(states)
        for name, t in original.items():
            for a in ("keys", "weights", "last_update", "update_count", "row_version",
                      *[k for k in t if k.startswith("slot.")]):
                assert np.array_equal(merged[name][a], t[a]), (m, name, a)
    # everything in memory lost: the disk checkpoint is the last resort
    for h in range(3):
        group.kill(h)
    with pytest.raises(NoValidSnapshotError, match="host 0"):
        _restore(group, "ps/0", 0)
    r = _restore(group, "ps/0", 0, ckpt=ckpt_dir)
    assert r.source == "disk"
    assert_states_equal(r.state, job.expected[sid]["ps/0"])
    job.close()


def test_partial_seal_never_frees_parts_a_newer_chain_needs(group: LocalGroup) -> None:
    job = Job(group)
    for _ in range(3):
        job.train()
        job.snapshot()
    mid = job.coord.last_sealed.snapshot_id - 1
    for h in (0, 1):  # the seal of `mid` never reached hosts 0 and 1
        del group.store(h)._manifests[mid]
    job.train()
    last = job.snapshot()
    assert job.coord.last_sealed.parts["ps/0"].kind == "inc"
    assert len(job.coord.last_sealed.chain("ps/0")) == 4  # self-contained: full + 3 incs
    group.drain()
    group.kill(2)  # hosts 0 and 1 must still hold every part of the chain
    for who, host in (("ps/0", 0), ("ps/1", 1)):
        r = _restore(group, who, host)
        assert r.snapshot_id == last
        assert_states_equal(r.state, job.expected[last][who])
    job.close()


def test_manifest_chains_restart_at_composed_full_parts(tmp_path: Any) -> None:
    g = LocalGroup(3, k=2, m=3, root=str(tmp_path / "shm"), job="test", keep=2, full_every=4)
    try:
        job = Job(g)
        for _ in range(24):
            job.train(1)
            last = job.snapshot()
            g.drain()
        chain = job.coord.last_sealed.chain("ps/0")
        assert len(chain) <= 17 and chain[0].kind == "full" and chain[0].snapshot_id > 0
        r = _restore(g, "ps/0", 0)
        assert r.snapshot_id == last
        assert_states_equal(r.state, job.expected[last]["ps/0"])
        job.close()
    finally:
        g.close()


def _leasing_participant(group: LocalGroup) -> tuple[PSParticipant, Any]:
    """A participant on host 0 of a one-table shard, and ``touch(keys)``: a training step
    on those keys (each changes their rows, so they go into the next increment)."""
    shard = PSShard(0, 1, [TableConfig("t", dim=16, optimizer=OptimizerConfig("adagrad"),
                                       initial_capacity=1 << 16)])
    part = PSParticipant(shard, group.source(0), 0, group=group.sources(), job="test")

    def touch(keys: np.ndarray) -> None:
        shard.pull("t", keys, train=True)
        shard.push("t", keys, np.ones((keys.shape[0], 16), np.float32), now=1)

    return part, touch


def test_lease_grows_when_a_pause_makes_the_next_increment_larger(group: LocalGroup) -> None:
    part, touch = _leasing_participant(group)
    try:
        touch(np.arange(200))
        for sid in range(1, 4):  # a full part, then two small increments
            touch(np.arange(sid * 10))
            part.capture(sid, sid, sid - 1 if sid > 1 else None)
            part.wait_shipped()
        part._renew_pending()  # the lease the shipper takes 0.4 intervals after a capture
        lease = part._lease
        now = time.monotonic()
        part._captured_at = [now - 3.0, now - 2.0, now - 1.0]  # next capture due in 0.25 s
        assert 0 < part._watch_lease() <= 0.25
        assert part._lease is lease                            # not looked at yet
        touch(np.arange(40_000))                               # a long pause's increment
        est = part.capturer.estimate_inc_bytes(3)
        assert est is not None and est > int(lease["capacity"])
        part._captured_at = [now - 40.0, now - 30.0, now - 20.0]  # overdue
        assert part._watch_lease() == 5.0                      # look again in half a gap
        assert int(part._lease["capacity"]) >= 1.25 * est
        info = part.capture(4, 4, 3)
        assert info["kind"] == "inc" and info["leased"], info
        assert 0.8 * est <= info["nbytes"] <= est
        part.wait_shipped()
        part._renew_pending()
        after = part._lease    # sized on the last increment taken on time, not this one
        assert after is not None and int(after["capacity"]) < info["nbytes"]
        part._captured_at = [now - 40.0, now - 30.0, now - 20.0]
        part._watch_lease()                                    # nothing changed since
        assert part._lease is after
    finally:
        part.close()


def test_an_early_snapshot_does_not_shrink_the_next_lease(group: LocalGroup) -> None:
    """An on-demand snapshot taken between two scheduled ones is small; the lease after it
    stays sized for the next scheduled increment (else that one misses its lease and is
    copied into new memory while training is blocked)."""
    part, touch = _leasing_participant(group)
    try:
        touch(np.arange(40_000))
        for sid in range(1, 4):  # a full part, then increments of 40 000 rows
            touch(np.arange(40_000))
            part.capture(sid, sid, sid - 1 if sid > 1 else None)
            part.wait_shipped()
        now = time.monotonic()
        part._captured_at = [now - 30.0, now - 20.0, now - 10.0]   # this one is on time
        touch(np.arange(40_000))
        steady = part.capture(4, 4, 3)["nbytes"]
        part.wait_shipped()
        part._renew_pending()
        assert int(part._lease["capacity"]) >= 1.5 * steady
        now = time.monotonic()
        part._captured_at = [now - 30.0, now - 20.0, now - 10.0, now - 1.0]  # 1 s after
        touch(np.arange(10))
        early = part.capture(5, 5, 4)
        assert early["kind"] == "inc" and early["nbytes"] < steady / 10
        part.wait_shipped()
        part._renew_pending()
        assert int(part._lease["capacity"]) >= 1.5 * steady    # not sized on the early one
        touch(np.arange(40_000))
        assert part.capture(6, 6, 5)["leased"]                  # the next one fits
    finally:
        part.close()


def test_the_next_lease_is_taken_after_the_seal_not_at_the_commit(group: LocalGroup) -> None:
    """Once the interval between captures is known, the lease for the next part is taken
    0.4 intervals after a capture (by then the seal has freed what the retained snapshots
    no longer need), not when the part is committed; a capture that comes sooner takes it
    first and still writes into a lease."""
    part, touch = _leasing_participant(group)
    try:
        for sid in range(1, 3):  # interval unknown: each lease is taken at the commit
            touch(np.arange(1000))
            part.capture(sid, sid, sid - 1 if sid > 1 else None)
            part.wait_shipped()
            assert part._renew_due is None and part._lease is not None
        touch(np.arange(1000))
        part.capture(3, 3, 2)
        part.wait_shipped()
        now = time.monotonic()
        part._captured_at = [now - 300.0, now - 200.0, now - 100.0]  # a 100 s interval
        touch(np.arange(1000))
        info = part.capture(4, 4, 3)
        assert info["leased"]
        part.wait_shipped()
        assert part._lease is None and part._renew_due is not None  # not at the commit
        wait = part._watch_lease()
        assert wait is not None and 30.0 < wait <= 40.0        # 0.4 of the interval
        assert part._lease is None
        part._captured_at[-1] -= 40.0                          # the time has come
        part._watch_lease()
        assert part._lease is not None and part._renew_due is None
        lease = part._lease
        part._watch_lease()
        assert part._lease is lease                            # taken once
        part._captured_at = [now - 300.0, now - 200.0, now - 100.0]
        touch(np.arange(1000))
        part.capture(5, 5, 4)
        part.wait_shipped()
        assert part._lease is None and part._renew_due is not None
        touch(np.arange(1000))
        assert part.capture(6, 6, 5)["leased"]                 # an early capture leases first
        part.wait_shipped()
    finally:
        part.close()


def test_a_restarted_job_takes_no_snapshot_id_an_unsealed_run_left(group: LocalGroup) -> None:
    """A run killed between its cut and its seal leaves parts of the next ids on the SMPs.
    The restarted job's coordinator starts above them, so none of its parts shares a key
    with them, and what it seals restores to its own state."""
    first = Job(group)
    first.train()
    first.snapshot()
    first.train()
    cut = first.coord.cut(first.counter)  # placed, never sealed: the run "dies" here
    for p in [*first.parts, first.trainer]:
        p.wait_shipped()
    group.drain()
    first.close()
    assert max(group.store(h).catalog()["newest_id"] for h in range(3)) == cut.snapshot_id
    second = Job(group, seed=1)
    try:
        assert second.coord.next_id == cut.snapshot_id + 1
        second.train(5)
        sid = second.snapshot()
        assert sid > cut.snapshot_id
        for who, host in (("ps/0", 0), ("ps/1", 1), ("trainer/0", 2)):
            r = _restore(group, who, host)
            assert r.snapshot_id == sid
            assert_states_equal(r.state, second.expected[sid][who])
    finally:
        second.close()


def test_wait_part_returns_the_record_of_the_capture_asked_for(group: LocalGroup) -> None:
    """Two parts under one key (a snapshot id taken again): with the capture's token,
    wait_part never answers with the other part's record."""
    from monolith_py.errors import DeadlineExceededError
    from monolith_py.snapshot.trainerpart import encode_trainer_part

    store = group.store(2)
    old = encode_trainer_part({"x": torch.zeros(64)}, "trainer/0", 7, 70, capture="run-a")
    new = encode_trainer_part({"x": torch.ones(64)}, "trainer/0", 7, 70, capture="run-b")
    store.put_part("trainer/0", old)
    first = store.wait_part("trainer/0", 7, "full", 30.0)
    assert store.wait_part("trainer/0", 7, "full", 30.0, capture="run-a") == first
    with pytest.raises(DeadlineExceededError):  # run-b's part has not arrived
        store.wait_part("trainer/0", 7, "full", 0.3, capture="run-b")
    store.put_part("trainer/0", new)
    rec = store.wait_part("trainer/0", 7, "full", 30.0, capture="run-b")
    assert rec.crc != first.crc and rec.size == len(new)
    group.drain()  # the replaced part's segment is given back after its own coding
    with pytest.raises(DecodeError):  # a token that is not a short string is refused
        store.put_part("trainer/0", encode_trainer_part({"x": torch.ones(4)}, "trainer/0", 8, 80,
                                                        capture="z" * 65))


@pytest.mark.parametrize("k,m", [(2, 3), (3, 4)])
def test_a_records_crc_is_the_parts_for_any_size_and_stripe_cut(tmp_path: Any, k: int,
                                                                m: int) -> None:
    """The coder combines the part's crc from its data blocks' crcs; the block padding
    may end inside a stripe, at a stripe's start, or not exist."""
    import crc32c

    from monolith_py.snapshot.trainerpart import encode_trainer_part

    chunk = 4096
    g = LocalGroup(m, k=k, m=m, root=str(tmp_path / "shm"), job="test", chunk_bytes=chunk)

    def part_of(size: int, sid: int) -> bytes:
        n = size
        for _ in range(8):  # the header's length depends on the array's
            frame = encode_trainer_part({"x": torch.ones(max(n, 0), dtype=torch.uint8)},
                                        "trainer/0", sid, sid)
            if len(frame) == size:
                return frame
            n += size - len(frame)
        raise AssertionError(f"no part of {size} bytes")

    # whole blocks; padding ending inside the last stripe; padding alone in a stripe
    sizes = [k * 4 * chunk, k * 4 * chunk - 1, k * (2 * chunk + 1) - 1, 3 * chunk + 5,
             k * 2 * chunk + 1, 10_001, 65_537]
    try:
        store = g.store(0)
        for sid, size in enumerate(sizes, start=1):
            frame = part_of(size, sid)
            store.put_part("trainer/0", frame)
            rec = store.wait_part("trainer/0", sid, "full", 30.0)
            assert rec.size == size and rec.crc == crc32c.crc32c(frame), size
    finally:
        g.close()
