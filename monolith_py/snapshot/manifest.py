"""Part records and the snapshot manifest: what a sealed snapshot consists of.

A **part** is one participant's state at the cut (``ps/<shard>`` or ``trainer/<rank>``),
stored as one wire frame on its home SMP and erasure-coded into ``m`` blocks on ``m``
distinct hosts. Its :class:`PartRecord` says what it is (a ``full`` state, or an ``inc``
on top of the same participant's part in snapshot ``base_id``), its size and crc32c, and
where each block lives with each block's crc32c.

The :class:`Manifest` lists the part of every participant at one cut and, for each
increment, the records of its whole chain back to a full part (``chains``), so a manifest
is self-contained: restoring or retaining a snapshot never needs another manifest (which
a partially sealed predecessor may not have left on every SMP). It is **sealed** by
writing it to the SMPs, which the coordinator does only after every part and every parity
block was acknowledged; restore reads nothing else. On the wire and in memory it is JSON
carried as a ``uint8`` array inside a wire frame, so the frame's crc32c covers it: a
truncated or flipped manifest does not decode.

Example::

    >>> base = PartRecord("ps/0", 4, "full", -1, size=90, crc=3, home=0, k=2, m=3,
    ...                   block_crcs=(4, 5, 6), placement=(1, 2, 0))
    >>> rec = PartRecord("ps/0", 5, "inc", 4, size=100, crc=7, home=0, k=2, m=3,
    ...                  block_crcs=(1, 2, 3), placement=(1, 2, 0))
    >>> man = Manifest("job", 5, step=500, parts={"ps/0": rec}, hosts=("a:1", "b:2", "c:3"),
    ...                chains={"ps/0": (base,)})
    >>> [r.snapshot_id for r in Manifest.decode(man.encode()).chain("ps/0")]
    [4, 5]
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from monolith_py import __version__
from monolith_py.errors import DecodeError, InvalidInputError
from monolith_py.snapshot.codec import CodecConfig, block_size
from monolith_py.wire import decode_arrays, encode_arrays

__all__ = ["PartRecord", "Manifest", "CODE_VERSION", "PART_KINDS", "check_participant",
           "check_capture", "new_capture", "PartKey"]

CODE_VERSION = f"monolith-py/{__version__} snapshot/1"
PART_KINDS = ("full", "inc")
_PARTICIPANT = re.compile(r"^[a-z][a-z0-9_]{0,31}/[0-9]{1,6}$")
_MAX_PARTS = 1 << 16
_MAX_INT = (1 << 63) - 1

PartKey = tuple[str, int, str]
"""``(participant, snapshot_id, kind)``: names one stored form of a part."""


def check_participant(name: Any) -> str:
    """``role/index`` (e.g. ``ps/3``, ``trainer/0``) or :class:`InvalidInputError`."""
    if not isinstance(name, str) or not _PARTICIPANT.match(name):
        raise InvalidInputError(
            f"participant must look like 'ps/0' or 'trainer/1' (role/index), got {name!r}")
    return name


def new_capture() -> str:
    """A random token naming one capture: its part carries it in its meta, so the
    coordinator tells that part from another run's under the same key."""
    return secrets.token_hex(8)


def check_capture(token: Any) -> str | None:
    """A capture token (a short string) or ``None``; else :class:`InvalidInputError`."""
    if token is not None and not (isinstance(token, str) and 0 < len(token) <= 64):
        raise InvalidInputError(f"a capture token must be a string of 1-64 characters, "
                                f"got {token!r}")
    return token


def _int(d: Mapping[str, Any], name: str, lo: int = 0, hi: int = _MAX_INT) -> int:
    v = d.get(name)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise DecodeError(f"bad manifest: {name!r} must be an int in [{lo}, {hi}], got {v!r}")
    return v


def _ints(d: Mapping[str, Any], name: str, n: int, lo: int, hi: int) -> tuple[int, ...]:
    v = d.get(name)
    if not isinstance(v, list) or len(v) != n:
        raise DecodeError(f"bad manifest: {name!r} must be a list of {n} ints")
    out = []
    for x in v:
        if isinstance(x, bool) or not isinstance(x, int) or not lo <= x <= hi:
            raise DecodeError(f"bad manifest: {name!r} holds {x!r}, not an int in [{lo}, {hi}]")
        out.append(x)
    return tuple(out)


def chain_break(chain: Sequence[Any]) -> str | None:
    """Why ``chain`` (oldest first; items with ``kind``, ``base_id`` and ``snapshot_id``:
    part records or decoded parts) is not a full part followed by increments each on the
    one before, or ``None`` when it is."""
    if not chain:
        return "empty chain"
    if chain[0].kind != "full":
        return f"snapshot {chain[0].snapshot_id}: an increment needs its base"
    for prev, cur in zip(chain, chain[1:]):
        if cur.kind != "inc" or cur.base_id != prev.snapshot_id:
            return (f"part of snapshot {cur.snapshot_id} ({cur.kind}, base {cur.base_id}) "
                    f"does not apply to snapshot {prev.snapshot_id}")
    return None


