"""monolith-py: PyTorch-native real-time recommendation.

Collisionless embedding tables (:mod:`monolith_py.table`), TorchRec-compatible modules
(:mod:`monolith_py.modules`), parameter-server shards (:mod:`monolith_py.ps`), in-memory
erasure-coded snapshots (:mod:`monolith_py.snapshot`), train-to-serve sync
(:mod:`monolith_py.sync`) and online training (:mod:`monolith_py.training`).
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
