"""Dead letters: undecodable input messages, kept byte for byte with where they came from.

A dead-letter message carries the original value and key unchanged and these headers:

==============================  ==========================================
``monolith-source-topic``       topic the message was read from (UTF-8)
``monolith-source-partition``   its partition (ASCII decimal)
``monolith-source-offset``      its offset (ASCII decimal)
``monolith-error``              why it was rejected (UTF-8, <= 2000 bytes)
==============================  ==========================================

The write is flushed before the caller moves its position past the message, so a
snapshot never covers a bad message whose copy was lost. After a restore from an older
snapshot the same message may be dead-lettered again: the headers identify duplicates.

Example::

    >>> dlq = DeadLetterWriter("127.0.0.1:9092", "examples-dlq")   # doctest: +SKIP
    >>> dlq.write(b"junk", None, "examples", 3, 17, "bad magic")   # doctest: +SKIP
"""

from __future__ import annotations

import logging

from monolith_py.errors import UnavailableError

__all__ = ["DLQ_HEADERS", "DeadLetterWriter"]

log = logging.getLogger(__name__)

DLQ_HEADERS = ("monolith-source-topic", "monolith-source-partition", "monolith-source-offset",
               "monolith-error")


class DeadLetterWriter:
    """Writes dead letters to one topic (created with one partition if missing).

    ``write`` returns False (and counts ``failures``) when the copy could not be written
    within ``timeout_s``; the caller still skips the message: a bad message costs a
    counter, never the job.
    """

    def __init__(self, bootstrap_servers: str, topic: str, *, client_id: str = "monolith-dlq",
                 timeout_s: float = 30.0) -> None:
        from streaming.sink import KafkaSink
        from streaming.topics import ensure_topic

        ensure_topic(bootstrap_servers, topic, 1, timeout_s=timeout_s)
        self.topic = topic
        self.timeout_s = timeout_s
        self._sink = KafkaSink(bootstrap_servers, topic, client_id=client_id)
        self.written = 0
        self.failures = 0

    def write(self, value: bytes, key: bytes | None, source_topic: str, partition: int,
              offset: int, reason: str) -> bool:
        headers = list(zip(DLQ_HEADERS, (source_topic.encode(), str(partition).encode(),
                                         str(offset).encode(),
                                         reason[:2000].encode("utf-8", "replace"))))
        try:
            self._sink.send(value, key=key, partition=0, headers=headers)
            self._sink.flush(timeout_s=self.timeout_s)
        except UnavailableError as exc:
            self.failures += 1
            log.error("could not dead-letter %s[%d]@%d: %s", source_topic, partition, offset,
                      exc)
            return False
        self.written += 1
        return True

    def close(self) -> None:
        self._sink.close()
