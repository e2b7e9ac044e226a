"""Universal checkpoints: a sealed snapshot on disk, independent of the shard count.

Layout of ``<root>/ckpt-<step:012d>-<snapshot id:08d>/``::

    manifest.json            format, job, ids, code version, tables, trainers, the sealed
                             snapshot manifest, and {file: {size, crc32c}} for every file
    tables/t<i>.mnf          one wire frame per table: every shard's rows merged and
                             key-sorted (keys, weights, slot.<s>, last_update,
                             update_count, row_version) + per source shard the scalars
                             (version, clock, counters) and arrays (src<j>.pending/.dk/
                             .dv/.filter)
    trainers/<rank>.safetensors  every tensor/array of the trainer state; the nested
                             structure (JSON) in the safetensors metadata — no pickle

Writing is atomic: everything goes to ``.tmp-*``, each file and the directory are fsynced,
the directory is renamed into place and the root fsynced. Reading verifies every file's
size and crc32c before decoding it.

**Resharding N -> M** (:meth:`UniversalState.shard_state`): keys are routed with
:func:`monolith_py.ps.routing.shard_of`; rows keep their slots, metadata and row version.
With ``M == N`` every per-shard scalar is restored exactly. Otherwise each new shard gets:
version and clock = the maxima over the sources; the admission filters merged by
saturating addition (same shape; every new shard gets the merged sketch, an upper bound of
each key's count); pending keys it owns; an empty deletion log (sync subscribers resync);
the counters (statistics) go to new shard 0 so job totals are unchanged.

:func:`load_checkpoint` / :func:`read_snapshot` give the same :class:`UniversalState`
(tables, trainers, manifest) — the reader serving uses for a cold start.

Example::

    >>> ckpt = load_checkpoint(find_checkpoints("/ckpts")[0])          # doctest: +SKIP
    >>> ckpt.tables["item"]["keys"], ckpt.trainer_state(0)[0]["trainer"]["model"]  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import crc32c
import numpy as np

from monolith_py.errors import CorruptDataError, DecodeError, InvalidInputError, SnapshotError
from monolith_py.snapshot.manifest import CODE_VERSION, Manifest
from monolith_py.snapshot.tree import flatten_state, unflatten_state
from monolith_py.wire import decode_arrays, plan_frame

__all__ = ["UniversalState", "read_snapshot", "write_checkpoint", "load_checkpoint",
           "find_checkpoints", "merge_shard_states", "CHECKPOINT_FORMAT"]

log = logging.getLogger("monolith.snapshot.checkpoint")

CHECKPOINT_FORMAT = "monolith.checkpoint/1"
_NAME = re.compile(r"^ckpt-(\d{12})-(\d{8})$")
_COUNTERS = ("admitted", "filtered", "evicted", "erased")
_ROW = ("last_update", "update_count", "row_version")


def _merge_filters(filters: list[np.ndarray]) -> np.ndarray:
    total = np.zeros(filters[0].shape, dtype=np.uint16)
    for f in filters:
        if f.shape != filters[0].shape or f.dtype != np.uint8:
            raise CorruptDataError("admission filters of different shapes cannot merge")
        total += f
        np.minimum(total, 255, out=total)
    return total.astype(np.uint8)


def merge_shard_states(states: list[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Merge the states of shards ``0..N-1`` into one universal state per table:
    ``{table: {keys, weights, slot.*, last_update, update_count, row_version, meta,
    sources: [per-shard scalars and arrays]}}`` (rows key-sorted)."""
    n = len(states)
    if not n:
        raise InvalidInputError("no shard states to merge")
    for i, s in enumerate(states):
        if s.get("shard_id") != i or s.get("num_shards") != n:
            raise CorruptDataError(f"shard state {i} claims shard {s.get('shard_id')} of "
                                   f"{s.get('num_shards')}, expected {i} of {n}")
    out: dict[str, dict[str, Any]] = {}
    for name in states[0]["tables"]:
        parts = [s["tables"][name] for s in states]
        arrays = ["weights", *_ROW, *[k for k in parts[0] if k.startswith("slot.")]]
        if n == 1:  # already key-sorted: no copy
            keys = np.asarray(parts[0]["keys"])
            t: dict[str, Any] = {"keys": keys, **{a: parts[0][a] for a in arrays}}
        else:
            keys = np.concatenate([p["keys"] for p in parts])
            order = np.argsort(keys, kind="stable")
            keys = keys[order]
            t = {"keys": keys}
            for a in arrays:
                t[a] = np.concatenate([p[a] for p in parts])[order]
        if keys.shape[0] > 1 and not (np.diff(keys) > 0).all():
            raise CorruptDataError(f"table {name!r}: a key is held by two shards")
        t["meta"] = {"name": name, "dim": int(parts[0]["dim"]),
                     "optimizer": parts[0]["optimizer"], "format": parts[0]["format"]}
        t["sources"] = [{
            "version": int(p["version"]), "clock": int(p["clock"]),
            "counters": {c: int(p[f"stat.{c}"]) for c in _COUNTERS},
            "pending": np.asarray(p["pending"]), "dk": np.asarray(p["deleted_keys"]),
            "dv": np.asarray(p["deleted_versions"]),
            "filter": None if "filter.counters" not in p else np.asarray(p["filter.counters"]),
        } for p in parts]
        out[name] = t
    return out


