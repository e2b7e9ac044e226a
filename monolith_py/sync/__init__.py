"""Train -> serve sync: lossless per-shard deltas, a gRPC stream, and read-only replicas.

See ``docs/design/0007-sync-and-serving.md``. Public API::

    from monolith_py.sync import (ShardPublisher, DenseBoard, SyncService, serve_sync,
                                  SyncClient, ShardSubscriber, ReplicaTable, DeltaSink)
"""

from monolith_py.sync.codec import (
    DeltaAssembler,
    SubscribeRequest,
    decode_dense,
    decode_message,
    encode_delta,
    encode_dense,
)
from monolith_py.sync.dense import DensePusher
from monolith_py.sync.locked import LockedBackend
from monolith_py.sync.protocol import (
    ColdStartSource,
    DeltaSink,
    DenseUpdate,
    Heartbeat,
    ShardDelta,
    ShardPosition,
    TablePatch,
    classify,
)
from monolith_py.sync.publisher import DenseBoard, ShardPublisher, new_epoch_id
from monolith_py.sync.replica import ReplicaTable
from monolith_py.sync.retention import trim_version
from monolith_py.sync.service import SyncClient, SyncService, serve_sync
from monolith_py.sync.subscriber import ShardSubscriber, deliver, sync_once

__all__ = [
    "ColdStartSource",
    "DeltaAssembler",
    "DeltaSink",
    "DenseBoard",
    "DensePusher",
    "DenseUpdate",
    "Heartbeat",
    "LockedBackend",
    "ReplicaTable",
    "ShardDelta",
    "ShardPosition",
    "ShardPublisher",
    "ShardSubscriber",
    "SubscribeRequest",
    "SyncClient",
    "SyncService",
    "TablePatch",
    "classify",
    "decode_dense",
    "decode_message",
    "deliver",
    "encode_delta",
    "encode_dense",
    "new_epoch_id",
    "serve_sync",
    "sync_once",
    "trim_version",
]