@dataclass(frozen=True)
class PartRecord:
    """One stored form of a participant's part (see the module docstring).

    Attributes:
        participant: ``role/index``.
        snapshot_id: the snapshot the part belongs to.
        kind: ``"full"`` or ``"inc"`` (rows changed since ``base_id`` plus all live keys).
        base_id: the snapshot this increment applies to (``-1`` for a full part).
        size, crc: bytes of the part frame and their crc32c.
        home: host index of the SMP holding the whole part.
        k, m: the erasure code.
        block_crcs: crc32c of each of the ``m`` blocks.
        placement: host index holding each block (distinct hosts; see
            :func:`~monolith_py.snapshot.codec.block_placement`).
    """

    participant: str
    snapshot_id: int
    kind: str
    base_id: int
    size: int
    crc: int
    home: int
    k: int
    m: int
    block_crcs: tuple[int, ...]
    placement: tuple[int, ...]

    def __post_init__(self) -> None:
        check_participant(self.participant)
        CodecConfig(self.k, self.m)
        if self.kind not in PART_KINDS:
            raise InvalidInputError(f"part kind must be one of {PART_KINDS}, got {self.kind!r}")
        if self.snapshot_id < 0 or self.size < 0 or not 0 <= self.crc < 1 << 32:
            raise InvalidInputError("snapshot_id and size must be >= 0, crc a u32")
        if (self.kind == "full") != (self.base_id == -1) or self.base_id >= self.snapshot_id:
            raise InvalidInputError(
                f"a full part has base_id -1 and an increment a base before its snapshot; "
                f"got kind={self.kind!r}, base_id={self.base_id}, id={self.snapshot_id}")
        if len(self.block_crcs) != self.m or len(self.placement) != self.m:
            raise InvalidInputError(f"need {self.m} block crcs and placements")
        if len(set(self.placement)) != self.m:
            raise InvalidInputError(
                f"blocks must sit on {self.m} distinct hosts, got {self.placement}")

    @property
    def key(self) -> PartKey:
        return (self.participant, self.snapshot_id, self.kind)

    @property
    def block_size(self) -> int:
        return block_size(self.size, self.k)

    def to_json(self) -> dict[str, Any]:
        return {"participant": self.participant, "snapshot_id": self.snapshot_id,
                "kind": self.kind, "base_id": self.base_id, "size": self.size,
                "crc": self.crc, "home": self.home, "k": self.k, "m": self.m,
                "block_crcs": list(self.block_crcs), "placement": list(self.placement)}

    @classmethod
    def from_json(cls, d: Any) -> PartRecord:
        """Validate and build (raises :class:`DecodeError`)."""
        if not isinstance(d, dict):
            raise DecodeError("bad manifest: a part record must be an object")
        m = _int(d, "m", 1, 256)
        try:
            return cls(
                participant=check_participant(d.get("participant")),
                snapshot_id=_int(d, "snapshot_id"),
                kind=str(d.get("kind")),
                base_id=_int(d, "base_id", -1),
                size=_int(d, "size"),
                crc=_int(d, "crc", 0, (1 << 32) - 1),
                home=_int(d, "home", 0, 1 << 16),
                k=_int(d, "k", 1, 256),
                m=m,
                block_crcs=_ints(d, "block_crcs", m, 0, (1 << 32) - 1),
                placement=_ints(d, "placement", m, 0, 1 << 16),
            )
        except InvalidInputError as exc:
            raise DecodeError(f"bad manifest: {exc}") from exc