@dataclass
class UniversalState:
    """A sharding-independent snapshot: merged tables, trainer states, the manifest.

    Attributes:
        tables: ``{table: {keys, weights, slot.<s>, last_update, update_count,
            row_version, meta, sources}}``.
        trainers: ``{rank: (state, meta)}``.
        manifest: the sealed snapshot manifest (as JSON).
    """

    snapshot_id: int
    step: int
    job: str
    tables: dict[str, dict[str, Any]]
    trainers: dict[int, tuple[dict[str, Any], dict[str, Any]]]
    manifest: dict[str, Any] = field(default_factory=dict)
    path: str | None = None

    @property
    def num_shards(self) -> int:
        first = next(iter(self.tables.values()), None)
        return len(first["sources"]) if first is not None else 0

    def trainer_state(self, rank: int) -> tuple[dict[str, Any], dict[str, Any]]:
        if rank not in self.trainers:
            raise SnapshotError(f"no trainer {rank} in snapshot {self.snapshot_id} "
                                f"(have {sorted(self.trainers)})")
        return self.trainers[rank]

    def shard_state(self, shard_id: int, num_shards: int | None = None) -> dict[str, Any]:
        """The state of shard ``shard_id`` of ``num_shards`` (default: the source count)
        — a ``PSShard.load_state_dict`` input (see the module docstring for the rules)."""
        from monolith_py.ps.routing import ROUTING_VERSION, shard_of

        n_src = self.num_shards
        m = int(num_shards or n_src)
        if not 0 <= shard_id < m:
            raise InvalidInputError(f"need 0 <= shard_id < num_shards, got {shard_id}, {m}")
        tables = {}
        for name, t in self.tables.items():
            sel = shard_of(t["keys"], m) == shard_id
            src = t["sources"]
            sd: dict[str, Any] = {**t["meta"], "keys": t["keys"][sel]}
            for a in ("weights", *_ROW, *[k for k in t if k.startswith("slot.")]):
                sd[a] = t[a][sel]
            if m == n_src:
                s = src[shard_id]
                sd.update(version=s["version"], clock=s["clock"], pending=s["pending"].copy(),
                          deleted_keys=s["dk"].copy(), deleted_versions=s["dv"].copy())
                counters = s["counters"]
                flt = s["filter"]
            else:
                pend = np.unique(np.concatenate([s["pending"] for s in src]))
                sd.update(version=max(s["version"] for s in src),
                          clock=max(s["clock"] for s in src),
                          pending=pend[shard_of(pend, m) == shard_id],
                          deleted_keys=np.zeros(0, np.int64),
                          deleted_versions=np.zeros(0, np.int64))
                counters = {c: sum(s["counters"][c] for s in src) if shard_id == 0 else 0
                            for c in _COUNTERS}
                flts = [s["filter"] for s in src if s["filter"] is not None]
                flt = _merge_filters(flts) if flts else None
            for c in _COUNTERS:
                sd[f"stat.{c}"] = int(counters[c])
            if flt is not None:
                sd["filter.counters"] = flt.copy()
            tables[name] = sd
        return {"format": "monolith.ps_shard.v1", "shard_id": int(shard_id), "num_shards": m,
                "routing_version": ROUTING_VERSION, "tables": tables}


def read_snapshot(manifest: Manifest, recovery: Any) -> UniversalState:
    """Rebuild every part of a sealed snapshot through ``recovery`` (a
    :class:`~monolith_py.snapshot.recovery.Recovery`) into a :class:`UniversalState`."""
    ps = sorted((int(p.split("/")[1]), p) for p in manifest.parts if p.startswith("ps/"))
    states = [recovery.restore(p, manifest.snapshot_id).state for _, p in ps]
    if [i for i, _ in ps] != list(range(len(ps))):
        raise CorruptDataError(f"snapshot {manifest.snapshot_id} lacks some PS shards: {ps}")
    tables = merge_shard_states(states) if states else {}
    del states
    trainers = {}
    for p in manifest.parts:
        if p.startswith("trainer/"):
            r = recovery.restore(p, manifest.snapshot_id)
            trainers[int(p.split("/")[1])] = (r.state, r.meta)
    return UniversalState(manifest.snapshot_id, manifest.step, manifest.job, tables, trainers,
                          manifest.to_json())


