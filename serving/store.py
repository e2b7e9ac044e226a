"""``ServingStore``: what a serving worker holds: read-only replicas + the dense model.

It is three things at once:

* the :class:`~monolith_py.sync.protocol.DeltaSink` the shard subscribers feed
  (positions per shard, ordered and idempotent apply, dense swaps);
* a read-only :class:`~monolith_py.table.backend.SparseBackend` (``lookup(train=False)``),
  so the model classes of :mod:`monolith_py.modules` run unchanged on the replicas;
* the predictor: ``predict`` builds one KJT from several prepared requests and runs the
  model once.

Atomicity: one lock covers applying a delta or a dense update and running a prediction,
so a prediction never sees half a delta (deltas are decoded and validated by the
subscriber threads before they take the lock; only the index/arena writes happen under
it). A changed model spec is built outside the lock and swapped in.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from monolith_py.errors import ConfigError, InvalidInputError, UnavailableError
from monolith_py.modules.spec import ModelSpec
from monolith_py.observe.metrics import counter, gauge, histogram
from monolith_py.sync.protocol import (
    DenseUpdate,
    Heartbeat,
    ShardDelta,
    ShardPosition,
    Verdict,
    classify,
)
from monolith_py.sync.replica import ReplicaTable

__all__ = ["ServingStore", "Prepared"]

log = logging.getLogger("monolith.serving")

_INT64_MIN = np.iinfo(np.int64).min


@dataclass(frozen=True)
class Prepared:
    """One request's examples, validated and converted (see :meth:`ServingStore.prepare`).

    Attributes:
        n: number of examples.
        dense: float32 ``[n, num_dense]``.
        lengths: int64 ``[F, n]`` ids per (feature, example), features in model order.
        values: per feature, int64 ids of its ``n`` examples, concatenated.
        token: the model build this was prepared for.
    """

    n: int
    dense: np.ndarray
    lengths: np.ndarray
    values: tuple[np.ndarray, ...]
    token: int


class ServingStore:
    """Replicas of every table of every shard, positions, and the dense model.

    Args:
        shards: number of PS shards followed (readiness waits for each).
        fp16: keep rows as float16.
        clock: wall-clock seconds (for "last sync" times).
        torch_threads: intra-op threads for building/loading models on the subscriber
            threads (OpenMP settings are per thread).
    """

    def __init__(self, shards: int, *, fp16: bool = False, clock: Any = time.time,
                 torch_threads: int = 1) -> None:
        if shards < 1:
            raise ConfigError(f"a serving store follows at least one shard, got {shards}")
        self.shards = int(shards)
        self.fp16 = bool(fp16)
        self._threads = int(torch_threads)
        self._clock = clock
        self._lock = threading.Lock()
        self._replicas: dict[str, ReplicaTable] = {}
        self._positions: dict[int, ShardPosition] = {}
        self._last_sync: dict[int, float] = {}
        self._model: torch.nn.Module | None = None
        self._spec: ModelSpec | None = None
        self._dense_ident: tuple[int, int] | None = None
        self._dense_at = 0.0
        self._token = 0
        self._version = ""
        self._m_apply = counter("monolith_serving_deltas_total",
                                "Deltas received by verdict.", ["shard", "verdict"])
        self._m_rows = counter("monolith_serving_rows_applied_total", "Rows upserted.", ["shard"])
        self._m_del = counter("monolith_serving_rows_deleted_total", "Rows deleted.", ["shard"])
        self._m_dense = counter("monolith_serving_dense_updates_total",
                                "Dense updates by outcome.", ["outcome"])
        self._m_apply_s = histogram("monolith_serving_apply_seconds",
                                    "Time to apply one delta under the store lock.")
        self._m_size = gauge("monolith_serving_table_rows", "Rows held per table.", ["table"])
        self._m_sync = gauge("monolith_serving_last_sync_timestamp_seconds",
                             "Wall time of the last message from each shard.", ["shard"])

    # -- DeltaSink ------------------------------------------------------------------------

    def position(self, shard: int) -> ShardPosition | None:
        with self._lock:
            return self._positions.get(int(shard))

    def dense_ident(self) -> tuple[int, int] | None:
        with self._lock:
            return self._dense_ident

    def heartbeat(self, beat: Heartbeat) -> bool:
        with self._lock:
            self._touch(beat.shard)
            have = self._positions.get(beat.shard)
            return have is not None and have.epoch == beat.position.epoch and dict(
                have.versions) == dict(beat.position.versions)

    def _touch(self, shard: int) -> None:
        now = self._clock()
        self._last_sync[shard] = now
        self._m_sync.labels(shard=str(shard)).set(now)

    def _check_delta(self, delta: ShardDelta) -> str | None:
        """Why ``delta`` cannot be applied to the replicas, or None (lock held)."""
        if not 0 <= delta.shard < self.shards:
            return f"shard {delta.shard} is not one of the {self.shards} followed"
        dims = self._spec.table_dims() if self._spec is not None else {}
        for name, p in delta.tables.items():
            want = self._replicas[name].dim if name in self._replicas else dims.get(name)
            if want is not None and want != p.dim:
                return f"table {name!r}: delta dim {p.dim}, serving dim {want}"
            if (p.keys.shape[0] and (p.keys == _INT64_MIN).any()) or (
                    p.deleted.shape[0] and (p.deleted == _INT64_MIN).any()):
                return f"table {name!r}: reserved key INT64_MIN"
        return None

    def apply_delta(self, delta: ShardDelta) -> Verdict:
        """Apply ``delta`` per :func:`~monolith_py.sync.protocol.classify` (atomically)."""
        shard = str(delta.shard)
        t0 = time.perf_counter()
        with self._lock:
            verdict = classify(self._positions.get(delta.shard), delta)
            problem = self._check_delta(delta) if verdict == "apply" else None
            if problem is not None:
                log.warning("refusing a delta of shard %d: %s", delta.shard, problem)
                verdict = "refuse"
            self._touch(delta.shard)
            if verdict == "apply":
                self._apply_locked(delta)
        self._m_apply.labels(shard=shard, verdict=verdict).inc()
        if verdict == "apply":
            self._m_apply_s.observe(time.perf_counter() - t0)
            self._m_rows.labels(shard=shard).inc(delta.num_rows)
            self._m_del.labels(shard=shard).inc(delta.num_deleted)
        return verdict

    def _apply_locked(self, delta: ShardDelta) -> None:
        for name, p in delta.tables.items():
            rep = self._replicas.get(name)
            if rep is None:
                rep = self._replicas[name] = ReplicaTable(name, p.dim, fp16=self.fp16)
            rows = p.rows.astype(rep.dtype, copy=False)
            if delta.full:
                rep.replace_owner(delta.shard, p.keys, rows)
            else:
                rep.erase(p.deleted)
                rep.upsert(p.keys, rows, delta.shard)
            self._m_size.labels(table=name).set(len(rep))
        if delta.full:  # tables the shard no longer has
            for name, rep in self._replicas.items():
                if name not in delta.tables:
                    rep.replace_owner(delta.shard, np.zeros(0, np.int64),
                                      np.zeros((0, rep.dim), rep.dtype))
            versions = delta.position_after()
        else:
            versions = {**self._positions[delta.shard].versions, **delta.position_after()}
        self._positions[delta.shard] = ShardPosition(delta.epoch, versions)
        self._version = self._version_string()

    def apply_dense(self, dense: DenseUpdate) -> bool:
        """Swap in the dense model of ``dense``; False (nothing changed) when invalid."""
        torch.set_num_threads(self._threads)  # this runs on a subscriber thread
        try:
            spec = ModelSpec.from_dict(dense.spec)
        except ConfigError as exc:
            return self._dense_fail("bad_spec", exc)
        with self._lock:
            same = self._spec == spec and self._model is not None
            model = self._model if same else None
            for t in spec.tables:
                rep = self._replicas.get(t.name)
                if rep is not None and rep.dim != t.dim:
                    return self._dense_fail("dim_mismatch", InvalidInputError(
                        f"table {t.name!r} has dim {t.dim} in the spec, {rep.dim} in the "
                        "replicas"))
        if model is None:
            try:
                model = spec.build(backend=self, seed=0)  # type: ignore[arg-type]
            except Exception as exc:  # noqa: BLE001 - a hostile spec may fail anywhere
                return self._dense_fail("build_failed", exc)
            model.eval()
        try:
            state = _checked_state(model, dense.tensors)
        except InvalidInputError as exc:
            return self._dense_fail("bad_tensors", exc)
        with self._lock:
            if same and self._model is not model:  # rebuilt meanwhile: try again later
                return self._dense_fail("raced", InvalidInputError("model changed meanwhile"))
            with torch.no_grad():
                for name, t in model.state_dict().items():
                    t.copy_(state[name])
            if not same:
                self._model, self._spec = model, spec
                self._token += 1
            self._dense_ident = dense.ident
            self._dense_at = self._clock()
            self._version = self._version_string()
        self._m_dense.labels(outcome="applied").inc()
        return True

    def _dense_fail(self, why: str, exc: BaseException) -> bool:
        log.warning("refusing a dense update (%s): %s", why, exc)
        self._m_dense.labels(outcome=why).inc()
        return False

    def _version_string(self) -> str:
        parts = [f"d{self._dense_ident[1] if self._dense_ident else 0}"]
        for s in range(self.shards):
            p = self._positions.get(s)
            parts.append(f"s{s}.{p.epoch:x}.{sum(p.versions.values())}" if p else f"s{s}.none")
        return "-".join(parts)

    # -- SparseBackend (read-only) ----------------------------------------------------------

    def lookup(self, keys: Mapping[str, torch.Tensor], train: bool) -> dict[str, torch.Tensor]:
        """Rows of unique keys per table (absent keys and tables read zeros). Called by the
        model inside :meth:`predict`, which holds the lock."""
        out = {}
        for name, k in keys.items():
            rep = self._replicas.get(name)
            kn = k.numpy()
            if rep is None:
                dim = self._spec.table_dims()[name] if self._spec is not None else 1
                out[name] = torch.zeros(kn.shape[0], dim)
            else:
                out[name] = torch.from_numpy(rep.lookup(kn))
        return out

    def apply_gradients(self, grads: Any, now: int) -> None:
        raise InvalidInputError("the serving store is read-only; train on the PS")

    def evict_expired(self, now: int) -> dict[str, int]:
        return {}

    def stats(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {n: {"size": len(r), "dim": r.dim, "dtype": str(r.dtype),
                        "memory_bytes": r.memory_bytes} for n, r in self._replicas.items()}

    # -- serving --------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """A model is loaded and every shard has been synced at least once."""
        with self._lock:
            return self._model is not None and len(self._positions) == self.shards

    def features(self) -> tuple[tuple[str, ...], int, int] | None:
        """``(feature names, num_dense, model token)`` of the loaded model, or None."""
        with self._lock:
            if self._spec is None:
                return None
            return self._spec.feature_names, self._spec.num_dense, self._token

    def prepare(self, features: Sequence[Mapping[str, Sequence[int]]],
                dense: Sequence[Sequence[float]]) -> Prepared:
        """Validate and convert one request's examples (``features[i]``: ``{name: ids}``,
        ``dense[i]``: floats). Missing features are empty bags; unknown ones, a dense
        width other than the model's, or a reserved id raise
        :class:`~monolith_py.errors.InvalidInputError`; no model raises
        :class:`~monolith_py.errors.UnavailableError`."""
        info = self.features()
        if info is None:
            raise UnavailableError("no model loaded yet; wait for /readyz")
        names, num_dense, token = info
        n = len(features)
        known = set(names)
        for i, f in enumerate(features):
            if not known.issuperset(f):
                bad = sorted(set(f) - known)
                raise InvalidInputError(
                    f"examples[{i}]: unknown feature(s) {bad[:8]}; the model's features are "
                    f"{list(names)}")
        lengths = np.zeros((len(names), n), dtype=np.int64)
        values = []
        for j, name in enumerate(names):
            ids = [f.get(name, ()) for f in features]
            lengths[j] = [len(x) for x in ids]
            total = int(lengths[j].sum())
            v = np.fromiter((x for lst in ids for x in lst), dtype=np.int64, count=total)
            if total and (v == _INT64_MIN).any():
                raise InvalidInputError(f"feature {name!r}: id {_INT64_MIN} is reserved")
            values.append(v)
        widths = {len(d) for d in dense}
        if widths - {num_dense} and not (num_dense == 0 and widths <= {0}):
            i = next(i for i, d in enumerate(dense) if len(d) != num_dense)
            raise InvalidInputError(
                f"examples[{i}]: dense has {len(dense[i])} values, the model takes {num_dense}")
        d = (np.asarray(dense, dtype=np.float32).reshape(n, num_dense) if num_dense
             else np.zeros((n, 0), dtype=np.float32))
        return Prepared(n, d, lengths, tuple(values), token)

    def predict(self, batch: Sequence[Prepared]) -> tuple[list[np.ndarray], str]:
        """Scores (sigmoid of the logits) of every prepared request, from one model call;
        returns ``(per-request float32 scores, model version string)``."""
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        dense = np.concatenate([p.dense for p in batch]) if len(batch) > 1 else batch[0].dense
        lengths = (np.concatenate([p.lengths for p in batch], axis=1) if len(batch) > 1
                   else batch[0].lengths)
        nf = lengths.shape[0]
        values = np.concatenate([p.values[j] for j in range(nf) for p in batch])
        with self._lock:
            if self._model is None or self._spec is None:
                raise UnavailableError("no model loaded")
            if any(p.token != self._token for p in batch):
                raise UnavailableError("the model changed while the request waited; retry")
            kjt = KeyedJaggedTensor(keys=list(self._spec.feature_names),
                                    values=torch.from_numpy(values),
                                    lengths=torch.from_numpy(lengths.reshape(-1)))
            with torch.inference_mode():
                logits = self._model(torch.from_numpy(dense), kjt)
            version = self._version
        scores = torch.sigmoid(logits).numpy()
        out, start = [], 0
        for p in batch:
            out.append(scores[start:start + p.n])
            start += p.n
        return out, version

    def info(self) -> dict[str, Any]:
        """What ``GET /v1/model`` returns."""
        now = self._clock()
        with self._lock:
            spec = self._spec
            return {
                "ready": self._model is not None and len(self._positions) == self.shards,
                "version": self._version,
                "model": None if spec is None else {
                    "kind": spec.kind, "num_dense": spec.num_dense,
                    "features": list(spec.feature_names),
                    "dense_epoch": self._dense_ident[0] if self._dense_ident else None,
                    "dense_version": self._dense_ident[1] if self._dense_ident else None,
                    "loaded_s_ago": round(now - self._dense_at, 3)},
                "shards": [{
                    "shard": s,
                    "epoch": self._positions[s].epoch if s in self._positions else None,
                    "versions": dict(self._positions[s].versions) if s in self._positions
                    else {},
                    "last_sync_s_ago": (round(now - self._last_sync[s], 3)
                                        if s in self._last_sync else None),
                } for s in range(self.shards)],
                "tables": {n: {"size": len(r), "dim": r.dim, "dtype": str(r.dtype),
                               "memory_bytes": r.memory_bytes}
                           for n, r in self._replicas.items()},
            }

    def replica(self, name: str) -> ReplicaTable | None:
        """The replica of table ``name`` (tests; do not write to it)."""
        return self._replicas.get(name)


def _checked_state(model: torch.nn.Module, tensors: Mapping[str, np.ndarray]
                   ) -> dict[str, torch.Tensor]:
    """``tensors`` as torch tensors matching ``model.state_dict()`` exactly (names,
    shapes; cast to the model's dtypes)."""
    want = model.state_dict()
    missing = sorted(set(want) - set(tensors))
    extra = sorted(set(tensors) - set(want))
    if missing or extra:
        raise InvalidInputError(f"dense tensors do not match the model: missing "
                                f"{missing[:8]}, unexpected {extra[:8]}")
    out = {}
    for name, t in want.items():
        arr = tensors[name]
        if tuple(arr.shape) != tuple(t.shape):
            raise InvalidInputError(f"dense tensor {name!r}: shape {tuple(arr.shape)}, "
                                    f"the model has {tuple(t.shape)}")
        if arr.dtype.kind not in "fiub":
            raise InvalidInputError(f"dense tensor {name!r}: dtype {arr.dtype}")
        out[name] = torch.from_numpy(np.array(arr)).to(t.dtype)
    return out
