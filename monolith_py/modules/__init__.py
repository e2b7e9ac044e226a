"""Torch modules: the KJT-in/KeyedTensor-out embedding collection and ranking models."""

from monolith_py.modules.embedding_bag_collection import (
    DynamicEmbeddingBagCollection,
    from_torchrec_config,
)
from monolith_py.modules.models import MLP, DLRM, DeepFM, embedding_dims

__all__ = ["DynamicEmbeddingBagCollection", "from_torchrec_config", "DLRM", "DeepFM", "MLP", "embedding_dims"]
