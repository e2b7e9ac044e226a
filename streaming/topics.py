"""Topic administration: create a topic with a partition count, list its partitions.

Kafka brokers (and the local one) may auto-create a topic on first produce, but with the
broker's default partition count; the commands here create topics explicitly so the
partition count (the unit of parallelism and of offsets-as-state) is chosen by the user.

Example::

    >>> ensure_topic("127.0.0.1:9092", "examples", partitions=4)   # doctest: +SKIP
    4
"""

from __future__ import annotations

import logging
import time

from monolith_py.errors import ConfigError, UnavailableError

__all__ = ["ensure_topic", "partitions_for", "assign_partitions"]

log = logging.getLogger(__name__)


def ensure_topic(bootstrap_servers: str, topic: str, partitions: int = 1, *,
                 timeout_s: float = 30.0) -> int:
    """Create ``topic`` with ``partitions`` partitions unless it exists; return the
    topic's partition count (an existing topic keeps its own count; a mismatch is logged).

    Raises :class:`UnavailableError` when the broker cannot be reached in ``timeout_s``.
    """
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import KafkaError, TopicAlreadyExistsError

    if not topic or len(topic) > 249:
        raise ConfigError(f"topic name must be 1..249 characters, got {topic!r}")
    if partitions < 1:
        raise ConfigError(f"partitions must be >= 1, got {partitions}")
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers,
                                     request_timeout_ms=int(min(timeout_s, 30) * 1000))
        except KafkaError as exc:
            last = exc
            time.sleep(0.2)
            continue
        try:
            try:
                admin.create_topics([NewTopic(topic, num_partitions=partitions,
                                              replication_factor=1)])
            except TopicAlreadyExistsError:
                pass
            got = partitions_for(bootstrap_servers, topic, timeout_s=max(
                1.0, deadline - time.monotonic()))
            if got != partitions:
                log.info("topic %r exists with %d partitions (asked for %d)", topic, got,
                         partitions)
            return got
        except KafkaError as exc:
            last = exc
            time.sleep(0.2)
        finally:
            admin.close()
    raise UnavailableError(f"could not create topic {topic!r} on {bootstrap_servers} within "
                           f"{timeout_s}s: {last}")


def partitions_for(bootstrap_servers: str, topic: str, *, timeout_s: float = 30.0) -> int:
    """Number of partitions of ``topic``; waits up to ``timeout_s`` for it to exist."""
    from kafka import KafkaConsumer
    from kafka.errors import KafkaError

    deadline = time.monotonic() + timeout_s
    consumer = None
    try:
        while True:
            try:
                if consumer is None:
                    consumer = KafkaConsumer(bootstrap_servers=bootstrap_servers,
                                             enable_auto_commit=False)
                found = consumer.partitions_for_topic(topic)
                if found:
                    return len(found)
            except KafkaError:
                pass
            if time.monotonic() >= deadline:
                raise UnavailableError(
                    f"topic {topic!r} not found on {bootstrap_servers} within {timeout_s}s; "
                    "create it first (e.g. with `monolith generate` or ensure_topic)")
            time.sleep(0.2)
    finally:
        if consumer is not None:
            consumer.close()


def assign_partitions(partitions: list[int], rank: int, world_size: int) -> list[int]:
    """The partitions rank ``rank`` of ``world_size`` reads: every ``world_size``-th of
    the sorted list, starting at ``rank`` (a pure function; every rank computes the same
    split).

    >>> assign_partitions([0, 1, 2, 3, 4], rank=1, world_size=2)
    [1, 3]
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"need 0 <= rank < world_size, got rank={rank}, "
                          f"world_size={world_size}")
    mine = sorted(partitions)[rank::world_size]
    if not mine:
        raise ConfigError(
            f"rank {rank} of {world_size} gets no partition: the topic has only "
            f"{len(partitions)}; use at most {len(partitions)} readers or add partitions")
    return mine