# -- disk ------------------------------------------------------------------------------------------

def _write_file(path: str, data: Any) -> dict[str, int]:
    view = memoryview(data).cast("B")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        written = 0
        while written < view.nbytes:
            written += os.write(fd, view[written: written + (256 << 20)])
        os.fsync(fd)
    finally:
        os.close(fd)
    return {"size": view.nbytes, "crc32c": crc32c.crc32c(view)}


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_frame_file(path: str, arrays: Mapping[str, Any], meta: Mapping[str, Any]
                      ) -> dict[str, int]:
    """Write a wire frame to ``path`` array by array (no whole-frame copy in memory), fsync;
    returns its size and the crc32c of the whole file."""
    arrs = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    plan = plan_frame([(k, a.dtype, a.shape) for k, a in arrs.items()], meta)
    pieces: list[Any] = []
    pos = plan.payload_start
    for k, a in arrs.items():
        off = plan.offsets[k]
        if off > pos:
            pieces.append(bytes(off - pos))
        pieces.append(a.reshape(-1).view(np.uint8).data)
        pos = off + a.nbytes
    payload_crc = 0
    for piece in pieces:
        payload_crc = crc32c.crc32c(piece, payload_crc)
    head = plan.head(payload_crc)
    file_crc = crc32c.crc32c(head)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        for piece in [head, *pieces]:
            view = memoryview(piece).cast("B")
            done = 0
            while done < view.nbytes:
                done += os.write(fd, view[done: done + (256 << 20)])
            if piece is not head:
                file_crc = crc32c.crc32c(view, file_crc)
        os.fsync(fd)
    finally:
        os.close(fd)
    return {"size": plan.nbytes, "crc32c": file_crc}


