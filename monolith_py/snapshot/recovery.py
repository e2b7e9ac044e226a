"""The recovery policy — the one place that decides where restored state comes from.

For a participant (``ps/<shard>`` or ``trainer/<rank>``) and a snapshot (a given id, or the
newest sealed one that can be rebuilt), every part of its chain (a full part, or an
increment on top of an earlier snapshot's part; an SMP's composed full part is preferred
when one exists) is read from, in order:

1. **local** — this host's SMP holds the whole part: map its segment (zero copy);
2. **home** — another reachable SMP holds the whole part: read it;
3. **erasure decode** — any ``k`` blocks from the hosts in the part's placement whose
   crc32c matches the sealed manifest (a corrupt block is excluded and rebuilt from
   parity); the decoded part must match the recorded crc of the whole part.

A snapshot that cannot be rebuilt is skipped for the next older sealed one; when none is
left, the newest intact universal checkpoint on disk is used (``checkpoint_dir``). Every
step is logged with its reason; when nothing is valid, :class:`NoValidSnapshotError` lists
them all. Only sealed manifests (checksummed, validated) are ever considered.

Example::

    >>> rec = Recovery({}, local_host=None)                  # no SMP, no disk
    >>> try:
    ...     rec.restore("ps/0")
    ... except NoValidSnapshotError as exc:
    ...     print(type(exc).__name__)
    NoValidSnapshotError
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import crc32c

from monolith_py.errors import (
    DecodeError,
    MonolithError,
    NoValidSnapshotError,
    SnapshotError,
)
from monolith_py.snapshot._fetch import fetch_decoded, fetch_whole
from monolith_py.snapshot.compose import Stage
from monolith_py.snapshot.manifest import Manifest, PartKey, PartRecord, check_participant
from monolith_py.snapshot.shm import attach

__all__ = ["PartSource", "Catalog", "Restored", "Recovery"]

log = logging.getLogger("monolith.snapshot.recovery")


class PartSource(Protocol):
    """What recovery needs from one SMP (the gRPC client, or a store in-process).

    Every method may raise :class:`~monolith_py.errors.UnavailableError` when the SMP does
    not answer; ``None`` means "not held here". Sources may also offer
    ``stream_block(key, sink, size_hint=)`` and ``stream_part(key, sink, size_hint=)``
    (``sink(offset, chunk)`` per chunk; returning the size or ``None``), which restores use
    instead of whole-block reads.
    """

    def catalog(self) -> dict[str, Any]: ...

    def part_location(self, key: PartKey) -> dict[str, Any] | None: ...

    def read_part(self, key: PartKey, offset: int, length: int) -> bytes | None: ...

    def get_block(self, key: tuple[str, int, str, int]) -> bytes | None: ...


@dataclass
class Catalog:
    """The union of the sealed manifests and compaction records of reachable SMPs."""

    manifests: dict[int, Manifest] = field(default_factory=dict)
    records: dict[PartKey, PartRecord] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def newest_first(self) -> list[Manifest]:
        return [self.manifests[s] for s in sorted(self.manifests, reverse=True)]


@dataclass
class Restored:
    """A participant's state at a snapshot.

    Attributes:
        participant: who.
        state: a PS shard state dict (``ps/*``; for another shard count when it came from
            a universal checkpoint and was resharded) or a trainer state (``trainer/*``).
        snapshot_id, step: the cut.
        source: ``"smp"`` or ``"disk"``.
        manifest: the sealed manifest (SMP restores).
        meta: the part's metadata (trainer parts) or checkpoint facts.
        path: the checkpoint directory (disk restores).
        log: what was tried, in order, with reasons.
    """

    participant: str
    state: Any
    snapshot_id: int
    step: int
    source: str
    manifest: Manifest | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    path: str | None = None
    log: list[str] = field(default_factory=list)


class Recovery:
    """Rebuild participants' states from the SMPs of a group, or from disk.

    Args:
        sources: ``{host index: PartSource}`` of the group's SMPs (reachable or not).
        local_host: this process's host (its SMP is tried first and mapped zero-copy).
        checkpoint_dir: where universal checkpoints live (the last resort).
        job: accept only manifests of this job (``None``: any).
        decode_threads: unused (kept for compatibility): erasure decoding runs stripe by
            stripe while the blocks stream in.
        read_threads: parts of a chain read at once (mapped and checked, or streamed from
            the peers): the page-table work, checksums and socket reads release the GIL.
    """

    def __init__(self, sources: Mapping[int, PartSource], local_host: int | None = None, *,
                 checkpoint_dir: str | None = None, job: str | None = None,
                 decode_threads: int = 1, read_threads: int = 2) -> None:
        self.sources = dict(sources)
        self.local_host = local_host
        self.checkpoint_dir = checkpoint_dir
        self.job = job
        self.decode_threads = int(decode_threads)
        self.read_threads = max(1, int(read_threads))
        self._mappings: list[Any] = []
        self.steps: list[str] = []

    def _note(self, msg: str) -> None:
        self.steps.append(msg)
        log.info("recovery: %s", msg)

    def close(self) -> None:
        """Unmap the local segments mapped by zero-copy reads."""
        for m in self._mappings:
            m.close()
        self._mappings.clear()

    # -- catalog -------------------------------------------------------------------------------

    def catalog(self) -> Catalog:
        """Union of what the reachable SMPs hold; unreadable manifests are skipped."""
        cat = Catalog()
        for host, src in sorted(self.sources.items()):
            try:
                got = src.catalog()
            except MonolithError as exc:
                cat.problems.append(f"host {host}: catalog unavailable ({exc})")
                continue
            for raw in got.get("manifests", []):
                try:
                    man = Manifest.decode(raw)
                except DecodeError as exc:
                    cat.problems.append(f"host {host}: manifest skipped ({exc})")
                    continue
                if self.job is not None and man.job != self.job:
                    continue
                cat.manifests.setdefault(man.snapshot_id, man)
            for rec in got.get("records", []):
                if isinstance(rec, PartRecord):
                    cat.records.setdefault(rec.key, rec)
        for p in cat.problems:
            self._note(p)
        return cat

    # -- one part -------------------------------------------------------------------------------

    def part_bytes(self, rec: PartRecord) -> memoryview:
        """The verified bytes of a part (local map, home read, or erasure decode)."""
        why: list[str] = []
        name = f"{rec.participant} {rec.kind} part of snapshot {rec.snapshot_id}"
        local = self.sources.get(self.local_host) if self.local_host is not None else None
        if local is not None and rec.home == self.local_host:
            view = self._local(local, rec, why)
            if view is not None:
                self._note(f"{name}: local SMP copy")
                return view
        home = self.sources.get(rec.home)
        if home is not None and rec.home != self.local_host:
            data = self._remote(home, rec, why)
            if data is not None:
                self._note(f"{name}: whole copy read from host {rec.home}")
                return data
        used: list[int] = []
        data = self._decode(rec, why, used)
        if data is not None:
            hosts = ", ".join(str(rec.placement[i]) for i in used)
            how = (f"erasure-decoded from blocks {used} of hosts {hosts}"
                   if any(i >= rec.k for i in used)
                   else f"data blocks read from hosts {hosts}, nothing to decode")
            self._note(f"{name}: {how} ({'; '.join(why)})")
            return data
        raise SnapshotError(f"{name} cannot be rebuilt: {'; '.join(why)}")

    def _local(self, src: PartSource, rec: PartRecord, why: list[str]) -> memoryview | None:
        try:
            view_fn = getattr(src, "part_view", None)
            if view_fn is not None:
                view = view_fn(rec.key)
            else:
                loc = src.part_location(rec.key)
                view = None
                if loc is not None:
                    m = attach(loc["path"], int(loc["capacity"]), writable=False)
                    self._mappings.append(m)
                    view = m.view[: int(loc["size"])]
        except (MonolithError, OSError) as exc:
            why.append(f"local SMP unavailable ({exc})")
            return None
        if view is None:
            why.append("no local copy")
            return None
        if view.nbytes != rec.size or crc32c.crc32c(view) != rec.crc:
            why.append("local copy corrupt (crc mismatch)")
            return None
        return view

    def _remote(self, src: PartSource, rec: PartRecord, why: list[str]) -> memoryview | None:
        return fetch_whole(src, rec, why)

    def _decode(self, rec: PartRecord, why: list[str], used: list[int]) -> memoryview | None:
        # every data block was checked against its sealed crc32c (received or decoded)
        return fetch_decoded(self.sources, rec, why, used)

    # -- chains and participants ---------------------------------------------------------------

    def _decode_chain(self, recs: Sequence[PartRecord]) -> list[Any]:
        from monolith_py.snapshot.pspart import decode_part

        def read(rec: PartRecord) -> Any:
            part = decode_part(self.part_bytes(rec), verified=True)  # crc checked there
            if part.snapshot_id != rec.snapshot_id or part.kind != rec.kind:
                raise SnapshotError(f"{rec.participant}: part content does not match its record")
            return part

        if self.read_threads == 1 or len(recs) == 1:
            return [read(rec) for rec in recs]
        with ThreadPoolExecutor(min(self.read_threads, len(recs)),
                                thread_name_prefix="restore-read") as pool:
            return list(pool.map(read, recs))

    def _ps_state(self, cat: Catalog, p: str, man: Manifest, stage: Stage | None) -> Any:
        """Compose ``p``'s chain at ``man``, starting from the newest composed full part an
        SMP recorded in the chain (if it reads), else from the chain's own full part."""
        from monolith_py.snapshot.compose import compose

        chain = list(man.chain(p))
        for i in range(len(chain) - 1, -1, -1):
            full = cat.records.get((p, chain[i].snapshot_id, "full"))
            if full is not None and full.key != chain[i].key:
                try:
                    return compose(self._decode_chain([full, *chain[i + 1:]]), stage)
                except MonolithError as exc:
                    self._note(f"{p}: composed full part of {chain[i].snapshot_id} unusable "
                               f"({exc}); trying the chain")
                break
        return compose(self._decode_chain(chain), stage)

    def _build(self, cat: Catalog, man: Manifest, p: str, stage: Stage | None = None
               ) -> Restored:
        from monolith_py.snapshot.trainerpart import decode_trainer_part

        rec = man.parts.get(p)
        if rec is None:
            raise SnapshotError(f"snapshot {man.snapshot_id} has no part for {p}")
        if p.startswith("ps/"):
            state: Any = self._ps_state(cat, p, man, stage)
            meta: dict[str, Any] = {}
        else:
            state, meta = decode_trainer_part(self.part_bytes(rec))
        return Restored(p, state, man.snapshot_id, man.step, "smp", manifest=man, meta=meta,
                        log=list(self.steps))

    def restore(self, participant: str, snapshot_id: int | None = None, *,
                num_shards: int | None = None, catalog: Catalog | None = None,
                stage: Stage | None = None) -> Restored:
        """The state of ``participant`` at ``snapshot_id`` (``None``: the newest sealed one
        that rebuilds), falling back to the newest intact disk checkpoint.

        ``num_shards`` is the job's shard count (for a PS participant restored from a
        universal checkpoint; default: the checkpoint's own). ``stage(table, rows)``: see
        :func:`~monolith_py.snapshot.compose.compose` (a PS state from the SMPs is then
        composed straight into the tables' staged arenas).
        """
        check_participant(participant)
        self.steps = []
        cat = catalog if catalog is not None else self.catalog()
        reasons: list[str] = list(cat.problems)
        cands = cat.newest_first()
        if snapshot_id is not None:
            cands = [m for m in cands if m.snapshot_id == snapshot_id]
            if not cands:
                reasons.append(f"snapshot {snapshot_id} is not sealed in any reachable SMP")
        for man in cands:
            if participant not in man.parts:
                continue
            try:
                try:
                    out = self._build(cat, man, participant, stage)
                except MonolithError as first:
                    # the SMPs may have moved on (a composed full part replaced a chain
                    # since the catalog was read): read the catalog again, once
                    self._note(f"{participant}: snapshot {man.snapshot_id}: {first}; "
                               "re-reading the catalog")
                    cat = self.catalog()
                    if man.snapshot_id not in cat.manifests:
                        raise
                    out = self._build(cat, cat.manifests[man.snapshot_id], participant, stage)
                self._note(f"{participant}: restored snapshot {man.snapshot_id} (step "
                           f"{man.step}) from SMPs")
                out.log = list(self.steps)
                return out
            except MonolithError as exc:
                tried = [n for n in self.steps if "unusable" in n]
                msg = f"snapshot {man.snapshot_id}: {exc}" + (f" (after: {'; '.join(tried)})"
                                                              if tried else "")
                reasons.append(msg)
                self._note(f"{participant}: {msg}; trying an older one")
        disk = self._from_disk(participant, snapshot_id, num_shards, reasons)
        if disk is not None:
            return disk
        detail = "\n  ".join(reasons) or "no sealed snapshot and no checkpoint"
        raise NoValidSnapshotError(f"no valid snapshot for {participant}: \n  {detail}")

    def _from_disk(self, participant: str, snapshot_id: int | None, num_shards: int | None,
                   reasons: list[str]) -> Restored | None:
        if not self.checkpoint_dir:
            reasons.append("no checkpoint directory configured")
            return None
        from monolith_py.snapshot.checkpoint import find_checkpoints, load_checkpoint

        paths = find_checkpoints(self.checkpoint_dir)
        if not paths:
            reasons.append(f"no checkpoint in {self.checkpoint_dir}")
        for path in paths:
            try:
                ckpt = load_checkpoint(path)
                if snapshot_id is not None and ckpt.snapshot_id != snapshot_id:
                    continue
                role, idx = participant.split("/")
                if role == "ps":
                    n = num_shards or ckpt.num_shards
                    state: Any = ckpt.shard_state(int(idx), n)
                    meta: dict[str, Any] = {"num_shards": n}
                else:
                    state, meta = ckpt.trainer_state(int(idx))
                self._note(f"{participant}: restored checkpoint {path} (snapshot "
                           f"{ckpt.snapshot_id}, step {ckpt.step}) from disk")
                return Restored(participant, state, ckpt.snapshot_id, ckpt.step, "disk",
                                meta=meta, path=path, log=list(self.steps))
            except MonolithError as exc:
                msg = f"checkpoint {path}: {exc}"
                reasons.append(msg)
                self._note(f"{participant}: {msg}")
        return None

    def newest_common(self, participants: Sequence[str],
                      catalog: Catalog | None = None) -> Manifest | None:
        """The newest sealed manifest holding every one of ``participants``."""
        cat = catalog if catalog is not None else self.catalog()
        for man in cat.newest_first():
            if all(p in man.parts for p in participants):
                return man
        return None
