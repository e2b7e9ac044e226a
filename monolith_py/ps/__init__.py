"""Parameter-server shards: key routing, the shard object, its gRPC server and the
trainer-side client (a :class:`~monolith_py.table.backend.SparseBackend`).

See ``docs/design/0005-parameter-server.md``::

    from monolith_py.ps import PSShard, PSServer, PSClient, ShardedBackend, shard_of

The names are re-exported lazily (PEP 562): the ``monolith`` command imports this package
to register ``monolith ps``, and every other subcommand (``smp``, ``broker``...) should not
pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from monolith_py.ps.client import ClientOptions, PSClient, parse_addresses
    from monolith_py.ps.dense import DataParallelOptimizer, broadcast_parameters
    from monolith_py.ps.local import ShardedBackend
    from monolith_py.ps.routing import ROUTING_VERSION, route, shard_of
    from monolith_py.ps.server import PSServer
    from monolith_py.ps.shard import PSShard

__all__ = [
    "ClientOptions",
    "DataParallelOptimizer",
    "PSClient",
    "PSServer",
    "PSShard",
    "ROUTING_VERSION",
    "ShardedBackend",
    "broadcast_parameters",
    "parse_addresses",
    "route",
    "shard_of",
]

_WHERE = {
    "ClientOptions": "client", "PSClient": "client", "parse_addresses": "client",
    "DataParallelOptimizer": "dense", "broadcast_parameters": "dense",
    "ShardedBackend": "local",
    "ROUTING_VERSION": "routing", "route": "routing", "shard_of": "routing",
    "PSServer": "server",
    "PSShard": "shard",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'monolith_py.ps' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"monolith_py.ps.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
