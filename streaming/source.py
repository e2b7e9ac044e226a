"""``KafkaExampleSource``: example batches from explicitly assigned partitions, with the
next offset of each partition as its state.

Contract (see ``docs/design/0003-streaming.md``):

* **Assignment.** Rank ``r`` of ``w`` reads every ``w``-th partition of the sorted
  partition list, starting at ``r`` (no consumer group; the broker never rebalances).
* **Batches are whole messages.** A batch concatenates the examples of one or more
  complete messages: messages are added while the batch stays at or below
  ``batch_size`` examples (a single larger message is yielded alone), and a partial
  batch is yielded once ``max_wait_s`` has passed since its first message arrived. A
  message is never split, and messages with different schemas (feature names, dense
  width) never share a batch. So the position is exact at every batch boundary.
* **State.** ``state_dict()`` returns ``{partition: next offset}`` for this reader's
  partitions; read after a batch was yielded (before asking for the next one) it covers
  exactly the examples yielded so far. ``load_state_dict`` seeks there and drops
  everything buffered. Restoring and reading on yields every remaining example exactly
  once.
* **Bad messages.** A message that does not decode is copied, bytes unchanged, to the
  dead-letter topic with headers naming the source topic, partition, offset and the
  reason, counted, and skipped. The dead-letter write is flushed before the position
  moves past the message, so a snapshot never covers a poison message whose copy was
  lost (after a restore from an older snapshot the copy may be written twice; the
  headers identify duplicates).
* **Outages.** kafka-python reconnects by itself (requests time out, connections are
  re-established); errors that reach ``poll`` are retried with exponential backoff up to
  ``max_outage_s`` (``None``: forever), after which :class:`UnavailableError` is raised.
* **End of stream** (``end_of_stream=True``): iteration stops once every partition has
  reached the end it had when iteration started (for replays and tests).
* **Stop and resume.** ``stop()`` ends an iteration at the next poll; a batch being
  assembled is kept and yielded by the next iteration. ``close()`` keeps the position:
  iterating again reconnects there. A position outside the retained log (deleted by
  retention, or past the end of a re-created topic) resets to the earliest offset.

Not thread-safe: iterate, read ``state_dict()`` and call ``lag()`` from one thread;
``stop()`` may be called from any thread (iteration ends at the next poll).

Example::

    >>> src = KafkaExampleSource("127.0.0.1:9092", "examples", batch_size=4096,
    ...                          end_of_stream=True)          # doctest: +SKIP
    >>> for batch in src:                                     # doctest: +SKIP
    ...     train(batch); snapshot["offsets"] = src.state_dict()
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from monolith_py.errors import ConfigError, DecodeError, UnavailableError
from streaming.codec import DEFAULT_LIMITS, CodecLimits, decode_columns
from streaming.columns import ExampleColumns, concat_columns, to_batch
from streaming.deadletter import DLQ_HEADERS, DeadLetterWriter
from streaming.topics import assign_partitions, partitions_for

if TYPE_CHECKING:
    from monolith_py.batch import Batch

__all__ = ["SourceOptions", "KafkaExampleSource", "DLQ_HEADERS", "consumer_settings"]

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class SourceOptions:
    """Consumer tuning; the defaults suit ~0.1-10 MB messages.

    Attributes:
        start: where a partition without restored state begins: ``"earliest"`` or
            ``"latest"`` (on the local broker, whose end offsets lag inside the last
            record batch, ``"latest"`` may re-read that batch's tail).
        fetch_max_bytes / max_partition_fetch_bytes: per fetch request and per partition;
            must exceed the largest message.
        max_poll_records: messages taken from kafka-python per poll.
        receive_buffer_bytes: the socket's receive buffer (SO_RCVBUF).
        poll_timeout_s: the longest single wait inside ``poll``.
        request_timeout_s: a request the broker does not answer in this time is
            abandoned and the connection re-opened.
        backoff_initial_s / backoff_max_s: retry delays after a failed poll.
        max_outage_s: give up (``UnavailableError``) after failing this long; ``None``
            retries forever.
        topic_wait_s: how long to wait for the topic to exist at start.
        group_id: only used by :meth:`KafkaExampleSource.commit` (lag monitoring).
        verify_checksum: check the codec's CRC-32C.
    """

    start: str = "earliest"
    fetch_max_bytes: int = 64 << 20
    max_partition_fetch_bytes: int = 16 << 20
    max_poll_records: int = 64
    receive_buffer_bytes: int = 4 << 20
    poll_timeout_s: float = 0.5
    request_timeout_s: float = 30.0
    backoff_initial_s: float = 0.1
    backoff_max_s: float = 5.0
    max_outage_s: float | None = None
    topic_wait_s: float = 30.0
    group_id: str | None = None
    verify_checksum: bool = True
    limits: CodecLimits = DEFAULT_LIMITS

    def __post_init__(self) -> None:
        if self.start not in ("earliest", "latest"):
            raise ConfigError(f"start must be 'earliest' or 'latest', got {self.start!r}")
        if self.max_partition_fetch_bytes > self.fetch_max_bytes:
            raise ConfigError(
                f"max_partition_fetch_bytes ({self.max_partition_fetch_bytes}) must be <= "
                f"fetch_max_bytes ({self.fetch_max_bytes})")
        if self.max_partition_fetch_bytes < 1024 or self.max_poll_records < 1:
            raise ConfigError("max_partition_fetch_bytes must be >= 1024 and "
                              "max_poll_records >= 1")
        for name in ("poll_timeout_s", "request_timeout_s", "backoff_initial_s",
                     "backoff_max_s", "topic_wait_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.request_timeout_s <= self.poll_timeout_s:
            raise ConfigError(f"request_timeout_s ({self.request_timeout_s}) must exceed "
                              f"poll_timeout_s ({self.poll_timeout_s})")
        if self.max_outage_s is not None and self.max_outage_s <= 0:
            raise ConfigError(f"max_outage_s must be > 0 or None, got {self.max_outage_s}")


def consumer_settings(o: SourceOptions) -> dict[str, Any]:
    """kafka-python consumer settings for ``o``: no group management, no auto-commit,
    fetch sizes for MB-sized messages (shared by the source and the joiner)."""
    return dict(
        group_id=o.group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_bytes=o.fetch_max_bytes,
        max_partition_fetch_bytes=o.max_partition_fetch_bytes,
        receive_message_max_bytes=max(o.fetch_max_bytes + (1 << 20), 100_000_000),
        max_poll_records=o.max_poll_records,
        receive_buffer_bytes=o.receive_buffer_bytes,
        fetch_max_wait_ms=int(min(o.poll_timeout_s, 0.5) * 1000),
        request_timeout_ms=int(o.request_timeout_s * 1000),
        retry_backoff_ms=int(o.backoff_initial_s * 1000),
        reconnect_backoff_max_ms=int(o.backoff_max_s * 1000),
        check_crcs=True,
    )


class KafkaExampleSource:
    """Iterable of :class:`~monolith_py.batch.Batch` read from ``topic``.

    Args:
        bootstrap_servers: ``host:port[,...]``.
        topic: the examples topic.
        rank, world_size: this reader's share of the partitions.
        batch_size: target examples per batch (upper bound unless one message is larger).
        max_wait_s: yield a partial batch this long after its first message arrived.
        dead_letter_topic: where undecodable messages go (``None``: count and skip).
        end_of_stream: stop at the partition ends seen when iteration starts.
        options: :class:`SourceOptions`.
        clock: monotonic seconds (tests may pass a fake).
    """

    def __init__(self, bootstrap_servers: str, topic: str, rank: int = 0, world_size: int = 1,
                 batch_size: int = 1024, max_wait_s: float = 1.0,
                 dead_letter_topic: str | None = None, end_of_stream: bool = False,
                 options: SourceOptions = SourceOptions(),
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not topic:
            raise ConfigError("topic must be a non-empty string")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if max_wait_s < 0:
            raise ConfigError(f"max_wait_s must be >= 0, got {max_wait_s}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"need 0 <= rank < world_size, got {rank}, {world_size}")
        if dead_letter_topic == topic:
            raise ConfigError("dead_letter_topic must differ from the source topic")
        self.bootstrap_servers = bootstrap_servers
        self.topic = topic
        self.rank, self.world_size = rank, world_size
        self.batch_size = batch_size
        self.max_wait_s = max_wait_s
        self.dead_letter_topic = dead_letter_topic
        self.end_of_stream = end_of_stream
        self.options = options
        self._clock = clock
        self._consumer: Any = None
        self._tps: dict[int, Any] = {}
        self._dlq: DeadLetterWriter | None = None
        self._next: dict[int, int] = {}
        self._restored: dict[int, int] = {}
        # polled, not yet yielded: (partition, offset, columns or None for a skipped one)
        self._buffer: deque[tuple[int, int, ExampleColumns | None]] = deque()
        self._end_targets: dict[int, int] | None = None
        self._first_hw: dict[int, int] = {}
        self._list_offsets: dict[int, int] = {}
        self._stop = threading.Event()
        self._finish = threading.Event()
        self.counters = {"messages": 0, "examples": 0, "batches": 0, "bytes": 0,
                         "dead_letters": 0, "dead_letter_failures": 0, "poll_errors": 0}
        self._last_record_at: float | None = None
        self._exported_at = float("-inf")

    # -- lifecycle -------------------------------------------------------------------
    @property
    def partitions(self) -> list[int]:
        """This reader's partitions (after :meth:`open`)."""
        return sorted(self._tps)

    def open(self) -> KafkaExampleSource:
        """Connect, assign partitions and seek (called by the first iteration)."""
        if self._consumer is not None:
            return self
        from kafka import KafkaConsumer, TopicPartition

        o = self.options
        count = partitions_for(self.bootstrap_servers, self.topic, timeout_s=o.topic_wait_s)
        mine = assign_partitions(list(range(count)), self.rank, self.world_size)
        self._consumer = KafkaConsumer(
            bootstrap_servers=self.bootstrap_servers,
            client_id=f"monolith-source-{self.rank}",
            **consumer_settings(o),
        )
        self._tps = {p: TopicPartition(self.topic, p) for p in mine}
        self._consumer.assign(list(self._tps.values()))
        if o.start == "earliest":
            starts = self._consumer.beginning_offsets(list(self._tps.values()))
        else:
            starts = self._consumer.end_offsets(list(self._tps.values()))
        for p, tp in self._tps.items():
            self._next[p] = int(self._restored.get(p, starts[tp]))
            self._consumer.seek(tp, self._next[p])
        if self.dead_letter_topic:
            self._dlq = DeadLetterWriter(self.bootstrap_servers, self.dead_letter_topic,
                                         client_id=f"monolith-dlq-{self.rank}",
                                         timeout_s=o.request_timeout_s)
        log.info("source rank %d/%d reads %s partitions %s from %s", self.rank,
                 self.world_size, self.topic, mine, self._next)
        return self

    def stop(self) -> None:
        """Ask a running iteration to end (thread-safe)."""
        self._stop.set()

    def finish(self) -> None:
        """Read up to the partition ends as they are *now*, then end (thread-safe): like
        ``end_of_stream``, decided while running (a live stream's last producer is done)."""
        self._finish.set()

    def close(self) -> None:
        """Close the consumer and the dead-letter producer."""
        self._stop.set()
        if self._consumer is not None:
            self._restored = dict(self._next)  # a later open() resumes where this one was
        self._buffer.clear()
        if self._dlq is not None:
            self._dlq.close()
            self._dlq = None
        if self._consumer is not None:
            self._consumer.close(autocommit=False)
            self._consumer = None

    def __enter__(self) -> KafkaExampleSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- state -----------------------------------------------------------------------
    def state_dict(self) -> dict[int, int]:
        """``{partition: next offset to read}`` covering exactly the yielded examples."""
        if self._consumer is None:
            return dict(self._restored)
        return dict(self._next)

    def load_state_dict(self, state: Mapping[Any, Any]) -> None:
        """Seek this reader's partitions to ``state`` (a global ``{partition: offset}``
        map; entries for other readers' partitions are ignored, so every rank can load
        the same merged map). Partitions missing from ``state`` keep their position.
        Buffered messages are dropped."""
        parsed: dict[int, int] = {}
        for key, value in state.items():
            try:
                p, off = int(key), int(value)
            except (TypeError, ValueError):
                raise ConfigError(f"offset state must map partition -> offset, got "
                                  f"{key!r}: {value!r}") from None
            if p < 0 or off < 0:
                raise ConfigError(f"partition and offset must be >= 0, got {p}: {off}")
            parsed[p] = off
        if self._consumer is None:
            self._restored.update(parsed)
            return
        self._buffer.clear()
        for p, off in parsed.items():
            if p in self._tps:
                self._next[p] = off
                self._consumer.seek(self._tps[p], off)
        self._end_targets = None
        self._first_hw = {}

    def commit(self) -> None:
        """Commit the current positions to the broker under ``options.group_id`` (for
        lag dashboards only; the snapshot, not the broker, is the source of truth).
        Call after the snapshot holding ``state_dict()`` is sealed."""
        from kafka.structs import OffsetAndMetadata

        if self.options.group_id is None or self._consumer is None:
            raise ConfigError("commit() needs SourceOptions(group_id=...) and an open source")
        self._consumer.commit({self._tps[p]: OffsetAndMetadata(off, "", -1)
                               for p, off in self._next.items()})

    # -- lag -------------------------------------------------------------------------
    def _end_offset(self, p: int, refresh: bool = False) -> int | None:
        hw = self._consumer.highwater(self._tps[p]) if self._consumer is not None else None
        if hw is not None:
            return int(hw)
        if refresh or p not in self._list_offsets:
            ends = self._consumer.end_offsets(list(self._tps.values()))
            self._list_offsets = {q: int(ends[tp]) for q, tp in self._tps.items()}
        return self._list_offsets.get(p)

    def lag(self) -> dict[int, int]:
        """Examples-messages behind the partition ends, per partition (from the last
        fetch's high watermark; a broker round trip only before the first fetch)."""
        if self._consumer is None:
            return {}
        return {p: max(0, (self._end_offset(p) or 0) - off) for p, off in self._next.items()}

    def metrics(self) -> dict[str, Any]:
        """Counters, per-partition lag and positions (plain numbers, for logs/metrics)."""
        lag = self.lag()
        idle = None if self._last_record_at is None else self._clock() - self._last_record_at
        return {**self.counters, "lag": lag, "lag_total": sum(lag.values()),
                "positions": dict(self._next), "seconds_since_last_message": idle}

    # -- iteration -------------------------------------------------------------------
    def __iter__(self) -> Iterator[Batch]:
        for cols in self.iter_columns():
            yield to_batch(cols)

    def iter_columns(self) -> Iterator[ExampleColumns]:
        """Like iterating the source, but yields the numpy columns (no torch)."""
        self.open()
        self._stop.clear()
        if self.end_of_stream and self._end_targets is None:
            self._end_targets = {p: self._end_offset(p, refresh=True) or 0 for p in self._tps}
        while not self._stop.is_set():
            out = self._assemble()
            if out is None:
                return
            cols, positions = out
            self._next.update(positions)
            self.counters["batches"] += 1
            self.counters["examples"] += len(cols)
            self._export(len(cols))
            yield cols

    def _export(self, examples: int) -> None:
        from monolith_py.observe import counter, gauge

        counter("monolith_stream_examples_total", "Examples yielded by Kafka sources.",
                ["topic"]).labels(topic=self.topic).inc(examples)
        now = self._clock()
        if now - self._exported_at >= 1.0:
            self._exported_at = now
            lag = gauge("monolith_stream_lag_messages", "Messages behind the partition end.",
                        ["topic", "partition"])
            for p, value in self.lag().items():
                lag.labels(topic=self.topic, partition=str(p)).set(value)

    def _caught_up(self, positions: Mapping[int, int]) -> bool:
        for p, target in (self._end_targets or {}).items():
            hw = self._consumer.highwater(self._tps[p])
            if hw is None:
                return False  # wait for one fetch: its high watermark is authoritative
            if positions.get(p, self._next[p]) < max(target, self._first_hw.setdefault(p, hw)):
                return False
        return True

    def _assemble(self) -> tuple[ExampleColumns, dict[int, int]] | None:
        """Collect whole messages into one batch; ``None`` at end of stream / stop."""
        parts: list[ExampleColumns] = []
        taken: list[tuple[int, int, ExampleColumns | None]] = []  # popped for this batch
        count = 0
        positions: dict[int, int] = {}
        deadline: float | None = None
        while True:
            full = False
            while self._buffer:
                p, off, cols = self._buffer[0]
                if cols is None:  # a dead-lettered message: no examples, just move on
                    self._buffer.popleft()
                    if parts:
                        taken.append((p, off, cols))
                        positions[p] = off + 1
                    else:
                        self._next[p] = off + 1
                    continue
                if parts and (cols.schema != parts[0].schema
                              or count + len(cols) > self.batch_size):
                    full = True
                    break
                taken.append(self._buffer.popleft())
                parts.append(cols)
                count += len(cols)
                positions[p] = off + 1
                if deadline is None:
                    deadline = self._clock() + self.max_wait_s
                if count >= self.batch_size:
                    full = True
                    break
            if full and parts:
                return concat_columns(parts), positions
            if self._stop.is_set():
                self._buffer.extendleft(reversed(taken))  # not yielded: keep for later
                return None
            if self._finish.is_set() and not self.end_of_stream:
                self.end_of_stream = True  # in the iterating thread: the consumer is ours
                ends = self._consumer.end_offsets(list(self._tps.values()))
                self._end_targets = {q: int(ends[tp]) for q, tp in self._tps.items()}
            if self.end_of_stream and not self._buffer and self._caught_up(positions):
                return (concat_columns(parts), positions) if parts else None
            if deadline is not None and self._clock() >= deadline:
                return concat_columns(parts), positions
            wait = self.options.poll_timeout_s if deadline is None else \
                min(self.options.poll_timeout_s, max(0.0, deadline - self._clock()))
            self._poll(wait)

    def _poll(self, timeout_s: float) -> None:
        from kafka.errors import KafkaError

        delay = self.options.backoff_initial_s
        failing_since: float | None = None
        while True:
            try:
                records = self._consumer.poll(timeout_ms=int(timeout_s * 1000))
                break
            except KafkaError as exc:
                now = self._clock()
                failing_since = now if failing_since is None else failing_since
                self.counters["poll_errors"] += 1
                limit = self.options.max_outage_s
                if limit is not None and now - failing_since > limit:
                    raise UnavailableError(
                        f"reading {self.topic} failed for {now - failing_since:.1f}s "
                        f"(max_outage_s={limit}): {exc}") from exc
                log.warning("poll failed (%s); retrying in %.2fs", exc, delay)
                if self._stop.wait(delay):
                    return
                delay = min(delay * 2, self.options.backoff_max_s)
        for tp, msgs in records.items():
            for msg in msgs:
                self._accept(tp.partition, msg)

    def _accept(self, p: int, msg: Any) -> None:
        self._last_record_at = self._clock()
        self.counters["messages"] += 1
        value = msg.value if msg.value is not None else b""
        self.counters["bytes"] += len(value)
        try:
            cols = decode_columns(value, verify_checksum=self.options.verify_checksum,
                                  limits=self.options.limits)
        except DecodeError as exc:
            self._dead_letter(p, msg, value, f"{type(exc).__name__}: {exc}")
            self._buffer.append((p, msg.offset, None))
            return
        if len(cols) == 0:  # an empty message carries nothing to train on
            self._buffer.append((p, msg.offset, None))
            return
        self._buffer.append((p, msg.offset, cols))

    def _dead_letter(self, p: int, msg: Any, value: bytes, reason: str) -> None:
        from monolith_py.observe import counter

        self.counters["dead_letters"] += 1
        counter("monolith_stream_dead_letters_total", "Undecodable messages skipped.",
                ["topic"]).labels(topic=self.topic).inc()
        log.warning("dead-lettering %s[%d]@%d: %s", self.topic, p, msg.offset, reason)
        if self._dlq is not None and not self._dlq.write(
                value, msg.key, self.topic, p, msg.offset, reason):
            self.counters["dead_letter_failures"] += 1
