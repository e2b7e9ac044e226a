"""DynamicEmbeddingBagCollection as a drop-in: TorchRec configs in, TorchRec models on top,
and the README's drop-in example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from monolith_py.errors import ConfigError
from monolith_py.modules import DynamicEmbeddingBagCollection, from_torchrec_config

README = Path(__file__).resolve().parents[3] / "README.md"

CONFIGS = [
    EmbeddingBagConfig(name="t_user", embedding_dim=4, num_embeddings=50,
                       feature_names=["user"]),
    EmbeddingBagConfig(name="t_item", embedding_dim=4, num_embeddings=10**9,
                       feature_names=["item", "clicked"], pooling=PoolingType.MEAN),
]


def _kjt() -> KeyedJaggedTensor:
    return KeyedJaggedTensor.from_lengths_sync(
        keys=["user", "item", "clicked"], values=torch.tensor([3, 4, 7, 8, 7, 9, 11]),
        lengths=torch.tensor([1, 1, 1, 1, 3, 0]))


def test_torchrec_configs_convert() -> None:
    user, item = (from_torchrec_config(c) for c in CONFIGS)
    assert (user.name, user.dim, user.feature_names, user.pooling) == ("t_user", 4, ("user",),
                                                                       "sum")
    assert item.pooling == "mean" and item.feature_names == ("item", "clicked")
    assert item.initial_capacity <= 1 << 20  # a 10^9-row config does not allocate 10^9
    assert from_torchrec_config(CONFIGS[0], admit_threshold=3).admit_threshold == 3
    with pytest.raises(ConfigError, match="pooling"):
        from_torchrec_config(EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=5,
                                                feature_names=["f"], pooling=PoolingType.NONE))


def test_same_layout_and_values_as_torchrec_ebc() -> None:
    ours = DynamicEmbeddingBagCollection(tables=CONFIGS)
    theirs = EmbeddingBagCollection(tables=[
        EmbeddingBagConfig(name=c.name, embedding_dim=c.embedding_dim, num_embeddings=20,
                           feature_names=c.feature_names, pooling=c.pooling) for c in CONFIGS])
    kjt = _kjt()
    ours.train()
    ours(kjt)  # a training forward admits the ids (random initial rows)
    ours.eval()
    # copy our rows into TorchRec's weight matrices (ids < 20)
    with torch.no_grad():
        for name, table in theirs.embedding_bags.items():
            ids = torch.arange(20)
            table.weight.copy_(ours.backend.lookup({name: ids}, train=False)[name])
        got = ours(kjt)
    want = theirs(kjt)
    assert got.keys() == want.keys()
    assert got.length_per_key() == want.length_per_key()
    assert got.values().abs().sum() > 0
    torch.testing.assert_close(got.values(), want.values())
    assert [c.name for c in ours.embedding_bag_configs()] == ["t_user", "t_item"]


def test_torchrec_dlrm_trains_on_dynamic_tables() -> None:
    ebc = DynamicEmbeddingBagCollection(tables=CONFIGS[:1] + [
        EmbeddingBagConfig(name="t_item", embedding_dim=4, num_embeddings=10,
                           feature_names=["item", "clicked"])])
    model = DLRM(embedding_bag_collection=ebc, dense_in_features=2,
                 dense_arch_layer_sizes=[8, 4], over_arch_layer_sizes=[8, 1])
    before = ebc.backend.lookup({"t_item": torch.tensor([7])}, train=False)["t_item"].clone()
    out = model(torch.randn(2, 2), _kjt())
    assert out.shape == (2, 1)
    out.sum().backward()
    ebc.apply_sparse_gradients(now=100)
    after = ebc.backend.lookup({"t_item": torch.tensor([7])}, train=False)["t_item"]
    assert not torch.equal(before, after)  # id 7 was admitted and trained
    assert ebc.backend.stats()["t_item"]["size"] == 4  # 7, 8, 9, 11: no collisions, no cap


def test_readme_dropin_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    section = README.read_text().split("## Drop-in for TorchRec", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "README has no python block under 'Drop-in for TorchRec'"
    exec(compile(blocks[0], str(README), "exec"), {"__name__": "readme"})
    assert capsys.readouterr().out.splitlines()[-1] == "2"
