"""In-memory, erasure-coded snapshots held by snapshot-manager processes (SMPs), universal
disk checkpoints, the recovery policy and exactly-once accounting.

See ``docs/design/0006-snapshots.md`` and ``docs/fault-tolerance.md``::

    from monolith_py.snapshot import SMPServer, SMPClient, SnapshotCoordinator, PSParticipant
    from monolith_py.snapshot import Recovery, load_checkpoint, find_checkpoints

Importing this package does not import torch (the SMP process never needs it).
"""

from monolith_py.snapshot.checkpoint import (
    UniversalState,
    find_checkpoints,
    load_checkpoint,
    merge_shard_states,
    read_snapshot,
    write_checkpoint,
)
from monolith_py.snapshot.codec import CodecConfig
from monolith_py.snapshot.compose import compose
from monolith_py.snapshot.coordinator import Cut, SnapshotCoordinator, SnapshotPolicy
from monolith_py.snapshot.ledger import ExactlyOnceLedger
from monolith_py.snapshot.loop import LoopSettings, LoopSnapshots
from monolith_py.snapshot.manifest import Manifest, PartRecord
from monolith_py.snapshot.participant import (
    ParticipantClient,
    PSParticipant,
    TrainerParticipant,
    load_trainer_state,
    trainer_state,
)
from monolith_py.snapshot.recovery import Recovery, Restored
from monolith_py.snapshot.smp import SMPClient, SMPServer, smp_clients
from monolith_py.snapshot.store import SMPConfig, SnapshotStore

__all__ = [
    "CodecConfig",
    "Cut",
    "ExactlyOnceLedger",
    "LoopSettings",
    "LoopSnapshots",
    "Manifest",
    "PSParticipant",
    "PartRecord",
    "ParticipantClient",
    "Recovery",
    "Restored",
    "SMPClient",
    "SMPConfig",
    "SMPServer",
    "SnapshotCoordinator",
    "SnapshotPolicy",
    "SnapshotStore",
    "TrainerParticipant",
    "UniversalState",
    "compose",
    "find_checkpoints",
    "load_checkpoint",
    "load_trainer_state",
    "merge_shard_states",
    "read_snapshot",
    "smp_clients",
    "trainer_state",
    "write_checkpoint",
]
