"""Parameter-server shards: key routing, the shard object, its gRPC server and the
trainer-side client (a :class:`~monolith_py.table.backend.SparseBackend`).

See ``docs/design/0005-parameter-server.md``::

    from monolith_py.ps import PSShard, PSServer, PSClient, ShardedBackend, shard_of
"""

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
