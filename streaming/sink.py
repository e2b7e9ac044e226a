"""The sink: an idempotent, batching Kafka producer of example messages.

Used by the replayer, the generator, the joiner and the source's dead-letter path. The
producer is idempotent with ``acks=all`` (no duplicates or reordering from its own
retries), batches messages (``linger_ms``) and accepts messages of several MB. Each
message is one encoded batch of examples; by default messages go round-robin over the
topic's partitions, or to an explicit ``partition``.

Delivery failures are collected from the send futures and raised by :meth:`flush` as one
:class:`~monolith_py.errors.UnavailableError`, so a caller that flushes before it
records progress never believes lost messages were written.

Example::

    >>> sink = KafkaSink("127.0.0.1:9092", "examples")    # doctest: +SKIP
    >>> sink.send_batch(batch); sink.flush(); sink.close() # doctest: +SKIP
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from monolith_py.errors import ConfigError, UnavailableError

if TYPE_CHECKING:
    from monolith_py.batch import Batch
    from streaming.columns import ExampleColumns

__all__ = ["SinkConfig", "KafkaSink"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SinkConfig:
    """Producer tuning. Defaults suit messages of ~0.1-10 MB on a LAN or loopback."""

    linger_ms: int = 5
    batch_bytes: int = 1 << 20
    max_request_bytes: int = 64 << 20
    delivery_timeout_s: float = 120.0
    max_block_s: float = 60.0
    compression: str | None = None

    def __post_init__(self) -> None:
        if self.linger_ms < 0:
            raise ConfigError(f"linger_ms must be >= 0, got {self.linger_ms}")
        if self.batch_bytes < 1 or self.max_request_bytes < 1024:
            raise ConfigError("batch_bytes must be >= 1 and max_request_bytes >= 1024, got "
                              f"{self.batch_bytes}, {self.max_request_bytes}")
        if self.delivery_timeout_s <= 0 or self.max_block_s <= 0:
            raise ConfigError("delivery_timeout_s and max_block_s must be > 0")
        if self.compression not in (None, "gzip", "snappy", "lz4", "zstd"):
            raise ConfigError(f"compression must be None, gzip, snappy, lz4 or zstd, got "
                              f"{self.compression!r}")


class KafkaSink:
    """Write encoded example batches (or raw bytes) to one topic.

    Args:
        bootstrap_servers: ``host:port[,host:port]``.
        topic: destination topic (create it first with ``streaming.topics.ensure_topic``
            to choose its partition count).
        config: :class:`SinkConfig`.
        client_id: shown in broker logs.

    Thread-safety: ``send*`` may be called from several threads (kafka-python's producer
    is thread-safe); ``flush``/``close`` from one.
    """

    def __init__(self, bootstrap_servers: str, topic: str, *,
                 config: SinkConfig = SinkConfig(), client_id: str = "monolith-sink") -> None:
        from kafka import KafkaProducer

        if not topic:
            raise ConfigError("topic must be a non-empty string")
        self.topic = topic
        self.config = config
        self._producer = KafkaProducer(
            bootstrap_servers=bootstrap_servers,
            client_id=client_id,
            acks="all",
            enable_idempotence=True,
            linger_ms=config.linger_ms,
            batch_size=config.batch_bytes,
            max_request_size=config.max_request_bytes,
            delivery_timeout_ms=int(config.delivery_timeout_s * 1000),
            request_timeout_ms=min(30000, int(config.delivery_timeout_s * 1000) - 1),
            max_block_ms=int(config.max_block_s * 1000),
            compression_type=config.compression,
        )
        self._lock = threading.Lock()
        self._errors: list[BaseException] = []
        self._rr: Any = None
        self.messages_sent = 0
        self.messages_acked = 0
        self.bytes_sent = 0
        self.last_offsets: dict[int, int] = {}

    def partitions(self) -> list[int]:
        """The topic's partitions (blocks up to ``max_block_s`` for metadata)."""
        found = self._producer.partitions_for(self.topic)
        return sorted(found or ())

    def _next_partition(self) -> int:
        if self._rr is None:
            parts = self.partitions()
            if not parts:
                raise UnavailableError(f"topic {self.topic!r} has no partitions yet")
            self._rr = itertools.cycle(parts)
        return int(next(self._rr))

    def send(self, value: bytes, *, partition: int | None = None, key: bytes | None = None,
             headers: Sequence[tuple[str, bytes]] | None = None) -> Any:
        """Queue one message; returns kafka-python's future. ``partition=None`` with no
        key picks partitions round-robin."""
        if partition is None and key is None:
            partition = self._next_partition()
        fut = self._producer.send(self.topic, value=value, key=key, partition=partition,
                                  headers=list(headers) if headers else None)
        fut.add_callback(self._on_ok)
        fut.add_errback(self._on_error)
        with self._lock:
            self.messages_sent += 1
            self.bytes_sent += len(value)
        return fut

    def send_batch(self, batch: Batch, **kw: Any) -> Any:
        """Encode and queue one :class:`Batch` as one message."""
        from streaming.codec import encode_batch

        return self.send(encode_batch(batch), **kw)

    def send_columns(self, cols: ExampleColumns, **kw: Any) -> Any:
        """Encode and queue columns as one message."""
        from streaming.codec import encode_columns

        return self.send(encode_columns(cols), **kw)

    def _on_ok(self, md: Any) -> None:
        with self._lock:
            self.messages_acked += 1
            if md.offset >= self.last_offsets.get(md.partition, -1):
                self.last_offsets[md.partition] = int(md.offset)

    def _on_error(self, exc: BaseException) -> None:
        log.error("delivery to %s failed: %s", self.topic, exc)
        with self._lock:
            self._errors.append(exc)

    def flush(self, timeout_s: float | None = None) -> None:
        """Block until every queued message is acknowledged (``acks=all``).

        Raises :class:`UnavailableError` if the flush times out or any message since the
        last flush failed (the failures are then cleared).
        """
        from kafka.errors import KafkaError

        try:
            self._producer.flush(timeout=timeout_s)
        except KafkaError as exc:
            raise UnavailableError(f"flush to {self.topic!r} did not finish: {exc}") from exc
        with self._lock:
            errors, self._errors = self._errors, []
        if errors:
            raise UnavailableError(
                f"{len(errors)} message(s) to {self.topic!r} were not delivered; first: "
                f"{type(errors[0]).__name__}: {errors[0]}")

    def close(self, timeout_s: float = 30.0) -> None:
        """Flush what can be flushed and close the producer."""
        try:
            self._producer.close(timeout=timeout_s)
        except Exception as exc:  # closing must not mask the caller's own error
            log.warning("closing the producer for %s: %s", self.topic, exc)

    def __enter__(self) -> KafkaSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
