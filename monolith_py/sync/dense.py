"""``DensePusher``: the trainer-side hook that publishes dense weights every
``dense_sync_interval`` seconds.

Call :meth:`DensePusher.maybe_push` after each training step (rank 0 only); it publishes
``(spec, model.state_dict())`` when the interval has passed, to a
:class:`~monolith_py.sync.publisher.DenseBoard` in-process or to shard 0's sync service
through :class:`~monolith_py.sync.service.SyncClient`. A failed push is logged and retried
at the next step (serving keeps the previous dense state meanwhile).

Example::

    >>> from monolith_py.modules.spec import ModelSpec
    >>> from monolith_py.sync.publisher import DenseBoard
    >>> from monolith_py.table import TableConfig
    >>> spec = ModelSpec.dlrm([TableConfig("item", dim=4)], 2, (8, 4), (8,))
    >>> board = DenseBoard()
    >>> pusher = DensePusher(board, spec.to_dict(), spec.build(seed=0), interval_s=5.0,
    ...                      clock=lambda: 0.0)
    >>> pusher.maybe_push(), pusher.maybe_push()   # first call publishes, then waits
    (True, False)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from monolith_py.errors import MonolithError

__all__ = ["DensePusher"]

log = logging.getLogger("monolith.sync")


class DensePusher:
    """Publishes a model's dense state at most every ``interval_s`` seconds.

    Args:
        target: a ``DenseBoard`` (``put_state``) or a ``SyncClient`` (``put_dense``).
        spec: ``ModelSpec.to_dict()`` of the model.
        model: the torch module whose ``state_dict()`` is published.
        interval_s: the dense sync interval.
        clock: monotonic seconds (injectable for tests).
    """

    def __init__(self, target: Any, spec: Mapping[str, Any], model: Any, *,
                 interval_s: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._put = getattr(target, "put_state", None) or getattr(target, "put_dense")
        self._spec = dict(spec)
        self._model = model
        self._interval = float(interval_s)
        self._clock = clock
        self._last: float | None = None
        self.pushes = 0
        self.failures = 0

    def push(self) -> bool:
        """Publish now; False (logged) when the target is unreachable or refuses."""
        try:
            self._put(self._spec, self._model.state_dict())
        except MonolithError as exc:
            self.failures += 1
            log.warning("dense push failed (retrying next step): %s", exc)
            return False
        self.pushes += 1
        return True

    def maybe_push(self) -> bool:
        """Publish if ``interval_s`` passed since the last attempt; True if published."""
        now = self._clock()
        if self._last is not None and now - self._last < self._interval:
            return False
        self._last = now
        return self.push()
