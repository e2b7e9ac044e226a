"""Trainer positions committed to the broker under a consumer group, for lag tools.

monolith never reads these offsets back: a trainer resumes from the Kafka positions held
in its sealed snapshot, which is what makes a restore exactly-once. Committing the same
positions under a consumer group (``kafka.group_id`` in the job config) lets the usual
tools show how far the job is behind its topic::

    kafka-consumer-groups.sh --bootstrap-server kafka1:9092 --describe --group monolith-ctr

:class:`OffsetCommitter` runs its own consumer on its own thread (a kafka-python consumer
is not thread-safe, and the trainer's consumer lives on its prefetch thread), keeps only
the newest positions it was given, and never lets a broker problem reach training:
failures are logged, counted (``monolith_kafka_commit_failures_total``) and retried
with the next positions.

Example::

    committer = OffsetCommitter("127.0.0.1:9092", "examples", "monolith-ctr")
    committer.submit({0: 1200, 1: 1187})      # partition -> next offset to read
    committer.close()                         # commits what is pending, then stops
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Any

from monolith_py.errors import ConfigError
from monolith_py.jobconfig import check_group_id
from monolith_py.observe.metrics import counter, gauge

__all__ = ["OffsetCommitter"]

log = logging.getLogger(__name__)

class OffsetCommitter:
    """Commits ``{partition: next offset}`` of ``topic`` under ``group_id`` (see the
    module docstring).

    Args:
        bootstrap_servers: the cluster.
        topic: the topic the positions belong to.
        group_id: the consumer group to commit under.
        timeout_s: how long one commit (and the final one in :meth:`close`) may take.
        consumer_factory: builds the kafka-python consumer (tests; default
            ``kafka.KafkaConsumer``).
    """

    def __init__(self, bootstrap_servers: str, topic: str, group_id: str, *,
                 timeout_s: float = 30.0, consumer_factory: Any = None) -> None:
        if not topic:
            raise ConfigError("OffsetCommitter needs a topic")
        if not timeout_s > 0:
            raise ConfigError(f"timeout_s must be > 0, got {timeout_s!r}")
        self.bootstrap_servers = bootstrap_servers
        self.topic = topic
        self.group_id = check_group_id(group_id)
        self.timeout_s = float(timeout_s)
        self._factory = consumer_factory
        self._cv = threading.Condition()
        self._latest: dict[int, int] | None = None
        self._busy = False
        self._closed = False
        self.committed: dict[int, int] = {}
        self.commits = 0
        self.failures = 0
        self._m_fail = counter("monolith_kafka_commit_failures_total",
                               "Offset commits to the consumer group that failed.", ["group"])
        self._m_off = gauge("monolith_kafka_committed_offset",
                            "Next offset committed per partition (lag tools read it).",
                            ["group", "partition"])
        self._thread = threading.Thread(target=self._run, name="offset-commit", daemon=True)
        self._thread.start()

    def submit(self, offsets: Mapping[Any, Any]) -> None:
        """Queue ``{partition: next offset}`` for commit (replacing anything still
        pending: only the newest positions matter). Never blocks, never raises for the
        broker's sake; a malformed mapping is a :class:`ConfigError`."""
        try:
            parsed = {int(p): int(o) for p, o in offsets.items()}
        except (TypeError, ValueError, AttributeError) as exc:
            raise ConfigError(f"offsets must map partitions to offsets: {exc}") from None
        if any(p < 0 or o < 0 for p, o in parsed.items()):
            raise ConfigError(f"partitions and offsets must be >= 0, got {parsed}")
        if not parsed:
            return
        with self._cv:
            if self._closed:
                return
            self._latest = parsed
            self._cv.notify_all()

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until nothing is pending or being committed; ``False`` on timeout."""
        with self._cv:
            return self._cv.wait_for(lambda: self._latest is None and not self._busy,
                                     timeout=self.timeout_s if timeout_s is None else timeout_s)

    def close(self) -> None:
        """Commit what is pending (bounded by ``timeout_s``), then stop the thread."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(self.timeout_s + 5.0)

    def __enter__(self) -> OffsetCommitter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- the committing thread ------------------------------------------------------------------

    def _consumer(self) -> Any:
        if self._factory is not None:
            return self._factory()
        from kafka import KafkaConsumer

        ms = int(self.timeout_s * 1000)
        return KafkaConsumer(bootstrap_servers=self.bootstrap_servers, group_id=self.group_id,
                             enable_auto_commit=False, request_timeout_ms=max(ms, 1000),
                             client_id=f"monolith-offsets-{self.group_id}")

    def _commit(self, consumer: Any, offsets: dict[int, int]) -> None:
        from kafka import TopicPartition
        from kafka.structs import OffsetAndMetadata

        consumer.commit({TopicPartition(self.topic, p): OffsetAndMetadata(o, "", -1)
                         for p, o in offsets.items()}, timeout_ms=int(self.timeout_s * 1000))

    def _run(self) -> None:
        consumer: Any = None
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._latest is not None or self._closed)
                if self._latest is None:
                    break  # closed with nothing pending
                offsets, self._latest = self._latest, None
                self._busy = True
            try:
                if consumer is None:
                    consumer = self._consumer()
                self._commit(consumer, offsets)
            except Exception as exc:  # any broker or client failure: count, keep going
                self.failures += 1
                self._m_fail.labels(self.group_id).inc()
                log.warning("committing offsets %s of %s under group %r failed: %s",
                            offsets, self.topic, self.group_id, exc)
                if consumer is not None:
                    _close_quietly(consumer)
                    consumer = None
            else:
                self.commits += 1
                self.committed = dict(offsets)
                for p, o in offsets.items():
                    self._m_off.labels(self.group_id, str(p)).set(o)
            finally:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()
            with self._cv:
                if self._closed and self._latest is None:
                    break
        if consumer is not None:
            _close_quietly(consumer)


def _close_quietly(consumer: Any) -> None:
    try:
        consumer.close(autocommit=False)
    except Exception:  # closing a broken client must not mask what broke it
        log.debug("closing the offset consumer failed", exc_info=True)
