"""The join of impressions with actions: labelled examples out, bounded state, time passed in.

This is the pure core of ``monolith joiner`` (no Kafka here; ``streaming.joiner`` feeds
it). An **impression** is an example whose ``example_ids`` are request ids and whose
``timestamps`` are the impression times (its labels are ignored). An **action** is
``(request id, label, time)``: a click is label 1; any value in [0, 1] is allowed.

Policy (event time throughout; ``W`` = ``window_s``, ``H`` = ``horizon_s``):

* An action at ``t_a`` for a pending impression at ``t_i`` with ``t_a <= t_i + W`` makes
  the impression a **positive** with the action's label, emitted at once.
* When the watermark reaches ``t_i + W`` without such an action, the impression is a
  **negative** (kept with probability ``negative_rate``; see *down-sampling*).
* **Late action** (``late_actions``): it arrives after its impression was emitted as a
  negative or dropped, or its time is past ``t_i + W``. It is counted and dropped; no
  correction is emitted (that would emit the request twice). Size ``W`` at the delay
  percentile you want to keep, and watch this counter.
* **Duplicate action** (``duplicate_actions``): a second action for a request already
  labelled positive. Counted, dropped.
* **Early action**: an action whose impression has not arrived yet (the two topics are
  read independently). Buffered until the impression comes, or dropped as an orphan
  (``orphan_actions``) when the watermark passes ``t_a + H``.
* **Each request is emitted at most once.** Emitted and dropped request ids are
  remembered until the watermark passes ``t_i + W + H``; an impression older than that,
  or not newer than the *floor* (the newest time forgotten because ``max_remembered``
  overflowed) is dropped as late (``late_impressions``), so a forgotten id can never come
  back. Duplicate impressions are counted and dropped.
* **Bounded memory.** Pending impressions are held as the column chunks they arrived in;
  when those hold more than ``max_pending_examples`` examples the oldest chunk is evicted:
  its still-pending impressions are dropped (``evicted_impressions``) and remembered as
  dropped. Early actions are capped at ``max_pending_actions`` (oldest dropped,
  ``evicted_actions``).

*Down-sampling.* With ``negative_rate = r < 1`` a negative is kept when a hash of its
request id falls below ``r`` (deterministic, so replays and restores keep the same ones).
A model trained on the sampled stream over-predicts; its logit is corrected by
``logit_true = logit_sampled + ln(r)`` (:func:`correct_logit`), i.e.
``p = q / (q + (1 - q) / r)``.

Not thread-safe. Example::

    >>> import numpy as np
    >>> from streaming.columns import ExampleColumns
    >>> imp = ExampleColumns(("ad",), np.ones((1, 2), np.int32), np.array([5, 6]), None,
    ...     np.zeros((2, 0), np.float32), np.zeros(2, np.float32), np.array([100, 100]),
    ...     np.array([1, 2]))
    >>> j = JoinState(JoinerConfig(window_s=60))
    >>> j.add_impressions(imp)
    []
    >>> [c.example_ids.tolist() for c in j.add_actions(np.array([2]), np.ones(1), np.array([130]))]
    [[2]]
    >>> [(c.example_ids.tolist(), c.labels.tolist()) for c in j.advance(160)]
    [([1], [0.0])]
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from monolith_py.errors import ConfigError, DecodeError, InvalidInputError
from streaming.columns import ExampleColumns, take_rows
from streaming.generate import splitmix64

__all__ = ["JoinerConfig", "JoinState", "correct_logit", "COUNTERS"]

COUNTERS = (
    "impressions", "actions", "positives", "negatives", "negatives_sampled_out",
    "duplicate_impressions", "late_impressions", "duplicate_actions", "late_actions",
    "early_actions", "orphan_actions", "evicted_impressions", "evicted_actions",
)

_POSITIVE, _NEGATIVE, _DROPPED = 1, 2, 3


def correct_logit(logit: Any, negative_rate: float) -> Any:
    """Undo negative down-sampling: ``logit + ln(negative_rate)`` (numpy or torch)."""
    if not 0 < negative_rate <= 1:
        raise InvalidInputError(f"negative_rate must be in (0, 1], got {negative_rate}")
    return logit + math.log(negative_rate)


@dataclass(frozen=True)
class JoinerConfig:
    """Join policy and memory bounds (see the module docstring)."""

    window_s: int = 3600
    horizon_s: int | None = None
    max_pending_examples: int = 1_000_000
    max_pending_actions: int = 1_000_000
    max_remembered: int = 5_000_000
    negative_rate: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.window_s < 0:
            raise ConfigError(f"window_s must be >= 0 seconds, got {self.window_s}")
        if self.horizon_s is not None and self.horizon_s < 0:
            raise ConfigError(f"horizon_s must be >= 0 or None, got {self.horizon_s}")
        for name in ("max_pending_examples", "max_pending_actions", "max_remembered"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.negative_rate <= 1:
            raise ConfigError(f"negative_rate must be in (0, 1], got {self.negative_rate}; "
                              "1 keeps every negative")

    @property
    def horizon(self) -> int:
        """``horizon_s``, defaulting to ``window_s``."""
        return self.window_s if self.horizon_s is None else self.horizon_s


@dataclass
class _Chunk:
    cols: ExampleColumns
    deadline: np.ndarray  # int64 [B]: t_i + W
    open: np.ndarray  # bool [B]: still pending
    n_open: int = field(default=0)
    next_deadline: int = field(default=0)  # min deadline among open rows

    def refresh(self) -> None:
        self.n_open = int(self.open.sum())
        self.next_deadline = int(self.deadline[self.open].min()) if self.n_open else 0


def _relabel(cols: ExampleColumns, labels: np.ndarray) -> ExampleColumns:
    return ExampleColumns(**{**cols.__dict__, "labels": labels.astype(np.float32)})


class JoinState:
    """Pending impressions, buffered actions and remembered ids; see the module docstring.

    Every method returns the examples it emits, as a list of :class:`ExampleColumns`
    (labels set; ``example_ids`` = request ids).
    """

    def __init__(self, config: JoinerConfig = JoinerConfig()) -> None:
        self.config = config
        self.watermark = -1
        self.floor = -1
        self.counters = {k: 0 for k in COUNTERS}
        self._chunks: OrderedDict[int, _Chunk] = OrderedDict()
        self._seq = 0
        self._rows = 0  # examples held by live chunks (the memory bound)
        self._where: dict[int, tuple[int, int]] = {}  # request -> (chunk, row)
        self._done: OrderedDict[int, tuple[int, int]] = OrderedDict()  # request -> (t_i, st)
        self._early: OrderedDict[int, tuple[int, float]] = OrderedDict()  # request -> (t, y)

    # -- inspection --------------------------------------------------------------------
    @property
    def pending_impressions(self) -> int:
        return len(self._where)

    @property
    def pending_actions(self) -> int:
        return len(self._early)

    @property
    def held_examples(self) -> int:
        """Examples held in pending chunks (bounded by ``max_pending_examples``)."""
        return self._rows

    def stats(self) -> dict[str, int]:
        return {**self.counters, "pending_impressions": self.pending_impressions,
                "pending_actions": self.pending_actions, "held_examples": self._rows,
                "remembered": len(self._done), "watermark": self.watermark,
                "floor": self.floor}

    # -- helpers -----------------------------------------------------------------------
    def _remember(self, request: int, t: int, status: int) -> None:
        self._done[request] = (t, status)
        while len(self._done) > self.config.max_remembered:
            _, (old_t, _) = self._done.popitem(last=False)
            self.floor = max(self.floor, old_t)

    def _keep_negative(self, requests: np.ndarray) -> np.ndarray:
        rate = self.config.negative_rate
        if rate >= 1.0:
            return np.ones(requests.shape[0], dtype=bool)
        h = splitmix64(requests.astype(np.uint64) ^ np.uint64(self.config.seed))
        return ((h >> np.uint64(11)).astype(np.float64) / float(1 << 53)) < rate

    def _close(self, seq: int, rows: np.ndarray, labels: np.ndarray | None,
               out: list[ExampleColumns]) -> None:
        """Resolve open ``rows`` of chunk ``seq``: positives with ``labels``, or
        negatives (down-sampled) when ``labels`` is None."""
        if rows.size == 0:
            return
        chunk = self._chunks[seq]
        chunk.open[rows] = False
        reqs = chunk.cols.example_ids[rows]
        times = chunk.cols.timestamps[rows]
        if labels is None:
            keep = self._keep_negative(reqs)
            statuses = np.where(keep, _NEGATIVE, _DROPPED)
            self.counters["negatives"] += int(keep.sum())
            self.counters["negatives_sampled_out"] += int((~keep).sum())
            emit_rows, emit_labels = rows[keep], np.zeros(int(keep.sum()), np.float32)
        else:
            statuses = np.full(rows.shape[0], _POSITIVE)
            self.counters["positives"] += int(rows.shape[0])
            emit_rows, emit_labels = rows, labels
        for r, t, st in zip(reqs.tolist(), times.tolist(), statuses.tolist()):
            self._where.pop(r, None)
            self._remember(r, t, st)
        if emit_rows.size:
            out.append(_relabel(take_rows(chunk.cols, emit_rows), emit_labels))
        chunk.refresh()
        if chunk.n_open == 0:
            self._rows -= len(chunk.cols)
            del self._chunks[seq]

    def _evict_for_memory(self) -> None:
        while self._rows > self.config.max_pending_examples and self._chunks:
            seq, chunk = next(iter(self._chunks.items()))
            rows = np.flatnonzero(chunk.open)
            self.counters["evicted_impressions"] += int(rows.size)
            for r, t in zip(chunk.cols.example_ids[rows].tolist(),
                            chunk.cols.timestamps[rows].tolist()):
                self._where.pop(r, None)
                self._remember(r, t, _DROPPED)
            self._rows -= len(chunk.cols)
            del self._chunks[seq]

    # -- inputs ------------------------------------------------------------------------
    def add_impressions(self, cols: ExampleColumns) -> list[ExampleColumns]:
        """Add impressions (request ids in ``example_ids``, times in ``timestamps``)."""
        out: list[ExampleColumns] = []
        n = len(cols)
        if n == 0:
            return out
        self.counters["impressions"] += n
        w, h = self.config.window_s, self.config.horizon
        reqs = cols.example_ids.tolist()
        keep = np.ones(n, dtype=bool)
        _, first = np.unique(cols.example_ids, return_index=True)
        if first.shape[0] != n:  # repeats inside the message: keep the first
            keep[:] = False
            keep[first] = True
        known = np.fromiter((r in self._where or r in self._done for r in reqs),
                            dtype=bool, count=n)
        dup = known | ~keep
        self.counters["duplicate_impressions"] += int(dup.sum())
        late = ~dup & ((cols.timestamps <= self.floor)
                       | (cols.timestamps + w + h < self.watermark))
        self.counters["late_impressions"] += int(late.sum())
        rows = np.flatnonzero(~dup & ~late)
        if rows.size == 0:
            return out
        if rows.size != n:
            cols = take_rows(cols, rows)
        seq = self._seq
        self._seq += 1
        deadline = cols.timestamps + w
        chunk = _Chunk(cols, deadline, np.ones(len(cols), dtype=bool))
        chunk.refresh()
        self._chunks[seq] = chunk
        self._rows += len(cols)
        pos_rows: list[int] = []
        pos_labels: list[float] = []
        ids = cols.example_ids.tolist()
        self._where.update(zip(ids, ((seq, row) for row in range(len(ids)))))
        if self._early:  # actions that came before their impression
            for row, r in enumerate(ids):
                early = self._early.pop(r, None)
                if early is not None:
                    if early[0] <= int(deadline[row]):
                        pos_rows.append(row)
                        pos_labels.append(early[1])
                    else:
                        self.counters["late_actions"] += 1
        self._close(seq, np.asarray(pos_rows, dtype=np.int64),
                    np.asarray(pos_labels, dtype=np.float32), out)
        if seq in self._chunks:  # windows already over at arrival: negatives right away
            c = self._chunks[seq]
            self._close(seq, np.flatnonzero(c.open & (c.deadline <= self.watermark)), None,
                        out)
        self._evict_for_memory()
        return out

    def add_actions(self, request_ids: np.ndarray, labels: np.ndarray,
                    times: np.ndarray) -> list[ExampleColumns]:
        """Add actions ``(request id, label in [0, 1], time)``; returns the positives."""
        request_ids = np.asarray(request_ids, dtype=np.int64)
        labels = np.asarray(labels, dtype=np.float32)
        times = np.asarray(times, dtype=np.int64)
        if not request_ids.shape == labels.shape == times.shape or request_ids.ndim != 1:
            raise InvalidInputError("request_ids, labels and times must be 1-D and equal "
                                    f"length, got {request_ids.shape}, {labels.shape}, "
                                    f"{times.shape}")
        self.counters["actions"] += int(request_ids.shape[0])
        matched: dict[int, tuple[list[int], list[float]]] = {}
        for r, y, t in zip(request_ids.tolist(), labels.tolist(), times.tolist()):
            loc = self._where.get(r)
            if loc is not None:
                seq, row = loc
                if t <= int(self._chunks[seq].deadline[row]):
                    del self._where[r]  # later duplicates in this call see it as done
                    self._done[r] = (int(self._chunks[seq].cols.timestamps[row]), _POSITIVE)
                    rows, ys = matched.setdefault(seq, ([], []))
                    rows.append(row)
                    ys.append(y)
                else:
                    self.counters["late_actions"] += 1
                continue
            done = self._done.get(r)
            if done is not None:
                key = "duplicate_actions" if done[1] == _POSITIVE else "late_actions"
                self.counters[key] += 1
            elif r in self._early:
                self.counters["duplicate_actions"] += 1
            else:
                self.counters["early_actions"] += 1
                self._early[r] = (t, y)
                if len(self._early) > self.config.max_pending_actions:
                    self._early.popitem(last=False)
                    self.counters["evicted_actions"] += 1
        out: list[ExampleColumns] = []
        for seq, (rows, ys) in matched.items():
            self._close(seq, np.asarray(rows, dtype=np.int64), np.asarray(ys, np.float32), out)
        return out

    def advance(self, watermark: int) -> list[ExampleColumns]:
        """Move event time to ``watermark`` (never backwards): close the windows that
        ended (negatives) and forget what is older than the horizon."""
        out: list[ExampleColumns] = []
        self.watermark = max(self.watermark, int(watermark))
        wm = self.watermark
        for seq in [s for s, c in self._chunks.items() if c.next_deadline <= wm]:
            c = self._chunks[seq]
            self._close(seq, np.flatnonzero(c.open & (c.deadline <= wm)), None, out)
        w, h = self.config.window_s, self.config.horizon
        while self._done:
            r, (t, _) = next(iter(self._done.items()))
            if t + w + h >= wm:
                break
            self._done.popitem(last=False)
        while self._early:
            r, (t, _) = next(iter(self._early.items()))
            if t + h >= wm:
                break
            self._early.popitem(last=False)
            self.counters["orphan_actions"] += 1
        return out

    def mark_emitted(self, request_ids: np.ndarray, times: np.ndarray,
                     labels: np.ndarray) -> int:
        """Record requests as already emitted (e.g. found in the output topic after a
        restore): they leave the pending set and will never be emitted again. Returns
        how many were still pending."""
        touched: set[int] = set()
        found = 0
        for r, t, y in zip(np.asarray(request_ids, np.int64).tolist(),
                           np.asarray(times, np.int64).tolist(),
                           np.asarray(labels, np.float32).tolist()):
            loc = self._where.pop(r, None)
            if loc is not None:
                self._chunks[loc[0]].open[loc[1]] = False
                touched.add(loc[0])
                found += 1
            self._early.pop(r, None)
            self._remember(r, t, _POSITIVE if y > 0 else _NEGATIVE)
        for seq in touched:
            chunk = self._chunks[seq]
            chunk.refresh()
            if chunk.n_open == 0:
                self._rows -= len(chunk.cols)
                del self._chunks[seq]
        return found

    # -- state -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Pending impressions (as example-codec messages, uint8 arrays), remembered ids,
        early actions, watermark, floor and counters: numpy arrays and ints only."""
        from streaming.codec import encode_columns

        pending = [np.frombuffer(encode_columns(take_rows(c.cols, np.flatnonzero(c.open))),
                                 dtype=np.uint8) for c in self._chunks.values() if c.n_open]
        done = list(self._done.items())
        early = list(self._early.items())
        return {
            "watermark": self.watermark,
            "floor": self.floor,
            "pending": pending,
            "done_ids": np.array([r for r, _ in done], dtype=np.int64),
            "done_times": np.array([v[0] for _, v in done], dtype=np.int64),
            "done_status": np.array([v[1] for _, v in done], dtype=np.int8),
            "early_ids": np.array([r for r, _ in early], dtype=np.int64),
            "early_times": np.array([v[0] for _, v in early], dtype=np.int64),
            "early_labels": np.array([v[1] for _, v in early], dtype=np.float32),
            "counters": dict(self.counters),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace this state with ``state`` (validated; pending chunks are decoded with
        the example codec)."""
        from streaming.codec import decode_columns

        try:
            chunks = [decode_columns(np.asarray(m, dtype=np.uint8).tobytes())
                      for m in state["pending"]]
            done = (np.asarray(state["done_ids"], np.int64),
                    np.asarray(state["done_times"], np.int64),
                    np.asarray(state["done_status"], np.int8))
            early = (np.asarray(state["early_ids"], np.int64),
                     np.asarray(state["early_times"], np.int64),
                     np.asarray(state["early_labels"], np.float32))
            watermark, floor = int(state["watermark"]), int(state["floor"])
            counters = {k: int(state["counters"].get(k, 0)) for k in COUNTERS}
        except (KeyError, TypeError, ValueError, DecodeError) as exc:
            raise InvalidInputError(f"not a joiner state: {exc}") from None
        if len({a.shape for a in done}) != 1 or len({a.shape for a in early}) != 1:
            raise InvalidInputError("joiner state arrays have mismatched lengths")
        self.__init__(self.config)  # type: ignore[misc]
        self.watermark, self.floor, self.counters = watermark, floor, counters
        for r, t, st in zip(*(a.tolist() for a in done)):
            self._done[r] = (t, st)
        for r, t, y in zip(*(a.tolist() for a in early)):
            self._early[r] = (t, y)
        for cols in chunks:
            seq = self._seq
            self._seq += 1
            chunk = _Chunk(cols, cols.timestamps + self.config.window_s,
                           np.ones(len(cols), dtype=bool))
            chunk.refresh()
            self._chunks[seq] = chunk
            self._rows += len(cols)
            for row, r in enumerate(cols.example_ids.tolist()):
                self._where[r] = (seq, row)
