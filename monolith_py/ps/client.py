"""``PSClient``: the trainer's side of the parameter server, over gRPC.

A :class:`~monolith_py.table.backend.SparseBackend`, so
``DynamicEmbeddingBagCollection(tables, backend=PSClient(addresses))`` and
:class:`~monolith_py.training.OnlineTrainer` work unchanged. Per call it

1. validates everything locally (unknown tables, dtypes, shapes, NaN gradients) before
   sending anything, so a bad call changes no shard;
2. routes each table's keys to their shards (:func:`~monolith_py.ps.routing.route`),
   merging repeated keys of a push (one update per key);
3. packs each shard's keys into messages under ``max_message_bytes`` (request *and*
   answer), issues **all** of them at once (gRPC futures) and puts the rows back in the
   caller's order.

Pushes are asynchronous by default (``async_push``): ``apply_gradients`` returns once the
messages are sent, and the next call waits for them first (a pull is never issued before
the previous push is applied, so results equal the synchronous ones). A push's error
therefore surfaces from the next call, or from :meth:`PSClient.flush`.

Failures: a message answered ``UNAVAILABLE`` (shard down, connection refused) is retried
with exponential backoff until the operation's deadline (``deadline_s``); pushes carry a
``(client, seq)`` id so a retried push is applied once. Past the deadline the call raises
:class:`~monolith_py.errors.UnavailableError` or
:class:`~monolith_py.errors.DeadlineExceededError` (both retriable) naming the shard, or a
:class:`~monolith_py.errors.ShardError` naming each one when several failed. A bad
request answered ``INVALID_ARGUMENT`` raises :class:`~monolith_py.errors.InvalidInputError`.
No call waits longer than its deadline plus a second.

Not thread-safe: one trainer thread drives one client.
"""

from __future__ import annotations

import heapq
import queue
import random
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import torch

from monolith_py.errors import (
    ConfigError,
    DeadlineExceededError,
    InvalidInputError,
    MonolithError,
    ShardError,
    UnavailableError,
)
from monolith_py.observe.metrics import counter, histogram
from monolith_py.ps import _protocol as proto
from monolith_py.ps import _router
from monolith_py.ps._memory import retain_freed_memory
from monolith_py.ps.routing import ROUTING_VERSION
from monolith_py.ps.server import channel_options
from monolith_py.ps.shard import table_config_dict
from monolith_py.table import TableConfig

__all__ = ["ClientOptions", "PSClient", "parse_addresses"]

_RETRIABLE = (grpc.StatusCode.UNAVAILABLE,)


