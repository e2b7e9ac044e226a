"""PS parts: full and incremental capture, composition, equality with state_dict()."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from monolith_py.errors import CorruptDataError, DecodeError
from monolith_py.ps import PSShard
from monolith_py.ps.routing import shard_of
from monolith_py.snapshot import _gather
from monolith_py.snapshot.pspart import (
    ShardCapturer,
    apply_increment,
    decode_part,
    encode_shard_state,
    shard_state,
)
from monolith_py.table import OptimizerConfig, TableConfig
from monolith_py.testing.state import assert_states_equal

TABLES = [
    TableConfig("user", dim=4, optimizer=OptimizerConfig("adagrad", lr=0.1), admit_threshold=2,
                filter_memory_bytes=4096, ttl_seconds=50, initial_capacity=8),
    TableConfig("item", dim=3, optimizer=OptimizerConfig("adam", lr=0.01), initial_capacity=8),
    TableConfig("ctx", dim=2, optimizer=OptimizerConfig("sgd", lr=0.5), initial_capacity=8),
]


def _step(shard: PSShard, rng: np.random.Generator, now: int) -> None:
    for cfg in TABLES:
        keys = np.unique(rng.zipf(1.3, 40).astype(np.int64) % 300)
        keys = keys[shard_of(keys, shard.num_shards) == shard.shard_id]
        shard.pull(cfg.name, keys, train=True)
        grads = rng.standard_normal((keys.shape[0], cfg.dim)).astype(np.float32)
        shard.push(cfg.name, keys, grads, now)
    if rng.random() < 0.15:
        shard.evict_expired(now)
    if rng.random() < 0.15:
        with shard.lock:
            t = shard.tables["item"]
            t.erase(rng.integers(0, 300, 10).astype(np.int64))


def _growing_chain(shard: PSShard, rng: np.random.Generator, increments: int
                   ) -> Iterator[list[Any]]:
    """A full part of ``shard`` after a few training steps, then ``increments`` increments
    (1-4 steps before each): yields the decoded chain after each increment."""
    cap = ShardCapturer(shard)
    now = 1
    for _ in range(4):
        _step(shard, rng, now)
        now += 3
    chain = [decode_part(cap.capture(1, 1, None).frame())]
    for sid in range(2, increments + 2):
        for _ in range(int(rng.integers(1, 5))):
            _step(shard, rng, now)
            now += int(rng.integers(1, 20))
        chain.append(decode_part(cap.capture(sid, sid, base_id=sid - 1).frame()))
        yield chain


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_chain_of_increments_equals_state_dict(seed: int) -> None:
    rng = np.random.default_rng(seed)
    shard = PSShard(1, 2, TABLES)
    cap = ShardCapturer(shard)
    composed: dict[int, dict] = {}
    sid, now = 0, 1000
    base: int | None = None
    kinds = []
    for round_ in range(12):
        for _ in range(int(rng.integers(1, 6))):
            now += int(rng.integers(1, 20))
            _step(shard, rng, now)
        sid += 1
        part = cap.capture(sid, step=round_, base_id=base)
        expected = shard.state_dict()
        dec = decode_part(part.frame())
        if part.kind == "full":
            state = shard_state(dec)
        else:
            assert dec.base_id == base
            state = apply_increment(composed[base], dec)  # type: ignore[index]
        assert_states_equal(state, expected, f"snapshot {sid} ({part.kind})")
        composed[sid] = state
        kinds.append(part.kind)
        # next base: usually the previous one, sometimes an older one or none (full)
        r = rng.random()
        base = sid if r < 0.7 else (max(sid - 2, 1) if r < 0.9 else None)
    assert kinds.count("inc") >= 6 and kinds[0] == "full"
    assert shard.stats()["item"]["erased"] > 0 and shard.stats()["user"]["evicted"] > 0


def test_increment_is_small_and_matches_changes_since() -> None:
    shard = PSShard(0, 1, TABLES)
    rng = np.random.default_rng(5)
    for i in range(20):
        _step(shard, rng, 100 + i)
    cap = ShardCapturer(shard)
    full = cap.capture(1, 1, None)
    versions = {n: t.version for n, t in shard.tables.items()}
    shard.push("item", np.array([7, 8], np.int64), np.ones((2, 3), np.float32), 200)
    inc = cap.capture(2, 2, base_id=1)
    assert inc.kind == "inc" and inc.rows < full.rows and inc.nbytes < full.nbytes
    dec = decode_part(inc.frame())
    for name, t in shard.tables.items():
        delta = t.changes_since(versions[name], include_state=True)
        tp = dec.tables[name]
        order = np.argsort(tp.meta[:, 0])
        assert np.array_equal(tp.meta[order, 0], delta.keys)
        assert np.array_equal(tp.weights[order], delta.rows)
        assert np.array_equal(tp.meta[order, 1], delta.last_update)
        assert np.array_equal(tp.meta[order, 2], delta.update_count)
        for s, arr in (delta.slots or {}).items():
            assert np.array_equal(tp.slots[s][order], arr)


def test_fallback_full_part_when_layout_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    shard = PSShard(0, 1, TABLES)
    rng = np.random.default_rng(7)
    for i in range(5):
        _step(shard, rng, 10 + i)
    monkeypatch.setattr(_gather, "arena_of", lambda table: None)
    cap = ShardCapturer(shard)
    part = cap.capture(3, 3, base_id=None)
    assert part.kind == "full"
    assert_states_equal(shard_state(decode_part(part.frame())), shard.state_dict())


def test_capture_into_leased_buffer_and_reencode_sorted() -> None:
    shard = PSShard(0, 1, TABLES)
    rng = np.random.default_rng(3)
    for i in range(5):
        _step(shard, rng, 10 + i)
    bufs = []

    def alloc(n: int) -> bytearray:
        bufs.append(bytearray(n + 100))
        return bufs[-1]

    part = ShardCapturer(shard).capture(1, 1, None, alloc=alloc)
    assert part.buffer is bufs[0]
    state = shard_state(decode_part(part.frame()))
    again = encode_shard_state(state, 1, 1)
    assert_states_equal(shard_state(decode_part(again)), shard.state_dict())


def test_broken_chain_and_corrupt_parts_are_detected() -> None:
    shard = PSShard(0, 1, TABLES)
    rng = np.random.default_rng(11)
    cap = ShardCapturer(shard)
    _step(shard, rng, 1)
    full1 = decode_part(cap.capture(1, 1, None).frame())
    for i in range(3):
        _step(shard, rng, 2 + i)
    cap.capture(2, 2, base_id=1)
    for i in range(3):
        _step(shard, rng, 10 + i)
    inc3 = decode_part(cap.capture(3, 3, base_id=2).frame())
    # applying the increment against the wrong base (1 instead of 2) must not pass silently
    with pytest.raises(CorruptDataError):
        apply_increment(shard_state(full1), inc3)
    with pytest.raises(CorruptDataError):
        shard_state(inc3)
    frame = bytearray(cap.capture(4, 4, None).frame())
    frame[len(frame) // 2] ^= 0x10
    with pytest.raises(DecodeError):
        decode_part(frame)
    with pytest.raises(DecodeError):
        decode_part(bytes(frame[: len(frame) // 3]))


@pytest.mark.parametrize("seed", [3, 4])
def test_long_chains_compose_in_one_pass(seed: int) -> None:
    import dataclasses

    from monolith_py.snapshot.compose import compose

    shard = PSShard(0, 1, TABLES)
    for chain in _growing_chain(shard, np.random.default_rng(seed), 9):
        assert_states_equal(compose(chain), shard.state_dict(), f"chain of {len(chain)}")
    # a live key whose row every part lost: found in no part of the chain
    lost = int(chain[-1].tables["user"].live[0])

    def without(p: Any) -> Any:
        t = p.tables["user"]
        ok = t.meta[:, 0] != lost
        t = dataclasses.replace(t, meta=t.meta[ok], weights=t.weights[ok],
                                slots={s: a[ok] for s, a in t.slots.items()},
                                size=int(ok.sum()))
        return dataclasses.replace(p, tables={**p.tables, "user": t})

    with pytest.raises(CorruptDataError, match="1 live keys are in no part of the chain"):
        compose([without(p) for p in chain])
    # the newest increment holds a row its live list does not: a wrong live list
    t = chain[-1].tables["item"]
    assert t.live is not None and t.meta.shape[0] > 0
    wrong = dataclasses.replace(t, live=np.setdiff1d(t.live, t.meta[:1, 0]))
    with pytest.raises(CorruptDataError, match="not live"):
        compose([*chain[:-1], dataclasses.replace(chain[-1],
                                                  tables={**chain[-1].tables, "item": wrong})])


def test_deferred_parts_are_planned_not_gathered() -> None:
    """A restore from peers composes without the row arrays of some parts: their rows are
    described in the plan (source rows increasing), and writing them as planned gives the
    same state as composing everything."""
    from monolith_py.snapshot.compose import compose

    *_, chain = _growing_chain(PSShard(0, 1, TABLES), np.random.default_rng(7), 6)
    whole = compose(chain)
    deferred = {0, 2, 5}
    plan: dict[Any, Any] = {}
    state = compose(chain, deferred=deferred, plan=plan)
    assert {j for _, j in plan} <= deferred and plan
    for (table, j), (src, dest, weights, slots) in plan.items():
        assert (np.diff(src) > 0).all()
        part = chain[j].tables[table]
        weights[dest] = part.weights[src]
        for s, out in slots.items():
            out[dest] = part.slots[s][src]
    assert_states_equal(state, whole, "deferred parts written from the plan")


@pytest.mark.parametrize("n,lo,hi", [(0, 0, 1), (1, -5, 5), (5000, -(2**63), 2**63 - 1),
                                      (70000, 0, 1 << 22), (70000, -3, 3),
                                      (3000, 2**40, 2**40 + 7)])
def test_radix_sort_and_order_equal_numpys(n: int, lo: int, hi: int) -> None:
    """The compose's radix sort gives numpy's sorted keys and its stable order: keys over
    the whole signed range, small ones (skipped digits), many duplicates (stability)."""
    from monolith_py.snapshot.compose import _radix

    keys = np.random.default_rng(n).integers(lo, hi, n, dtype=np.int64, endpoint=True)
    got, order = _radix(keys, True)
    np.testing.assert_array_equal(got, np.sort(keys))
    np.testing.assert_array_equal(order, np.argsort(keys, kind="stable"))
    alone, none = _radix(keys, False)
    np.testing.assert_array_equal(alone, got)
    assert none.shape == (0,)