def _table_arrays(t: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    arrays: dict[str, Any] = {"keys": t["keys"], "weights": t["weights"]}
    for a in (*_ROW, *[k for k in t if k.startswith("slot.")]):
        arrays[a] = t[a]
    sources = []
    for j, s in enumerate(t["sources"]):
        for a in ("pending", "dk", "dv"):
            arrays[f"src{j}.{a}"] = s[a]
        if s["filter"] is not None:
            arrays[f"src{j}.filter"] = s["filter"]
        sources.append({"version": s["version"], "clock": s["clock"], "counters": s["counters"],
                        "filter": s["filter"] is not None})
    m = t["meta"]
    return arrays, {"format": "monolith.universal_table/1", "name": m["name"],
                    "dim": m["dim"], "optimizer": m["optimizer"],
                    "table_format": m["format"], "sources": sources}


def _decode_table(buf: Any) -> dict[str, Any]:
    arrays, meta = decode_arrays(buf, require_checksum=True, copy=True)
    if meta.get("format") != "monolith.universal_table/1":
        raise DecodeError("not a universal table frame")
    try:
        t: dict[str, Any] = {k: arrays[k] for k in ("keys", "weights", *_ROW)}
        t.update({k: v for k, v in arrays.items() if k.startswith("slot.")})
        t["meta"] = {"name": meta["name"], "dim": int(meta["dim"]),
                     "optimizer": meta["optimizer"], "format": meta["table_format"]}
        t["sources"] = [{
            "version": int(s["version"]), "clock": int(s["clock"]),
            "counters": {c: int(s["counters"][c]) for c in _COUNTERS},
            "pending": arrays[f"src{j}.pending"], "dk": arrays[f"src{j}.dk"],
            "dv": arrays[f"src{j}.dv"],
            "filter": arrays[f"src{j}.filter"] if s["filter"] else None,
        } for j, s in enumerate(meta["sources"])]
    except (KeyError, TypeError, ValueError) as exc:
        raise DecodeError(f"universal table frame malformed: {exc}") from exc
    n = t["keys"].shape[0]
    if any(t[k].shape[0] != n for k in t if isinstance(t[k], np.ndarray)):
        raise DecodeError("universal table arrays differ in length")
    return t


def _trainer_file(state: Any, meta: Mapping[str, Any]) -> bytes:
    import safetensors.numpy

    arrays, skeleton = flatten_state(state)
    return safetensors.numpy.save(arrays, metadata={"tree": json.dumps(skeleton),
                                                    "meta": json.dumps(dict(meta))})


def _read_trainer(data: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    import safetensors.numpy

    try:
        n = struct.unpack("<Q", data[:8])[0]
        header = json.loads(data[8: 8 + n])
        md = header.get("__metadata__", {})
        skeleton, meta = json.loads(md["tree"]), json.loads(md["meta"])
        arrays = safetensors.numpy.load(data)
    except (struct.error, KeyError, ValueError, TypeError) as exc:
        raise DecodeError(f"trainer file malformed: {exc}") from exc
    state = unflatten_state(arrays, skeleton)
    if not isinstance(state, dict) or not isinstance(meta, dict):
        raise DecodeError("trainer file does not hold a state dict")
    return state, meta


def write_checkpoint(root: str, manifest: Manifest, recovery: Any,
                     state: UniversalState | None = None) -> str:
    """Write the universal checkpoint of sealed ``manifest`` under ``root`` atomically;
    returns its directory (an existing checkpoint of the same snapshot is kept)."""
    final = os.path.join(root, f"ckpt-{manifest.step:012d}-{manifest.snapshot_id:08d}")
    if os.path.isdir(final):
        return final
    os.makedirs(root, exist_ok=True)
    uni = state if state is not None else read_snapshot(manifest, recovery)
    tmp = os.path.join(root, f".tmp-{manifest.snapshot_id}-{os.urandom(4).hex()}")
    os.makedirs(os.path.join(tmp, "tables"))
    os.makedirs(os.path.join(tmp, "trainers"))
    try:
        files: dict[str, dict[str, int]] = {}
        tables = {}
        for i, (name, t) in enumerate(sorted(uni.tables.items())):
            rel = f"tables/t{i}.mnf"
            files[rel] = _write_frame_file(os.path.join(tmp, rel), *_table_arrays(t))
            tables[name] = {"file": rel, "dim": t["meta"]["dim"],
                            "optimizer": t["meta"]["optimizer"], "num_keys": int(t["keys"].shape[0])}
        trainers = {}
        for rank, (st, meta) in sorted(uni.trainers.items()):
            rel = f"trainers/{rank}.safetensors"
            files[rel] = _write_file(os.path.join(tmp, rel), _trainer_file(st, meta))
            trainers[str(rank)] = {"file": rel}
        doc = {"format": CHECKPOINT_FORMAT, "job": uni.job, "snapshot_id": uni.snapshot_id,
               "step": uni.step, "code_version": CODE_VERSION, "num_shards": uni.num_shards,
               "tables": tables, "trainers": trainers, "files": files,
               "snapshot_manifest": uni.manifest}
        _write_file(os.path.join(tmp, "manifest.json"),
                    json.dumps(doc, indent=1, sort_keys=True).encode())
        for d in ("tables", "trainers", ""):
            _fsync_dir(os.path.join(tmp, d))
        os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("universal checkpoint of snapshot %d (step %d) written to %s", uni.snapshot_id,
             uni.step, final)
    return final


def find_checkpoints(root: str) -> list[str]:
    """Complete checkpoint directories under ``root``, newest (step, id) first."""
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    found = sorted((m.groups(), n) for n in names if (m := _NAME.match(n)))
    return [os.path.join(root, n) for _, n in reversed(found)]


def _read_verified(path: str, rel: str, files: Mapping[str, Any]) -> bytes:
    info = files.get(rel)
    if not isinstance(info, dict) or os.path.isabs(rel) or ".." in rel.split("/"):
        raise CorruptDataError(f"checkpoint file {rel!r} is not listed in its manifest")
    with open(os.path.join(path, rel), "rb") as f:
        data = f.read()
    if len(data) != info.get("size") or crc32c.crc32c(data) != info.get("crc32c"):
        raise CorruptDataError(f"checkpoint file {rel} is truncated or corrupt")
    return data


def load_checkpoint(path: str) -> UniversalState:
    """Read and verify a checkpoint directory (raises :class:`DecodeError` /
    :class:`CorruptDataError`)."""
    try:
        with open(os.path.join(path, "manifest.json"), "rb") as f:
            doc = json.loads(f.read())
    except (OSError, ValueError) as exc:
        raise CorruptDataError(f"checkpoint {path}: manifest unreadable ({exc})") from exc
    if not isinstance(doc, dict) or doc.get("format") != CHECKPOINT_FORMAT:
        raise DecodeError(f"checkpoint {path}: not a {CHECKPOINT_FORMAT} manifest")
    try:
        files = doc["files"]
        tables = {name: _decode_table(_read_verified(path, info["file"], files))
                  for name, info in doc["tables"].items()}
        trainers = {int(r): _read_trainer(_read_verified(path, info["file"], files))
                    for r, info in doc["trainers"].items()}
        return UniversalState(int(doc["snapshot_id"]), int(doc["step"]), str(doc["job"]),
                              tables, trainers, dict(doc.get("snapshot_manifest", {})), path)
    except (KeyError, TypeError, ValueError, OSError) as exc:
        raise CorruptDataError(f"checkpoint {path}: {type(exc).__name__}: {exc}") from exc
