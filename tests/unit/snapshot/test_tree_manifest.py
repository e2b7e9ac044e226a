"""Nested-state frames (no pickle) and manifests (checksummed, strictly validated)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from monolith_py.errors import DecodeError, InvalidInputError
from monolith_py.snapshot.manifest import Manifest, PartRecord
from monolith_py.snapshot.tree import decode_state, encode_state, flatten_state, unflatten_state
from monolith_py.testing.state import assert_states_equal


def _trainer_like_state() -> dict:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    return {"model": model.state_dict(), "optimizer": opt.state_dict(),
            "rng": torch.get_rng_state(), "np_rng": np.random.default_rng(3).bit_generator.state,
            "offsets": {0: 17, 3: 5}, "nan": math.nan, "inf": -math.inf, "t": (1, "a", None),
            "bf16": torch.tensor([1.5, -2.25], dtype=torch.bfloat16), "u64": np.uint64(2**63 + 5)}


def test_state_round_trip_is_bit_exact() -> None:
    state = _trainer_like_state()
    back, meta = decode_state(encode_state(state, {"rank": 0}))
    assert meta == {"rank": 0}
    assert_states_equal(back, state)
    assert back["bf16"].dtype == torch.bfloat16 and isinstance(back["offsets"], dict)
    assert type(back["u64"]) is np.uint64 and back["u64"] == np.uint64(2**63 + 5)
    # the optimizer loads what came back
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    torch.optim.Adam(model.parameters()).load_state_dict(back["optimizer"])


def test_flatten_copies_so_later_training_does_not_leak_in() -> None:
    w = torch.zeros(3)
    arrays, skel = flatten_state({"w": w})
    w += 1
    assert unflatten_state(arrays, skel)["w"].sum().item() == 0


def test_unsupported_leaves_and_hostile_skeletons() -> None:
    with pytest.raises(InvalidInputError):
        flatten_state({"x": object()})
    with pytest.raises(InvalidInputError):
        flatten_state({(1, 2): 3})
    arrays = {"a0": np.zeros(2)}
    for skel in ({"A": "a9"}, {"zz": 1}, {"d": [[1]]}, {"l": [{"A": "a0"}, {"A": "a0"}]},
                 {"T": "a0", "dt": "int64"}, "x"):
        with pytest.raises(DecodeError):
            unflatten_state(arrays, skel)
    deep: dict = {"n": 0}
    for _ in range(100):
        deep = {"l": [deep]}
    with pytest.raises(DecodeError):
        unflatten_state({}, deep)


def _rec(p: str, sid: int, kind: str, base: int, i: int) -> PartRecord:
    return PartRecord(p, sid, kind, base, size=1000 + i, crc=i, home=i % 3, k=2, m=3,
                      block_crcs=(1, 2, 3), placement=tuple((i % 3 + j) % 3 for j in range(3)))


def _manifest() -> Manifest:
    recs = {p: _rec(p, 9, "inc" if p.startswith("ps") else "full",
                    7 if p.startswith("ps") else -1, i)
            for i, p in enumerate(["ps/0", "ps/1", "trainer/0"])}
    chains = {p: (_rec(p, 3, "full", -1, i), _rec(p, 7, "inc", 3, i))
              for i, p in enumerate(["ps/0", "ps/1"])}
    return Manifest("job-a", 9, step=900, parts=recs, hosts=("h0", "h1", "h2"),
                    created_s=1.5, info={"num_shards": 2}, chains=chains)


def test_manifest_round_trip_and_truncation() -> None:
    man = _manifest()
    buf = man.encode()
    assert Manifest.decode(buf) == man
    for cut in (0, 10, len(buf) // 2, len(buf) - 1):
        with pytest.raises(DecodeError):
            Manifest.decode(buf[:cut])
    flipped = bytearray(buf)
    flipped[-5] ^= 1
    with pytest.raises(DecodeError):
        Manifest.decode(bytes(flipped))


@pytest.mark.parametrize("mutate", [
    lambda d: d["parts"][0].update(kind="delta"),
    lambda d: d["parts"][0].update(placement=[0, 0, 1]),
    lambda d: d["parts"][0].update(base_id=9),
    lambda d: d["parts"][0].update(participant="../etc"),
    lambda d: d["parts"].append(dict(d["parts"][0])),
    lambda d: d.update(snapshot_id=-1),
    lambda d: d["parts"][0].update(block_crcs=[1, 2]),
    lambda d: d["chains"].pop("ps/0"),                       # an increment without its chain
    lambda d: d["chains"]["ps/0"].pop(0),                    # a chain not starting full
    lambda d: d["chains"]["ps/1"][1].update(base_id=2),      # a chain with a gap
])
def test_manifest_rejects_inconsistent_content(mutate) -> None:  # type: ignore[no-untyped-def]
    d = _manifest().to_json()
    mutate(d)
    with pytest.raises(DecodeError):
        Manifest.from_json(d)
