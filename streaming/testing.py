"""Test helpers: the session-wide ``kafka_broker`` pytest fixture and small utilities.

``tests/conftest.py`` re-exports :func:`kafka_broker`, so every tier can take it::

    def test_roundtrip(kafka_broker):
        sink = KafkaSink(kafka_broker.bootstrap_servers, "t")

Set ``MONOLITH_TEST_BOOTSTRAP=host:port`` to run the tests against an existing broker
instead of starting the local one.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from streaming.broker import LocalBroker

__all__ = ["kafka_broker", "ExternalBroker", "unique_topic"]


@dataclass(frozen=True)
class ExternalBroker:
    """A broker the tests did not start (``MONOLITH_TEST_BOOTSTRAP``)."""

    bootstrap_servers: str


def unique_topic(prefix: str = "t") -> str:
    """A topic name no other test uses (topics outlive tests on a shared broker)."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def kafka_broker(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LocalBroker | ExternalBroker]:
    """One local broker per test session on a free loopback port (stopped at the end).

    Yields an object with ``.bootstrap_servers`` (``"127.0.0.1:PORT"``). Tests should
    use their own topics (:func:`unique_topic`) and must not pause or stop this broker
    (start a private :class:`LocalBroker` for fault injection).
    """
    external = os.environ.get("MONOLITH_TEST_BOOTSTRAP")
    if external:
        yield ExternalBroker(external)
        return
    log_path = tmp_path_factory.mktemp("kafka-broker") / "broker.log"
    broker = LocalBroker(log_path=log_path).start()
    try:
        yield broker
    finally:
        broker.stop()
