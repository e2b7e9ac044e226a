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
from collections.abc import Callable, Mapping, Sequence
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

__all__ = ["PartSource", "Catalog", "Restored", "Recovery", "composed_chain"]

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
    """The union of the sealed manifests and compaction records of reachable SMPs;
    ``newest_id``: the highest snapshot id any of them holds data of, sealed or not."""

    manifests: dict[int, Manifest] = field(default_factory=dict)
    records: dict[PartKey, PartRecord] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    newest_id: int = -1

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


def _name(rec: PartRecord) -> str:
    return f"{rec.participant} {rec.kind} part of snapshot {rec.snapshot_id}"


def composed_chain(records: Mapping[PartKey, PartRecord], man: Manifest, p: str
                   ) -> list[PartRecord] | None:
    """The parts a restore of ``p`` at ``man`` reads first: the newest full part an SMP
    composed within the chain (one of ``records``, compaction records), then the chain's
    increments after it; ``None`` when no part of the chain was composed."""
    chain = list(man.chain(p))
    for i in range(len(chain) - 1, -1, -1):
        full = records.get((p, chain[i].snapshot_id, "full"))
        if full is not None and full.key != chain[i].key:
            return [full, *chain[i + 1:]]
    return None


def _checked(part: Any, rec: PartRecord) -> Any:
    if part.snapshot_id != rec.snapshot_id or part.kind != rec.kind:
        raise SnapshotError(f"{rec.participant}: part content does not match its record")
    return part


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
        stream_rows: compose a PS restore (``stage=``) with the rows of remote parts
            streamed into the tables rather than read into buffers first (parts of at
            least ``stream_min_bytes``).
    """

    def __init__(self, sources: Mapping[int, PartSource], local_host: int | None = None, *,
                 checkpoint_dir: str | None = None, job: str | None = None,
                 decode_threads: int = 1, read_threads: int = 2,
                 stream_rows: bool = True, stream_min_bytes: int = 1 << 20) -> None:
        self.sources = dict(sources)
        self.local_host = local_host
        self.checkpoint_dir = checkpoint_dir
        self.job = job
        self.decode_threads = int(decode_threads)
        self.read_threads = max(1, int(read_threads))
        self.stream_rows = bool(stream_rows)
        self.stream_min_bytes = int(stream_min_bytes)
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
            newest = got.get("newest_id", -1)  # a peer may send anything: ints only
            if isinstance(newest, int) and not isinstance(newest, bool):
                cat.newest_id = max(cat.newest_id, newest)
        cat.newest_id = max([cat.newest_id, *cat.manifests])
        for p in cat.problems:
            self._note(p)
        return cat

    # -- one part -------------------------------------------------------------------------------

    def part_bytes(self, rec: PartRecord) -> memoryview:
        """The verified bytes of a part (local map, home read, or erasure decode)."""
        why: list[str] = []
        view = self._local_copy(rec, why)
        return view if view is not None else self._remote_bytes(rec, why)

    def _local_copy(self, rec: PartRecord, why: list[str]) -> memoryview | None:
        """The local SMP's copy when this host is the part's home (``None``, with the
        reason in ``why`` when it was tried, otherwise)."""
        local = self.sources.get(self.local_host) if self.local_host is not None else None
        if local is None or rec.home != self.local_host:
            return None
        view = self._local(local, rec, why)
        if view is not None:
            self._note(f"{_name(rec)}: local SMP copy")
        return view

    def _remote_bytes(self, rec: PartRecord, why: list[str]) -> memoryview:
        """The part from the home's whole copy, else from any ``k`` blocks."""
        name = _name(rec)
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

    def _map_parts(self, recs: Sequence[PartRecord], read: Callable[[int, PartRecord], Any]
                   ) -> list[Any]:
        """``read(index, rec)`` of every chain part, ``read_threads`` at a time."""
        if self.read_threads == 1 or len(recs) == 1:
            return [read(j, rec) for j, rec in enumerate(recs)]
        with ThreadPoolExecutor(min(self.read_threads, len(recs)),
                                thread_name_prefix="restore-read") as pool:
            return list(pool.map(read, range(len(recs)), recs))

    def _decode_chain(self, recs: Sequence[PartRecord]) -> list[Any]:
        from monolith_py.snapshot.pspart import decode_part

        def read(j: int, rec: PartRecord) -> Any:
            return _checked(decode_part(self.part_bytes(rec), verified=True), rec)

        return self._map_parts(recs, read)

    def _compose(self, recs: Sequence[PartRecord], stage: Stage | None) -> Any:
        """The chain ``recs`` composed; into ``stage`` with the rows of the parts that are
        not local streamed from the peers when every data block can be read (see
        :meth:`_compose_streamed`), else from parts read whole."""
        from monolith_py.snapshot.compose import compose

        if stage is not None and self.stream_rows:
            staged: dict[tuple[str, int], Any] = {}
            first = stage

            def once(table: str, rows: int) -> Any:  # a second try refills the same arenas
                if (table, rows) not in staged:
                    staged[(table, rows)] = first(table, rows)
                return staged[(table, rows)]

            try:
                return self._compose_streamed(recs, once)
            except MonolithError as exc:
                self._note(f"{recs[-1].participant}: streaming the rows failed ({exc}); "
                           "reading the parts whole")
            stage = once
        return compose(self._decode_chain(recs), stage)

    def _compose_streamed(self, recs: Sequence[PartRecord], stage: Stage) -> Any:
        """Compose without a buffer for the row arrays of remote parts: read each such
        part's header, row metadata and small arrays (and the newest's live keys) from the
        hosts of its data blocks, resolve the chain, then stream the data blocks once and
        write each needed row straight into the staged tables while every block is checked
        against its sealed crc32c. A new process's memory is slow to fault in (here 3 s
        per GiB on first touch), and this way a restore from peers touches only the
        tables it fills."""
        from monolith_py.snapshot._fetch import RowTarget, fetch_sparse
        from monolith_py.snapshot.compose import compose
        from monolith_py.snapshot.pspart import decode_part

        newest = len(recs) - 1
        sparse: dict[int, Any] = {}

        def read(j: int, rec: PartRecord) -> Any:
            why: list[str] = []
            view = self._local_copy(rec, why)
            if view is not None:
                return _checked(decode_part(view, verified=True), rec)

            def want(array: str) -> bool:  # t<i>.<what>: rows stream, live keys: newest
                what = array.split(".", 1)[-1]
                return not (what == "w" or what.startswith("s.")) and (
                    what != "live" or j == newest)

            sp = fetch_sparse(self.sources, rec, why, want, self.stream_min_bytes)
            if sp is None:  # the home's whole copy, or decoded blocks
                return _checked(decode_part(self._remote_bytes(rec, why), verified=True), rec)
            hosts = ", ".join(str(rec.placement[i]) for i in range(rec.k))
            self._note(f"{_name(rec)}: data blocks read from hosts {hosts} while their rows "
                       f"stream into the tables, nothing to decode ({'; '.join(why)})")
            sparse[j] = sp
            return _checked(decode_part(sp.view, verified=True), rec)

        parts = self._map_parts(recs, read)
        if not sparse:  # all local (or read whole)
            return compose(parts, stage)
        plan: dict[Any, Any] = {}
        state = compose(parts, stage, deferred=set(sparse), plan=plan)
        targets: dict[int, list[Any]] = {j: [] for j in sparse}
        for (table, j), (src_rows, dest_rows, weights, slots) in plan.items():
            index = {t["name"]: i for i, t in enumerate(parts[j].meta["tables"])}[table]
            rows = parts[j].tables[table].weights.shape[0]
            for array, out in (("w", weights), *((f"s.{s}", a) for s, a in slots.items())):
                start, _ = sparse[j].entries[f"t{index}.{array}"]
                targets[j].append(RowTarget(start, rows, out, src_rows, dest_rows))

        order = sorted(sparse)
        self._map_parts([sparse[j].rec for j in order],
                        lambda i, rec: sparse[order[i]].fill(self.sources, targets[order[i]]))
        return state

    def _ps_state(self, cat: Catalog, p: str, man: Manifest, stage: Stage | None) -> Any:
        """Compose ``p``'s chain at ``man``, starting from the newest composed full part an
        SMP recorded in the chain (if it reads), else from the chain's own full part."""
        composed = composed_chain(cat.records, man, p)
        if composed is not None:
            try:
                return self._compose(composed, stage)
            except MonolithError as exc:
                self._note(f"{p}: composed full part of {composed[0].snapshot_id} unusable "
                           f"({exc}); trying the chain")
        return self._compose(list(man.chain(p)), stage)

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