@dataclass(frozen=True)
class Manifest:
    """A sealed snapshot: the parts of every participant at one cut.

    Attributes:
        job: job name (SMPs of one group may serve one job).
        snapshot_id: increasing id chosen by the coordinator.
        step: the global training step of the cut.
        parts: ``{participant: PartRecord}``.
        hosts: SMP address of each host index at seal time.
        created_s: wall-clock seconds at seal (informational only).
        code_version: the writer's :data:`CODE_VERSION`.
        info: small JSON facts (``num_shards``, ``tables``...).
        chains: ``{participant: (records oldest first)}`` of the parts an increment in
            ``parts`` applies to (a full part first); empty for full parts.
    """

    job: str
    snapshot_id: int
    step: int
    parts: Mapping[str, PartRecord]
    hosts: tuple[str, ...] = ()
    created_s: float = 0.0
    code_version: str = CODE_VERSION
    info: Mapping[str, Any] = field(default_factory=dict)
    chains: Mapping[str, tuple[PartRecord, ...]] = field(default_factory=dict)

    def chain(self, participant: str) -> tuple[PartRecord, ...]:
        """The records from a full part to this snapshot's part (oldest first)."""
        return (*self.chains.get(participant, ()), self.parts[participant])

    def __post_init__(self) -> None:
        if not isinstance(self.job, str) or not 0 < len(self.job) <= 128:
            raise InvalidInputError(f"job must be a non-empty string, got {self.job!r}")
        if self.snapshot_id < 0 or self.step < 0:
            raise InvalidInputError("snapshot_id and step must be >= 0")
        for name, rec in self.parts.items():
            if rec.participant != name or rec.snapshot_id != self.snapshot_id:
                raise InvalidInputError(
                    f"part {name!r} is recorded as {rec.participant!r} of snapshot "
                    f"{rec.snapshot_id}, expected snapshot {self.snapshot_id}")
        for name, chain in self.chains.items():
            if name not in self.parts:
                raise InvalidInputError(f"chain of {name!r}, which has no part")
            full = (*chain, self.parts[name])
            if any(r.participant != name for r in full):
                raise InvalidInputError(f"chain of {name!r} holds another participant's part")
            problem = chain_break(full)
            if problem is not None:
                raise InvalidInputError(f"chain of {name!r}: {problem}")
        for name, rec in self.parts.items():
            if rec.kind == "inc" and name not in self.chains:
                raise InvalidInputError(f"increment of {name!r} without its chain")

    def to_json(self) -> dict[str, Any]:
        return {"format": "monolith.manifest/1", "job": self.job,
                "snapshot_id": self.snapshot_id, "step": self.step,
                "created_s": float(self.created_s), "code_version": self.code_version,
                "hosts": list(self.hosts), "info": dict(self.info),
                "parts": [self.parts[p].to_json() for p in sorted(self.parts)],
                "chains": {p: [r.to_json() for r in c] for p, c in sorted(self.chains.items())}}

    def encode(self) -> bytes:
        """The manifest as a checksummed wire frame."""
        body = json.dumps(self.to_json(), separators=(",", ":"), sort_keys=True).encode()
        return encode_arrays({"json": np.frombuffer(body, dtype=np.uint8)},
                             {"kind": "manifest"})

    @classmethod
    def from_json(cls, d: Any) -> Manifest:
        if not isinstance(d, dict) or d.get("format") != "monolith.manifest/1":
            raise DecodeError("bad manifest: not a monolith.manifest/1 object")
        parts_raw = d.get("parts")
        if not isinstance(parts_raw, list) or len(parts_raw) > _MAX_PARTS:
            raise DecodeError("bad manifest: 'parts' must be a list")
        parts = {}
        for raw in parts_raw:
            rec = PartRecord.from_json(raw)
            if rec.participant in parts:
                raise DecodeError(f"bad manifest: part {rec.participant!r} listed twice")
            parts[rec.participant] = rec
        chains_raw = d.get("chains", {})
        if not isinstance(chains_raw, dict):
            raise DecodeError("bad manifest: 'chains' must be an object")
        chains = {}
        for name, lst in chains_raw.items():
            if not isinstance(lst, list) or len(lst) > 100_000:
                raise DecodeError("bad manifest: a chain must be a list of records")
            chains[str(name)] = tuple(PartRecord.from_json(r) for r in lst)
        hosts = d.get("hosts")
        info = d.get("info")
        job, code, created = d.get("job"), d.get("code_version"), d.get("created_s")
        if (not isinstance(hosts, list) or not all(isinstance(h, str) for h in hosts)
                or not isinstance(info, dict) or not isinstance(job, str)
                or not isinstance(code, str)
                or isinstance(created, bool) or not isinstance(created, (int, float))):
            raise DecodeError("bad manifest: hosts/info/job/code_version/created_s malformed")
        try:
            return cls(job=job, snapshot_id=_int(d, "snapshot_id"), step=_int(d, "step"),
                       parts=parts, hosts=tuple(hosts), created_s=float(created),
                       code_version=code, info=info, chains=chains)
        except InvalidInputError as exc:
            raise DecodeError(f"bad manifest: {exc}") from exc

    @classmethod
    def decode(cls, buf: Any) -> Manifest:
        """Validate and decode :meth:`encode` output (raises :class:`DecodeError`)."""
        arrays, meta = decode_arrays(buf, require_checksum=True)
        if meta.get("kind") != "manifest" or set(arrays) != {"json"}:
            raise DecodeError("bad manifest: frame is not a manifest")
        try:
            d = json.loads(arrays["json"].tobytes())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DecodeError(f"bad manifest: JSON does not parse ({exc})") from exc
        return cls.from_json(d)