def parse_addresses(spec: str | Sequence[str]) -> list[str]:
    """``"h:p,h:p"`` or a list -> ``["h:p", ...]`` (shard ``i`` at position ``i``)."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = [a.strip() for a in items if a and a.strip()]
    if not out:
        raise ConfigError(f"need at least one PS address host:port, got {spec!r}")
    for a in out:
        host, sep, port = a.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"PS address {a!r} is not host:port (e.g. 127.0.0.1:50051)")
    return out


@dataclass(frozen=True)
class ClientOptions:
    """Settings of :class:`PSClient`.

    Args:
        deadline_s: longest time one operation (with its retries) may take.
        connect_timeout_s: how long :meth:`PSClient.connect` waits for every shard.
        backoff_initial_s / backoff_max_s: retry delays (doubling, with jitter).
        max_message_bytes: largest message either way; must not exceed the shards'.
        async_push: return from ``apply_gradients`` once sent (see the module docstring).
        checksum: put a CRC-32C on every frame (the server requires it by default).
    """

    deadline_s: float = 60.0
    connect_timeout_s: float = 120.0
    backoff_initial_s: float = 0.05
    backoff_max_s: float = 1.0
    max_message_bytes: int = proto.DEFAULT_MAX_MESSAGE_BYTES
    async_push: bool = True
    checksum: bool = True

    def __post_init__(self) -> None:
        for name in ("deadline_s", "connect_timeout_s", "backoff_initial_s", "backoff_max_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ConfigError(f"ClientOptions.{name} must be a positive number, got {v!r}")
        if self.backoff_max_s < self.backoff_initial_s:
            raise ConfigError("ClientOptions.backoff_max_s must be >= backoff_initial_s")
        m = self.max_message_bytes
        if isinstance(m, bool) or not isinstance(m, int) or not 1 << 17 <= m <= 1 << 30:
            raise ConfigError(
                f"ClientOptions.max_message_bytes must be an int in [128 KiB, 1 GiB], got {m!r}")


class _Calls:
    """One operation: several messages to several shards, driven to completion with
    retries (private)."""

    def __init__(self, client: PSClient, method: str, op: str,
                 messages: list[tuple[int, bytes]]) -> None:
        self.c, self.method, self.op, self.messages = client, method, op, messages
        self.started = time.monotonic()
        self.deadline = self.started + client.options.deadline_s
        self.results: list[bytes | None] = [None] * len(messages)
        self.attempts = [0] * len(messages)
        self.last: dict[int, BaseException] = {}
        self.failed: dict[int, BaseException] = {}
        self.inflight: dict[int, Any] = {}
        self.done: queue.SimpleQueue[tuple[int, Any]] = queue.SimpleQueue()
        self.retry: list[tuple[float, int]] = []
        for i in range(len(messages)):
            self._issue(i)

    def _issue(self, i: int) -> None:
        shard, payload = self.messages[i]
        self.attempts[i] += 1
        timeout = max(self.deadline - time.monotonic(), 0.001)
        fut = self.c._stubs[shard][self.method].future(payload, timeout=timeout)
        self.inflight[i] = fut
        fut.add_done_callback(lambda f, i=i: self.done.put((i, f)))

    def wait(self) -> list[bytes]:
        while self.inflight or self.retry:
            now = time.monotonic()
            while self.retry and self.retry[0][0] <= now:
                self._issue(heapq.heappop(self.retry)[1])
            wake = self.deadline + 1.0  # in-flight calls end by the deadline (gRPC timeout)
            if self.retry:
                wake = min(wake, self.retry[0][0])
            try:
                i, fut = self.done.get(timeout=max(wake - now, 0.0))
            except queue.Empty:
                if time.monotonic() >= self.deadline + 1.0:
                    self._give_up()
                    break
                continue
            if self.inflight.get(i) is not fut:
                continue
            del self.inflight[i]
            self._settle(i, fut)
        if self.failed:
            raise self.c._error(self.op, self.failed, self.messages, self.attempts,
                                time.monotonic() - self.started)
        self.c._latency.labels(op=self.op).observe(time.monotonic() - self.started)
        return [r if r is not None else b"" for r in self.results]

    def _settle(self, i: int, fut: Any) -> None:
        try:
            self.results[i] = fut.result()
            return
        except grpc.RpcError as exc:
            err: BaseException = exc
            code = exc.code() if hasattr(exc, "code") else None
        except grpc.FutureCancelledError as exc:  # pragma: no cover - we never cancel early
            err, code = exc, grpc.StatusCode.CANCELLED
        self.last[i] = err
        delay = min(self.c.options.backoff_max_s,
                    self.c.options.backoff_initial_s * 2 ** (self.attempts[i] - 1))
        delay *= random.uniform(0.5, 1.0)
        if code in _RETRIABLE and time.monotonic() + delay < self.deadline:
            self.c._retries.labels(shard=str(self.messages[i][0])).inc()
            heapq.heappush(self.retry, (time.monotonic() + delay, i))
        else:
            self.failed[i] = err

    def _give_up(self) -> None:
        for i, fut in list(self.inflight.items()):
            fut.cancel()
            self.failed[i] = self.last.get(i) or DeadlineExceededError("no answer")
        self.inflight.clear()
        for _, i in self.retry:
            self.failed[i] = self.last.get(i) or DeadlineExceededError("no answer")
        self.retry.clear()


class PSClient:
    """Sparse backend over PS shards at ``addresses`` (shard ``i`` at position ``i``).

    Args:
        addresses: ``["host:port", ...]`` or ``"host:port,host:port"``.
        tables: the job's table configs; when given, :meth:`connect` checks that every
            shard holds them with the same ``dim`` (else the shards' tables are used).
        options: :class:`ClientOptions`.
        connect: call :meth:`connect` now (waits for every shard's ``Health``).

    Shapes: as :class:`~monolith_py.table.backend.SparseBackend` -- ``lookup({table:
    int64 [n]})`` returns ``{table: float32 [n, dim]}``.

    Example::

        >>> client = PSClient("127.0.0.1:50051,127.0.0.1:50052")       # doctest: +SKIP
        >>> ebc = DynamicEmbeddingBagCollection(tables, backend=client)  # doctest: +SKIP
    """

    def __init__(self, addresses: str | Sequence[str],
                 tables: Sequence[TableConfig] | None = None,
                 options: ClientOptions | None = None, connect: bool = True) -> None:
        self.addresses = parse_addresses(addresses)
        self.options = options or ClientOptions()
        retain_freed_memory()  # see monolith_py/ps/_memory.py
        self._tables = list(tables) if tables is not None else None
        self._dims: dict[str, int] = {t.name: t.dim for t in self._tables or []}
        opts = channel_options(self.options.max_message_bytes)
        self._channels = [grpc.insecure_channel(a, options=opts) for a in self.addresses]
        self._stubs = [
            {m: ch.unary_unary(proto.path(m), request_serializer=None,
                               response_deserializer=None) for m in proto.METHODS}
            for ch in self._channels
        ]
        self._budget = self.options.max_message_bytes - proto.HEADER_ALLOWANCE
        self._limits = proto.limits_for(self.options.max_message_bytes)
        self._client_id = uuid.uuid4().hex
        self._seq = 0
        self._pending_push: _Calls | None = None
        self._connected = False
        self.last_error: BaseException | None = None
        self._latency = histogram("monolith_ps_client_seconds",
                                  "PS client operation time (all shards, with retries).",
                                  ["op"])
        self._retries = counter("monolith_ps_client_retries_total",
                                "PS client messages retried after UNAVAILABLE.", ["shard"])
        if connect:
            self.connect()

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def num_shards(self) -> int:
        return len(self.addresses)

    @property
    def dims(self) -> dict[str, int]:
        """``{table: dim}`` (known after :meth:`connect`)."""
        return dict(self._dims)

    def connect(self, timeout_s: float | None = None) -> dict[int, dict[str, Any]]:
        """Wait until every shard answers ``Health`` (at most ``timeout_s``, default
        ``options.connect_timeout_s``), then check that shard ``i`` is shard ``i`` of
        ``len(addresses)``, routes like this client and holds the expected tables.
        Returns each shard's info."""
        wait = self.options.connect_timeout_s if timeout_s is None else float(timeout_s)
        deadline = time.monotonic() + wait
        infos: dict[int, dict[str, Any]] = {}
        errors: dict[object, BaseException] = {}
        for i, addr in enumerate(self.addresses):
            try:
                grpc.channel_ready_future(self._channels[i]).result(
                    timeout=max(deadline - time.monotonic(), 0.001))
                raw = self._stubs[i][proto.HEALTH](
                    proto.encode_meta({}), timeout=max(deadline - time.monotonic(), 0.001))
                infos[i] = proto.decode(raw, self._limits)[1].get("info", {})
            except grpc.FutureTimeoutError:
                errors[f"{i} ({addr})"] = UnavailableError(
                    f"PS shard {i} at {addr} did not become ready within {wait:.1f} s")
            except grpc.RpcError as exc:
                errors[f"{i} ({addr})"] = UnavailableError(
                    f"PS shard {i} at {addr}: Health failed: {exc.code().name} "
                    f"{exc.details()}")
        if errors:
            raise (next(iter(errors.values())) if len(errors) == 1
                   else ShardError("connect", errors))
        self._check_infos(infos)
        self._connected = True
        return infos

    def _check_infos(self, infos: Mapping[int, Mapping[str, Any]]) -> None:
        n = self.num_shards
        dims: dict[str, int] | None = None
        for i, info in infos.items():
            where = f"PS shard at {self.addresses[i]} (position {i})"
            if info.get("shard_id") != i or info.get("num_shards") != n:
                raise ConfigError(
                    f"{where} is shard {info.get('shard_id')} of {info.get('num_shards')}, "
                    f"expected shard {i} of {n}; list the addresses in shard order")
            if info.get("routing_version") != ROUTING_VERSION:
                raise ConfigError(f"{where} routes with version {info.get('routing_version')}"
                                  f", this client with {ROUTING_VERSION}")
            tables = info.get("tables", {})
            got = {t: int(v["dim"]) for t, v in tables.items()}
            if dims is not None and got != dims:
                raise ConfigError(f"{where} holds tables {got}, shard 0 holds {dims}")
            dims = got
        assert dims is not None
        if self._tables is not None:
            ref = infos[0].get("tables", {})
            for t in self._tables:
                if dims.get(t.name) != t.dim:
                    raise ConfigError(
                        f"table {t.name!r} (dim {t.dim}) is not on the shards as configured: "
                        f"they hold {dims}; start the shards with the same job config")
                mine = table_config_dict(t)
                theirs = ref.get(t.name, {}).get("config")
                if isinstance(theirs, dict) and theirs != mine:
                    diff = sorted(k for k in set(mine) | set(theirs)
                                  if mine.get(k) != theirs.get(k))
                    raise ConfigError(
                        f"table {t.name!r} differs between this trainer and the PS shards in "
                        f"{diff} (trainer: {[mine.get(k) for k in diff]}, shards: "
                        f"{[theirs.get(k) for k in diff]}); start every role with the same "
                        "job config")
        self._dims = dims

    def close(self) -> None:
        """Wait for an outstanding push, then close the channels."""
        try:
            self.flush()
        finally:
            for ch in self._channels:
                ch.close()

    def __enter__(self) -> PSClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def flush(self) -> None:
        """Wait until the last ``apply_gradients`` is applied on every shard (raises its
        error, if any)."""
        pending, self._pending_push = self._pending_push, None
        if pending is not None:
            self._guard(pending.wait)

    # -- SparseBackend ------------------------------------------------------------------------

    def _ready(self) -> None:
        if not self._connected:
            self.connect()
        self.flush()

    def _guard(self, fn: Any) -> Any:
        try:
            return fn()
        except MonolithError as exc:
            self.last_error = exc
            raise

    def lookup(self, keys: Mapping[str, torch.Tensor], train: bool) -> dict[str, torch.Tensor]:
        self._ready()
        checked = _router.check_keys(keys, self._dims)
        out = _router.new_rows(checked, self._dims)
        plan: list[list[tuple[_router.Part, int, int]]] = []
        messages: list[tuple[int, bytes]] = []
        cost = {t: max(8, 4 * d) for t, d in self._dims.items()}
        ck = self.options.checksum
        for s, parts in enumerate(_router.split(checked, self.num_shards)):
            for msg in _router.pack(parts, cost, self._budget):
                plan.append(msg)
                messages.append((s, proto.encode_pull(
                    [(p.table, p.keys[lo:hi]) for p, lo, hi in msg], train, ck)))
        if messages:
            answers = self._guard(_Calls(self, proto.PULL, "pull", messages).wait)
            for msg, raw, (s, _) in zip(plan, answers, messages):
                arrays = self._decode(s, raw)
                for i, (p, lo, hi) in enumerate(msg):
                    rows = arrays.get(f"rows.{i}")
                    d = self._dims[p.table]
                    if rows is None or rows.shape != (hi - lo, d) or rows.dtype != np.float32:
                        raise self._remember(InvalidInputError(
                            f"PS shard {s} answered a malformed pull for table {p.table!r}"))
                    _router.scatter_rows(out[p.table], p.pos[lo:hi], rows)
        return _router.to_torch(out)

    def apply_gradients(self, grads: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                        now: int) -> None:
        self._ready()
        checked = _router.check_grads(grads, self._dims)
        keys = {t: k for t, (k, _) in checked.items()}
        cost = {t: 8 + 4 * d for t, d in self._dims.items()}
        messages: list[tuple[int, bytes]] = []
        ck = self.options.checksum
        for s, parts in enumerate(_router.split(keys, self.num_shards)):
            for msg in _router.pack(parts, cost, self._budget):
                body = []
                for p, lo, hi in msg:
                    pos = p.pos[lo:hi]
                    g = checked[p.table][1]
                    body.append((p.table, p.keys[lo:hi],
                                 g if self.num_shards == 1 and len(pos) == len(g)
                                 else _router.gather_rows(g, pos)))
                self._seq += 1
                messages.append((s, proto.encode_push(body, int(now), self._client_id,
                                                      self._seq, ck)))
        if not messages:
            return
        calls = _Calls(self, proto.PUSH, "push", messages)
        if self.options.async_push:
            self._pending_push = calls
        else:
            self._guard(calls.wait)

    def evict_expired(self, now: int) -> dict[str, int]:
        self._ready()
        body = proto.encode_meta({"now": int(now)})
        answers = self._guard(_Calls(self, proto.EVICT, "evict",
                                     [(s, body) for s in range(self.num_shards)]).wait)
        total = {t: 0 for t in self._dims}
        for s, raw in enumerate(answers):
            for t, n in self._meta(s, raw).get("evicted", {}).items():
                total[t] = total.get(t, 0) + int(n)
        return total

    def stats(self) -> dict[str, dict[str, Any]]:
        self._ready()
        body = proto.encode_meta({})
        answers = self._guard(_Calls(self, proto.STATS, "stats",
                                     [(s, body) for s in range(self.num_shards)]).wait)
        return _router.merge_stats([self._meta(s, raw).get("stats", {})
                                    for s, raw in enumerate(answers)])

    # -- helpers ------------------------------------------------------------------------------

    def _remember(self, exc: MonolithError) -> MonolithError:
        self.last_error = exc
        return exc

    def _decode(self, shard: int, raw: bytes) -> dict[str, np.ndarray]:
        try:
            return proto.decode(raw, self._limits, self.options.checksum)[0]
        except MonolithError as exc:
            raise self._remember(InvalidInputError(
                f"PS shard {shard} ({self.addresses[shard]}) sent an undecodable answer: "
                f"{exc}")) from exc

    def _meta(self, shard: int, raw: bytes) -> dict[str, Any]:
        try:
            return proto.decode(raw, self._limits, self.options.checksum)[1]
        except MonolithError as exc:
            raise self._remember(InvalidInputError(
                f"PS shard {shard} ({self.addresses[shard]}) sent an undecodable answer: "
                f"{exc}")) from exc

    def _error(self, op: str, failed: Mapping[int, BaseException],
               messages: Sequence[tuple[int, bytes]], attempts: Sequence[int],
               elapsed: float) -> MonolithError:
        per_shard: dict[int, tuple[BaseException, int]] = {}
        for i, err in failed.items():
            s = messages[i][0]
            if s not in per_shard:
                per_shard[s] = (err, attempts[i])
        errors: dict[object, BaseException] = {}
        for s, (err, tries) in sorted(per_shard.items()):
            errors[f"{s} ({self.addresses[s]})"] = self._shard_error(op, s, err, tries, elapsed)
        if len(errors) == 1:
            return next(iter(errors.values()))  # type: ignore[return-value]
        return ShardError(op, errors)

    def _shard_error(self, op: str, s: int, err: BaseException, tries: int,
                     elapsed: float) -> MonolithError:
        where = f"PS shard {s} at {self.addresses[s]}"
        if isinstance(err, MonolithError):
            return err
        code = err.code() if isinstance(err, grpc.RpcError) and hasattr(err, "code") else None
        details = err.details() if isinstance(err, grpc.RpcError) and hasattr(err, "details") \
            else str(err)
        after = (f"after {tries} attempt(s) over {elapsed:.1f} s (deadline "
                 f"{self.options.deadline_s:g} s)")
        if code == grpc.StatusCode.UNAVAILABLE:
            return UnavailableError(f"{where} is unavailable for {op} {after}; last error: "
                                    f"{details} (retriable: restart the shard or retry)")
        if code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
            return DeadlineExceededError(f"{where} did not answer {op} {after}: {details} "
                                         "(retriable)")
        if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED):
            return InvalidInputError(f"{where} rejected {op} ({code.name}): {details}")
        name = code.name if code is not None else type(err).__name__
        return MonolithError(f"{where} failed {op} ({name}): {details}")
