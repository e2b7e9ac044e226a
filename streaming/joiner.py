"""``Joiner``: the Kafka service around :class:`~streaming.join.JoinState`.

Reads an impressions topic and an actions topic (both example-codec messages: an action
message is an example batch whose ``example_ids`` are request ids, ``labels`` the action
values and ``timestamps`` the action times; its features are ignored), joins them, and
writes labelled examples to the output topic with an idempotent producer.

* **Scaling**: rank ``r`` of ``w`` reads partitions ``r, r + w, ...`` of *both* input
  topics and writes to the same share of the output topic's partitions. Producers must
  partition impressions and actions by request id with the same partition count, so a
  request's impression and actions meet in one joiner.
* **Watermark** (event time that has passed for every input): the smallest "newest event
  time seen" over the input partitions. A partition that has nothing left to read stops
  holding the watermark back only once it has been idle (caught up, no new message) for
  ``idle_timeout_s`` wall seconds, so a producer that falls a little behind on one topic
  (a loaded machine) does not let the other topic's times close its windows and make its
  impressions late. When nothing holds it back it is the newest event time seen.
  ``lateness_s`` is subtracted.
* **State** (``state_dict``): the join state (pending impressions, remembered ids, early
  actions, watermark), the next offset of every input partition, and the output offsets
  at that moment (after a flush). ``load_state_dict`` restores it, seeks the inputs, and
  reads the output written *after* the snapshot: those requests count as emitted, so a
  restored joiner never emits a request again (output stays exactly-once across crashes).

* **Outages**: kafka-python reconnects by itself; errors reaching ``poll`` are retried
  with exponential backoff; the output producer is idempotent and its failures surface at
  the next flush (``state_dict``/``run``'s end), before any progress is recorded.

Not thread-safe, except ``stop()``.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from monolith_py.errors import ConfigError, DecodeError, InvalidInputError
from streaming.codec import decode_columns
from streaming.columns import ExampleColumns, concat_columns, take_rows
from streaming.deadletter import DeadLetterWriter
from streaming.join import JoinerConfig, JoinState
from streaming.source import KafkaExampleSource, SourceOptions, consumer_settings
from streaming.topics import assign_partitions, partitions_for

__all__ = ["Joiner", "save_joiner_state", "load_joiner_state"]

log = logging.getLogger(__name__)


class Joiner:
    """Join ``impressions_topic`` with ``actions_topic`` into ``output_topic``.

    Args:
        bootstrap_servers: ``host:port[,...]``.
        impressions_topic, actions_topic, output_topic: topic names (the output topic
            must exist: see ``streaming.topics.ensure_topic``).
        config: :class:`JoinerConfig` (window, bounds, down-sampling).
        rank, world_size: this joiner's share of the partitions.
        dead_letter_topic: where undecodable input goes (``None``: count and skip).
        lateness_s: how far behind the newest input time the watermark trails.
        out_batch_size: most examples per output message.
        idle_timeout_s: wall seconds after which a caught-up partition no longer holds
            the watermark back (0: at once).
        clock: monotonic wall seconds (injectable for tests).
        options: consumer tuning (:class:`SourceOptions`).
    """

    def __init__(self, bootstrap_servers: str, impressions_topic: str, actions_topic: str,
                 output_topic: str, *, config: JoinerConfig = JoinerConfig(), rank: int = 0,
                 world_size: int = 1, dead_letter_topic: str | None = None,
                 lateness_s: int = 0, out_batch_size: int = 1024,
                 options: SourceOptions = SourceOptions(), idle_timeout_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        topics = {impressions_topic, actions_topic, output_topic}
        if len(topics) != 3 or not all(topics):
            raise ConfigError("impressions, actions and output topics must be three distinct "
                              f"names, got {impressions_topic!r}, {actions_topic!r}, "
                              f"{output_topic!r}")
        if lateness_s < 0 or out_batch_size < 1 or not idle_timeout_s >= 0:
            raise ConfigError(f"lateness_s and idle_timeout_s must be >= 0 and "
                              f"out_batch_size >= 1, got {lateness_s}, {idle_timeout_s}, "
                              f"{out_batch_size}")
        self.bootstrap_servers = bootstrap_servers
        self.topics = {"impressions": impressions_topic, "actions": actions_topic}
        self.output_topic = output_topic
        self.rank, self.world_size = rank, world_size
        self.dead_letter_topic = dead_letter_topic
        self.lateness_s = lateness_s
        self.out_batch_size = out_batch_size
        self.options = options
        self.join = JoinState(config)
        self._consumer: Any = None
        self._tps: dict[tuple[str, int], Any] = {}  # (role, partition) -> TopicPartition
        self._next: dict[tuple[str, int], int] = {}
        self._newest: dict[tuple[str, int], int] = {}
        self._last_data: dict[tuple[str, int], float] = {}  # wall time of the last message
        self.idle_timeout_s = float(idle_timeout_s)
        self._clock = clock
        self._sink: Any = None
        self._out_parts: list[int] = []
        self._out_base: dict[int, int] = {}
        self._rr = 0
        self._dlq: DeadLetterWriter | None = None
        self._stop = threading.Event()
        self.counters = {"messages": 0, "dead_letters": 0, "emitted": 0, "restored_emitted": 0,
                         "poll_errors": 0}
        self._failures = 0

    # -- lifecycle -------------------------------------------------------------------
    def open(self) -> Joiner:
        """Connect, assign partitions, seek to the earliest offsets (or restored ones)."""
        if self._consumer is not None:
            return self
        from kafka import KafkaConsumer, TopicPartition

        from streaming.sink import KafkaSink

        o = self.options
        for role, topic in self.topics.items():
            count = partitions_for(self.bootstrap_servers, topic, timeout_s=o.topic_wait_s)
            for p in assign_partitions(list(range(count)), self.rank, self.world_size):
                self._tps[(role, p)] = TopicPartition(topic, p)
        out_count = partitions_for(self.bootstrap_servers, self.output_topic,
                                   timeout_s=o.topic_wait_s)
        self._out_parts = assign_partitions(list(range(out_count)), self.rank, self.world_size)
        self._consumer = KafkaConsumer(bootstrap_servers=self.bootstrap_servers,
                                       client_id=f"monolith-joiner-{self.rank}",
                                       **consumer_settings(o))
        self._consumer.assign(list(self._tps.values()))
        starts = self._consumer.beginning_offsets(list(self._tps.values()))
        for key, tp in self._tps.items():
            self._next.setdefault(key, int(starts[tp]))
            self._consumer.seek(tp, self._next[key])
        out_tps = [TopicPartition(self.output_topic, p) for p in self._out_parts]
        ends = self._consumer.end_offsets(out_tps)
        self._out_base = {tp.partition: int(ends[tp]) for tp in out_tps}
        self._sink = KafkaSink(self.bootstrap_servers, self.output_topic,
                               client_id=f"monolith-joiner-out-{self.rank}")
        if self.dead_letter_topic:
            self._dlq = DeadLetterWriter(self.bootstrap_servers, self.dead_letter_topic,
                                         client_id=f"monolith-joiner-dlq-{self.rank}")
        return self

    def stop(self) -> None:
        """Ask :meth:`run` to return after the current poll (thread-safe)."""
        self._stop.set()

    def close(self) -> None:
        """Flush the output and close every client."""
        if self._sink is not None:
            self._sink.flush(timeout_s=60)
            self._sink.close()
            self._sink = None
        if self._dlq is not None:
            self._dlq.close()
            self._dlq = None
        if self._consumer is not None:
            self._consumer.close(autocommit=False)
            self._consumer = None

    def __enter__(self) -> Joiner:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the loop --------------------------------------------------------------------
    def watermark(self) -> int | None:
        """The event time every input has passed (see the module docstring)."""
        bound: int | None = None
        newest_all: int | None = None
        now = self._clock()
        for key, tp in self._tps.items():
            newest = self._newest.get(key)
            if newest is not None:
                newest_all = newest if newest_all is None else max(newest_all, newest)
            hw = self._consumer.highwater(tp)
            caught_up = hw is not None and self._next[key] >= hw
            if caught_up and (newest is None or now - self._last_data.get(key, -math.inf)
                              >= self.idle_timeout_s):
                continue
            if newest is None:
                return None  # unread data of unknown time: cannot move
            bound = newest if bound is None else min(bound, newest)
        wm = bound if bound is not None else newest_all
        return None if wm is None else wm - self.lateness_s

    def poll_once(self, timeout_s: float | None = None) -> int:
        """Read what is available, join it, advance the watermark, write the output.
        Returns the number of examples written."""
        from kafka.errors import KafkaError

        self.open()
        try:
            records = self._consumer.poll(
                timeout_ms=int((self.options.poll_timeout_s if timeout_s is None
                                else timeout_s) * 1000))
        except KafkaError as exc:  # kafka-python reconnects; back off and try again later
            self.counters["poll_errors"] += 1
            delay = min(self.options.backoff_max_s,
                        self.options.backoff_initial_s * 2 ** min(self._failures, 16))
            self._failures += 1
            log.warning("joiner poll failed (%s); retrying in %.2fs", exc, delay)
            self._stop.wait(delay)
            return 0
        self._failures = 0
        out: list[ExampleColumns] = []
        for tp, msgs in records.items():
            role = "impressions" if tp.topic == self.topics["impressions"] else "actions"
            for msg in msgs:
                out += self._accept(role, tp.partition, msg)
        wm = self.watermark()
        if wm is not None:
            out += self.join.advance(wm)
        return self._write(out)

    def _accept(self, role: str, p: int, msg: Any) -> list[ExampleColumns]:
        self.counters["messages"] += 1
        key = (role, p)
        self._next[key] = msg.offset + 1
        self._last_data[key] = self._clock()
        value = msg.value if msg.value is not None else b""
        try:
            cols = decode_columns(value, verify_checksum=self.options.verify_checksum,
                                  limits=self.options.limits)
        except DecodeError as exc:
            self.counters["dead_letters"] += 1
            reason = f"{type(exc).__name__}: {exc}"
            log.warning("dead-lettering %s[%d]@%d: %s", self.topics[role], p, msg.offset, reason)
            if self._dlq is not None:
                self._dlq.write(value, msg.key, self.topics[role], p, msg.offset, reason)
            return []
        if len(cols) == 0:
            return []
        self._newest[key] = max(self._newest.get(key, -1), int(cols.timestamps.max()))
        if role == "impressions":
            return self.join.add_impressions(cols)
        return self.join.add_actions(cols.example_ids, cols.labels, cols.timestamps)

    def _write(self, out: list[ExampleColumns]) -> int:
        groups: dict[Any, list[ExampleColumns]] = {}
        for cols in out:
            groups.setdefault(cols.schema, []).append(cols)
        written = 0
        for parts in groups.values():
            cols = concat_columns(parts)
            for start in range(0, len(cols), self.out_batch_size):
                piece = cols if len(cols) <= self.out_batch_size else take_rows(
                    cols, np.arange(start, min(start + self.out_batch_size, len(cols))))
                partition = self._out_parts[self._rr % len(self._out_parts)]
                self._rr += 1
                self._sink.send_columns(piece, partition=partition)
                written += len(piece)
        self.counters["emitted"] += written
        return written

    def caught_up(self) -> bool:
        """Every input partition has been read up to its high watermark."""
        for key, tp in self._tps.items():
            hw = self._consumer.highwater(tp)
            if hw is None or self._next[key] < hw:
                return False
        return True

    def run(self, *, until_caught_up: bool = False, drain: bool = False,
            max_seconds: float | None = None, on_poll: Callable[[Joiner], None] | None = None
            ) -> dict[str, Any]:
        """Poll until :meth:`stop`, ``max_seconds``, or (``until_caught_up``) the inputs are
        exhausted; with ``drain``, then close every pending window (end of a replay).
        Returns :meth:`stats`."""
        self.open()
        self._stop.clear()
        started = time.monotonic()
        idle = 0
        while not self._stop.is_set():
            if max_seconds is not None and time.monotonic() - started >= max_seconds:
                break
            before = self.counters["messages"]
            self.poll_once()
            if on_poll is not None:
                on_poll(self)
            if until_caught_up:
                idle = idle + 1 if self.counters["messages"] == before else 0
                if idle >= 2 and self.caught_up():
                    break
        if drain:
            self._write(self.join.advance(np.iinfo(np.int64).max // 2))
        self._sink.flush(timeout_s=120)
        return self.stats()

    def stats(self) -> dict[str, Any]:
        return {**self.counters, **self.join.stats()}

    # -- state -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Join state + input offsets + output offsets (flushes the output first)."""
        self.open()
        self._sink.flush(timeout_s=120)
        out_offsets = dict(self._out_base)
        for p, last in self._sink.last_offsets.items():
            out_offsets[p] = max(out_offsets.get(p, 0), last + 1)
        offsets: dict[str, dict[int, int]] = {"impressions": {}, "actions": {}}
        for (role, p), off in self._next.items():
            offsets[role][p] = off
        return {"join": self.join.state_dict(), "offsets": offsets, "output": out_offsets}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` and skip the requests already in the output."""
        try:
            offsets = {(role, int(p)): int(off) for role in ("impressions", "actions")
                       for p, off in state["offsets"][role].items()}
            output = {int(p): int(off) for p, off in state["output"].items()}
            join_state = state["join"]
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise InvalidInputError(f"not a joiner state: {exc!r}") from None
        self.open()
        self.join.load_state_dict(join_state)
        self._newest.clear()
        for key, tp in self._tps.items():
            if key in offsets:
                self._next[key] = offsets[key]
                self._consumer.seek(tp, offsets[key])
        self._skip_already_written(output)

    def _skip_already_written(self, output: dict[int, int]) -> None:
        mine = {p: off for p, off in output.items() if p in self._out_parts}
        if not mine:
            return
        reader = KafkaExampleSource(self.bootstrap_servers, self.output_topic,
                                    rank=self.rank, world_size=self.world_size,
                                    end_of_stream=True, max_wait_s=0.0,
                                    batch_size=1 << 20, options=self.options)
        try:
            reader.load_state_dict(mine)
            for cols in reader.iter_columns():
                n = self.join.mark_emitted(cols.example_ids, cols.timestamps, cols.labels)
                self.counters["restored_emitted"] += len(cols)
                log.info("restore: %d requests were already in %s (%d still pending here)",
                         len(cols), self.output_topic, n)
        finally:
            reader.close()
        self._sink.last_offsets.clear()


def save_joiner_state(state: Mapping[str, Any]) -> bytes:
    """A joiner :meth:`Joiner.state_dict` as one checksummed array frame (no pickle)."""
    from monolith_py.wire import encode_arrays

    join = dict(state["join"])
    pending = list(join.pop("pending"))
    arrays = {f"pending_{i}": m for i, m in enumerate(pending)}
    for k in [k for k, v in join.items() if isinstance(v, np.ndarray)]:
        arrays[k] = join.pop(k)
    meta = {
        "join": join,
        "offsets": {role: {str(p): o for p, o in v.items()}
                    for role, v in state["offsets"].items()},
        "output": {str(p): o for p, o in state["output"].items()},
        "pending": len(pending),
    }
    return encode_arrays(arrays, meta)


def load_joiner_state(buf: bytes) -> dict[str, Any]:
    """Inverse of :func:`save_joiner_state`; raises ``DecodeError`` on bad bytes."""
    from monolith_py.wire import decode_arrays

    arrays, meta = decode_arrays(buf, copy=True, require_checksum=True)
    try:
        join = dict(meta["join"])
        join["pending"] = [arrays[f"pending_{i}"] for i in range(int(meta["pending"]))]
        for k, v in arrays.items():
            if not k.startswith("pending_"):
                join[k] = v
        return {"join": join, "offsets": meta["offsets"], "output": meta["output"]}
    except (KeyError, TypeError, ValueError) as exc:
        raise DecodeError(f"not a joiner state file: {exc!r}") from None
