"""A trainer's snapshot part: its whole state as one nested-state frame.

What a trainer puts in its part (see :class:`~monolith_py.snapshot.participant.TrainerParticipant`):
the :class:`~monolith_py.training.OnlineTrainer` state (dense model, dense optimizer, torch
RNG, metric accumulators, counters), the Kafka source's next offsets, the exactly-once
ledger, numpy/python RNG states and the joiner state when the process has one. Dense state
is small, so trainer parts are always full.

Example::

    >>> frame = encode_trainer_part({"offsets": {0: 12}}, "trainer/0", snapshot_id=3, step=30)
    >>> state, meta = decode_trainer_part(frame)
    >>> state["offsets"][0], meta["step"]
    (12, 30)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from monolith_py.errors import DecodeError
from monolith_py.snapshot.manifest import check_participant
from monolith_py.snapshot.tree import decode_state, encode_state

__all__ = ["TRAINER_PART_FORMAT", "encode_trainer_part", "decode_trainer_part"]

TRAINER_PART_FORMAT = "monolith.trainer_part/1"


def encode_trainer_part(state: Mapping[str, Any], participant: str, snapshot_id: int,
                        step: int, capture: str | None = None) -> bytes:
    """The part frame of a trainer state (tensors copied: a consistent cut); ``capture``:
    the capture's token (see :meth:`SnapshotStore.wait_part`)."""
    check_participant(participant)
    meta = {"format": TRAINER_PART_FORMAT, "participant": participant,
            "snapshot_id": int(snapshot_id), "kind": "full", "base_id": -1, "step": int(step)}
    if capture is not None:
        meta["capture"] = capture
    return encode_state(dict(state), meta)


def decode_trainer_part(buf: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(state, meta)``; raises :class:`DecodeError` for anything but a trainer part."""
    state, meta = decode_state(buf)
    if meta.get("format") != TRAINER_PART_FORMAT or not isinstance(state, dict):
        raise DecodeError(f"not a trainer part (format {meta.get('format')!r})")
    return state, meta
