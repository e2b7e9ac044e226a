"""Streaming: Kafka source/sink, example codec, joiner, local broker launcher.

The names below are re-exported lazily (PEP 562), so ``import streaming`` -- done by the
``monolith`` command for every subcommand -- stays free of numpy, torch and kafka-python.

Example::

    >>> from streaming import KafkaExampleSource, encode_batch, decode_batch  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "encode_batch", "decode_batch", "encode_columns", "decode_columns", "CodecLimits",
    "ExampleColumns",
    "KafkaExampleSource", "SourceOptions",
    "KafkaSink", "SinkConfig",
    "LocalBroker",
    "ensure_topic",
    "JoinerConfig", "JoinState", "Joiner",
    "SyntheticConfig", "SyntheticCTR",
]

_WHERE = {
    "encode_batch": "codec", "decode_batch": "codec", "encode_columns": "codec",
    "decode_columns": "codec", "CodecLimits": "codec",
    "ExampleColumns": "columns",
    "KafkaExampleSource": "source", "SourceOptions": "source",
    "KafkaSink": "sink", "SinkConfig": "sink",
    "LocalBroker": "broker",
    "ensure_topic": "topics",
    "JoinerConfig": "join", "JoinState": "join", "Joiner": "joiner",
    "SyntheticConfig": "generate", "SyntheticCTR": "generate",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'streaming' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"streaming.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
