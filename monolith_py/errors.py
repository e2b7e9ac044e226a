"""One exception tree for monolith-py.

Every error the library raises on purpose derives from :class:`MonolithError`. The
``retriable`` flag tells callers whether trying again later can succeed (a shard that is
down, a broker that is restarting) or not (bad input, a corrupt block that no parity can
rebuild). Errors about caller input also derive from the matching built-in (``ValueError``,
``TypeError``) so generic handlers keep working.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = [
    "MonolithError",
    "ConfigError",
    "InvalidInputError",
    "InvalidTypeError",
    "DecodeError",
    "CorruptDataError",
    "RetriableError",
    "UnavailableError",
    "DeadlineExceededError",
    "ShardError",
    "SnapshotError",
    "NoValidSnapshotError",
]


class MonolithError(Exception):
    """Base of every error raised by monolith-py on purpose."""

    retriable: bool = False


class ConfigError(MonolithError, ValueError):
    """A configuration value is invalid. The message says what was expected, what came,
    and how to fix it."""


class InvalidInputError(MonolithError, ValueError):
    """An argument passed to an API call is invalid (wrong shape, NaN, out of range).
    Raised before any state changes."""


class InvalidTypeError(InvalidInputError, TypeError):
    """An argument has the wrong type or dtype (e.g. float keys). Catchable as
    ``TypeError`` or ``ValueError``."""


class DecodeError(MonolithError):
    """Bytes from outside (a Kafka message, an RPC payload, an HTTP body, a snapshot
    block) do not decode. Callers count it and move on; it is never fatal."""


class CorruptDataError(DecodeError):
    """Bytes decode structurally but fail an integrity check (checksum, sizes)."""


class RetriableError(MonolithError):
    """A transient failure: trying again later may succeed."""

    retriable = True


class UnavailableError(RetriableError):
    """A peer (PS shard, broker, SMP, serving worker) does not answer."""


class DeadlineExceededError(RetriableError):
    """An operation did not finish before its deadline (after retries with backoff)."""


class ShardError(MonolithError):
    """One operation failed on several shards; names each one.

    ``errors`` maps a shard (index or address) to the error it raised. The error is
    retriable only if every shard's error is.
    """

    def __init__(self, operation: str, errors: Mapping[object, BaseException]) -> None:
        self.operation = operation
        self.errors = dict(errors)
        parts = "; ".join(f"shard {k}: {type(e).__name__}: {e}" for k, e in self.errors.items())
        super().__init__(f"{operation} failed on {len(self.errors)} shard(s): {parts}")

    @property
    def retriable(self) -> bool:  # type: ignore[override]
        return bool(self.errors) and all(
            getattr(e, "retriable", False) for e in self.errors.values()
        )


class SnapshotError(MonolithError):
    """A snapshot could not be taken, stored or restored."""


class NoValidSnapshotError(SnapshotError):
    """Recovery found nothing valid to restore from (no sealed snapshot in any SMP, no
    decodable erasure-coded copy, no intact disk checkpoint)."""
