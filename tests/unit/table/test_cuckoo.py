"""CuckooHashMap against a dict model (hypothesis state machine) plus edge cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from monolith_py.errors import ConfigError, InvalidInputError, InvalidTypeError
from monolith_py.table import CuckooHashMap

I64_MIN, I64_MAX = -(2**63), 2**63 - 1
MASK = 2**64 - 1
SEED = 0x5EED
M1, M2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _unxorshift(y: int, s: int) -> int:
    x, shift = y, s
    while shift < 64:
        x ^= y >> shift
        shift += s
    return x


def _unmix(h: int) -> int:
    """Inverse of the index's 64-bit mix (splitmix64's finalizer)."""
    h = _unxorshift(h, 32)
    h = (h * pow(M2, -1, 2**64)) & MASK
    h = _unxorshift(h, 29)
    h = (h * pow(M1, -1, 2**64)) & MASK
    return _unxorshift(h, 31)


def _colliding_keys(count: int, shared_bits: int = 12) -> list[int]:
    """Keys whose salted hashes agree in the top ``shared_bits`` of both halves, so they
    share both candidate buckets in every map of up to 2**shared_bits buckets."""
    rng = np.random.default_rng(7)
    hi, lo = 0xABC << 20, 0x123 << 20
    keys = []
    for r in rng.integers(0, 2 ** (32 - shared_bits), size=(count, 2)):
        h = ((hi | int(r[0])) << 32) | (lo | int(r[1]))
        k = _unmix(h) ^ SEED
        keys.append(k - 2**64 if k >= 2**63 else k)
    return keys


COLLIDING = _colliding_keys(24)
EXTREMES = [I64_MIN + 1, I64_MIN + 2, I64_MAX, I64_MAX - 1, -1, 0, 1]
key_st = st.one_of(
    st.sampled_from(COLLIDING),
    st.sampled_from(EXTREMES),
    st.integers(-20, 20),
    st.integers(I64_MIN + 1, I64_MAX),
)
value_st = st.integers(I64_MIN, I64_MAX)


def test_crafted_keys_collide_in_both_buckets() -> None:
    m = CuckooHashMap(4, hash_seed=SEED)
    for nb in (2, 4, 8, 64, 1024):
        pairs = m.bucket_pairs(np.array(COLLIDING), nb)
        assert (pairs == pairs[0]).all(), nb


class MapVsDict(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.m = CuckooHashMap(initial_capacity=4, max_load_factor=0.9, hash_seed=SEED)
        self.d: dict[int, int] = {}

    @rule(data=st.data(), keys=st.lists(key_st, max_size=30))
    def insert_or_assign(self, data: st.DataObject, keys: list[int]) -> None:
        values = data.draw(st.lists(value_st, min_size=len(keys), max_size=len(keys)))
        self.m.insert_or_assign(np.array(keys, dtype=np.int64), np.array(values, dtype=np.int64))
        for k, v in zip(keys, values):
            self.d[k] = v

    @rule(n=st.integers(1, 400), seed=st.integers(0, 2**32 - 1))
    def bulk_insert(self, n: int, seed: int) -> None:
        keys = np.random.default_rng(seed).integers(I64_MIN + 1, I64_MAX, n)
        self.m.insert_or_assign(torch.from_numpy(keys), torch.from_numpy(keys // 3))
        for k in keys.tolist():
            self.d[k] = k // 3

    @rule(data=st.data(), keys=st.lists(key_st, max_size=30))
    def find_or_insert(self, data: st.DataObject, keys: list[int]) -> None:
        values = data.draw(st.lists(value_st, min_size=len(keys), max_size=len(keys)))
        got, inserted = self.m.find_or_insert(
            np.array(keys, dtype=np.int64), np.array(values, dtype=np.int64), return_inserted=True
        )
        for i, (k, v) in enumerate(zip(keys, values)):
            assert inserted[i] == (k not in self.d)
            self.d.setdefault(k, v)
            assert got[i] == self.d[k]

    @rule(keys=st.lists(key_st, max_size=30))
    def erase(self, keys: list[int]) -> None:
        mask = self.m.erase(np.array(keys, dtype=np.int64))
        for i, k in enumerate(keys):
            assert mask[i] == (k in self.d)
            self.d.pop(k, None)

    @rule(data=st.data())
    def erase_existing(self, data: st.DataObject) -> None:
        if self.d:
            keys = data.draw(st.lists(st.sampled_from(sorted(self.d)), max_size=50))
            assert self.m.erase(np.array(keys, dtype=np.int64)).sum() == len(set(keys))
            for k in keys:
                self.d.pop(k, None)

    @rule(keys=st.lists(key_st, max_size=40))
    def find(self, keys: list[int]) -> None:
        got = self.m.find(np.array(keys, dtype=np.int64), default=I64_MIN)
        assert got.tolist() == [self.d.get(k, I64_MIN) for k in keys]

    @precondition(lambda self: len(self.d) > 50)
    @rule()
    def clear(self) -> None:
        self.m.clear()
        self.d.clear()

    @invariant()
    def same_contents(self) -> None:
        assert len(self.m) == len(self.d)
        assert self.m.load_factor <= self.m.max_load_factor + 1e-12
        keys, values = self.m.items()
        assert dict(zip(keys.tolist(), values.tolist())) == self.d


MapVsDict.TestCase.settings = settings(max_examples=60, stateful_step_count=40)
TestMapVsDict = MapVsDict.TestCase


def test_grows_through_many_doublings_and_parallel_find() -> None:
    m = CuckooHashMap(initial_capacity=4)
    keys = np.random.default_rng(0).permutation(np.arange(-100_000, 100_000, dtype=np.int64) * 7919)
    m.insert_or_assign(keys, keys + 1)
    assert len(m) == keys.shape[0] and m.grow_count >= 10
    assert (m.find(keys) == keys + 1).all()  # >= 65536 keys: the parallel kernel
    missing = keys + 1
    absent = missing[np.isin(missing, keys, invert=True)]
    assert (m.find(absent) == -1).all()
    assert m.contains(keys[:1000]).all() and not m.contains(absent[:1000]).any()


def test_high_load_factor_is_reachable() -> None:
    m = CuckooHashMap(initial_capacity=40_000, max_load_factor=0.95)
    cap = m.capacity
    keys = np.random.default_rng(1).integers(I64_MIN + 1, I64_MAX, int(cap * 0.95))
    m.insert_or_assign(keys, np.arange(keys.shape[0]))
    assert m.capacity == cap and m.load_factor >= 0.949
    assert (m.find(keys) == np.arange(keys.shape[0])).all()


def test_reserve_and_memory() -> None:
    m = CuckooHashMap(initial_capacity=8, max_load_factor=0.9)
    m.reserve(10_000)
    cap = m.capacity
    assert cap >= 10_000 / 0.9 and m.memory_bytes == cap * 16
    m.insert_or_assign(np.arange(10_000), np.arange(10_000))
    assert m.capacity == cap


def test_duplicates_apply_in_order() -> None:
    m = CuckooHashMap()
    m.insert_or_assign([5, 5, 6, 5], [1, 2, 3, 4])
    assert m.find([5, 6]).tolist() == [4, 3]
    vals, ins = m.find_or_insert([9, 9, 5], [10, 11, 12], return_inserted=True)
    assert vals.tolist() == [10, 10, 4] and ins.tolist() == [True, False, False]
    assert m.erase([9, 9]).tolist() == [True, False]


def test_reserved_key_and_bad_input_leave_map_unchanged() -> None:
    m = CuckooHashMap()
    m.insert_or_assign([1, 2], [10, 20])
    with pytest.raises(InvalidInputError, match="INT64_MIN"):
        m.insert_or_assign([3, I64_MIN], [1, 2])
    with pytest.raises(InvalidInputError, match="INT64_MIN"):
        m.find([I64_MIN])
    with pytest.raises(InvalidTypeError, match="integer"):
        m.insert_or_assign(np.array([1.5]), [1])
    with pytest.raises(InvalidTypeError, match="integer"):
        m.find(torch.tensor([True]))
    with pytest.raises(InvalidInputError, match="1-D"):
        m.find(np.zeros((2, 2), dtype=np.int64))
    with pytest.raises(InvalidInputError, match="shape"):
        m.insert_or_assign([4, 5], [1, 2, 3])
    with pytest.raises(InvalidTypeError):
        m.find("12")
    assert len(m) == 2 and m.find([1, 2, 3]).tolist() == [10, 20, -1]


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="max_load_factor"):
        CuckooHashMap(max_load_factor=0.99)
    with pytest.raises(ConfigError, match="growth_factor"):
        CuckooHashMap(growth_factor=1.0)
    with pytest.raises(ConfigError, match="initial_capacity"):
        CuckooHashMap(initial_capacity=0)


def test_empty_batches_and_clear() -> None:
    m = CuckooHashMap(initial_capacity=4)
    cap = m.capacity
    assert m.find([]).shape == (0,) and m.erase([]).shape == (0,)
    m.insert_or_assign(np.arange(1000), 1)
    m.clear()
    assert len(m) == 0 and m.capacity == cap and m.find([1]).tolist() == [-1]
    keys, values = m.items()
    assert keys.shape == values.shape == (0,)
