"""Writers of data into Kafka: the paced replayer and the synthetic stream producers.

* :func:`replay_to_kafka` writes batches in order, optionally paced so event time runs
  ``speedup`` times faster than the wall clock (``speedup=0``: as fast as possible).
* :func:`replay_impressions` writes a labelled replay (MovieLens) as the joiner's input
  instead: every example as an impression (label 0) and every positive as an action at
  the same event time (the joiner labels them back).
* :func:`generate_examples` writes the synthetic CTR stream as labelled examples.
* :func:`generate_impressions` writes it as the joiner's input instead: impressions to
  one topic and clicks (delayed in event time, exponential with mean
  ``click_delay_mean_s``) to another, both partitioned by ``request id % partitions``.
  Clicks are written once the impression stream's event time has passed them (an
  :class:`ActionScheduler`), like a real action log.

Example::

    >>> pacing_delay(event_t=150, first_event_t=100, started=0.0, now=1.0, speedup=10.0)
    4.0
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from monolith_py.errors import ConfigError
from streaming.columns import ExampleColumns, from_batch, take_rows
from streaming.generate import AUCTracker, SyntheticCTR, splitmix64

if TYPE_CHECKING:
    from monolith_py.batch import Batch
    from streaming.sink import KafkaSink

__all__ = ["pacing_delay", "replay_to_kafka", "replay_impressions", "generate_examples",
           "generate_impressions", "ActionScheduler"]

log = logging.getLogger(__name__)


def pacing_delay(event_t: int, first_event_t: int, started: float, now: float,
                 speedup: float) -> float:
    """Seconds to wait before writing an event at ``event_t`` so that event time runs
    ``speedup`` x faster than wall time since ``started`` (0 when ``speedup <= 0``)."""
    if speedup <= 0:
        return 0.0
    return max(0.0, started + (event_t - first_event_t) / speedup - now)


def replay_to_kafka(batches: Iterable[Batch | ExampleColumns], sink: KafkaSink, *,
                    speedup: float = 0.0, clock: Callable[[], float] = time.monotonic,
                    sleep: Callable[[float], None] = time.sleep,
                    progress: Callable[[dict[str, Any]], None] | None = None,
                    progress_every: int = 50) -> dict[str, Any]:
    """Write each batch as one message (paced by its first timestamp); flush at the end.
    Returns ``{"messages", "examples", "first_event_time", "last_event_time",
    "seconds"}``."""
    started = clock()
    first: int | None = None
    last = 0
    messages = examples = 0
    for item in batches:
        cols = item if isinstance(item, ExampleColumns) else from_batch(item)
        if len(cols) == 0:
            continue
        t = int(cols.timestamps[0])
        first = t if first is None else first
        delay = pacing_delay(t, first, started, clock(), speedup)
        if delay > 0:
            sleep(delay)
        sink.send_columns(cols)
        messages += 1
        examples += len(cols)
        last = int(cols.timestamps.max())
        if progress is not None and messages % progress_every == 0:
            progress({"messages": messages, "examples": examples, "event_time": last})
    sink.flush(timeout_s=300)
    return {"messages": messages, "examples": examples, "first_event_time": first,
            "last_event_time": last, "seconds": clock() - started}


def _pace(rate: float, started: float, written: int, clock: Callable[[], float],
          sleep: Callable[[float], None]) -> None:
    """Sleep so that at most ``rate`` examples per wall second are written (0: no pacing)."""
    if rate > 0:
        wait = started + written / rate - clock()
        if wait > 0:
            sleep(wait)


def _send_by_request(sink: KafkaSink, cols: ExampleColumns, partitions: int) -> int:
    """Send ``cols`` split by ``example id % partitions`` (impressions and actions of one
    request land on the same partition); returns the messages sent."""
    if partitions == 1:
        sink.send_columns(cols, partition=0)
        return 1
    part = cols.example_ids % partitions
    sent = 0
    for p in range(partitions):
        sel = np.flatnonzero(part == p)
        if sel.size:
            sink.send_columns(take_rows(cols, sel), partition=p)
            sent += 1
    return sent


def _unlabeled(cols: ExampleColumns) -> ExampleColumns:
    return ExampleColumns(**{**cols.__dict__, "labels": np.zeros(len(cols), np.float32)})


def replay_impressions(batches: Iterable[Batch | ExampleColumns], impressions: KafkaSink,
                       actions: KafkaSink, *, partitions: int = 1, rate: float = 0.0,
                       clock: Callable[[], float] = time.monotonic,
                       sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    """Write labelled batches as impressions (labels zeroed) plus one action per positive
    (``label > 0.5``, at the example's timestamp), both partitioned by ``example id %
    partitions``; at most ``rate`` impressions per wall second (0: no pacing). Returns
    ``{"impressions", "actions", "messages", "seconds"}``."""
    if partitions < 1 or rate < 0:
        raise ConfigError(f"need partitions >= 1 and rate >= 0, got {partitions}, {rate}")
    started = clock()
    written = clicks = messages = 0
    for item in batches:
        cols = item if isinstance(item, ExampleColumns) else from_batch(item)
        if len(cols) == 0:
            continue
        _pace(rate, started, written, clock, sleep)
        hit = cols.labels > 0.5
        messages += _send_by_request(impressions, _unlabeled(cols), partitions)
        if hit.any():
            _send_by_request(actions, _actions_columns(cols.example_ids[hit],
                                                       cols.timestamps[hit]), partitions)
        written += len(cols)
        clicks += int(hit.sum())
    impressions.flush(timeout_s=300)
    actions.flush(timeout_s=300)
    return {"impressions": written, "actions": clicks, "messages": messages,
            "seconds": clock() - started}


def generate_examples(gen: SyntheticCTR, sink: KafkaSink, *, examples: int, batch_size: int,
                      start_batch: int = 0, rate: float = 0.0,
                      clock: Callable[[], float] = time.monotonic,
                      sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    """Write ``examples`` synthetic examples (``batch_size`` per message, at most ``rate``
    examples per wall second when ``rate > 0``). Returns counts and ``best_auc``."""
    if examples < 1 or batch_size < 1 or rate < 0:
        raise ConfigError(f"need examples >= 1, batch_size >= 1, rate >= 0; got {examples}, "
                          f"{batch_size}, {rate}")
    auc = AUCTracker()
    started = clock()
    written = positives = 0
    index = start_batch
    while written < examples:
        cols, prob = gen.batch(index, batch_size)
        if written + len(cols) > examples:
            keep = np.arange(examples - written)
            cols, prob = take_rows(cols, keep), prob[keep]
        _pace(rate, started, written, clock, sleep)
        sink.send_columns(cols)
        auc.update(prob, cols.labels)
        written += len(cols)
        positives += int(cols.labels.sum())
        index += 1
    sink.flush(timeout_s=300)
    return {"examples": written, "messages": index - start_batch, "next_batch": index,
            "ctr": positives / max(written, 1), "best_auc": auc.auc(),
            "seconds": clock() - started}


class ActionScheduler:
    """Actions waiting for their event time (a min-time buffer over numpy arrays).

    >>> s = ActionScheduler(); s.add(np.array([1, 2]), np.array([50, 10]))
    >>> s.due(20)[0].tolist(), len(s)
    ([2], 1)
    """

    def __init__(self) -> None:
        self.ids = np.zeros(0, dtype=np.int64)
        self.times = np.zeros(0, dtype=np.int64)

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def add(self, ids: np.ndarray, times: np.ndarray) -> None:
        self.ids = np.concatenate([self.ids, ids.astype(np.int64)])
        self.times = np.concatenate([self.times, times.astype(np.int64)])

    def due(self, now: int) -> tuple[np.ndarray, np.ndarray]:
        """Remove and return the actions with time ``<= now``, in time order."""
        ready = self.times <= now
        ids, times = self.ids[ready], self.times[ready]
        self.ids, self.times = self.ids[~ready], self.times[~ready]
        order = np.argsort(times, kind="stable")
        return ids[order], times[order]


def _actions_columns(ids: np.ndarray, times: np.ndarray) -> ExampleColumns:
    n = ids.shape[0]
    return ExampleColumns((), np.zeros((0, n), np.int32), np.zeros(0, np.int64), None,
                          np.zeros((n, 0), np.float32), np.ones(n, np.float32), times, ids)


def generate_impressions(gen: SyntheticCTR, impressions: KafkaSink, actions: KafkaSink, *,
                         examples: int, batch_size: int, partitions: int,
                         click_delay_mean_s: float, start_batch: int = 0, rate: float = 0.0,
                         clock: Callable[[], float] = time.monotonic,
                         sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    """Write the synthetic stream as impressions + delayed clicks (see module docstring).
    Request ids are the example ids; a click's delay comes from a hash of its request id.
    ``rate``: at most this many impressions per wall second (0: as fast as possible).
    """
    if partitions < 1 or click_delay_mean_s < 0:
        raise ConfigError(f"need partitions >= 1 and click_delay_mean_s >= 0, got "
                          f"{partitions}, {click_delay_mean_s}")
    pending = ActionScheduler()
    written = clicks = 0
    index = start_batch
    started = clock()

    def flush_due(now: int) -> int:
        ids, times = pending.due(now)
        if ids.shape[0]:
            _send_by_request(actions, _actions_columns(ids, times), partitions)
        return int(ids.shape[0])

    while written < examples:
        _pace(rate, started, written, clock, sleep)
        cols, _ = gen.batch(index, batch_size)  # fixed size: example ids stay unique
        index += 1
        if written + len(cols) > examples:
            cols = take_rows(cols, np.arange(examples - written))
        reqs = cols.example_ids
        u = ((splitmix64(reqs.astype(np.uint64) ^ np.uint64(0xC11C)) >> np.uint64(11))
             .astype(np.float64) + 0.5) / float(1 << 53)
        delay = np.floor(-np.log(u) * click_delay_mean_s).astype(np.int64)
        hit = cols.labels > 0.5
        pending.add(reqs[hit], cols.timestamps[hit] + delay[hit])
        _send_by_request(impressions, _unlabeled(cols), partitions)
        written += len(cols)
        clicks += flush_due(int(cols.timestamps.max()))
    clicks += flush_due(np.iinfo(np.int64).max)
    impressions.flush(timeout_s=300)
    actions.flush(timeout_s=300)
    return {"impressions": written, "clicks": clicks, "next_batch": index}
