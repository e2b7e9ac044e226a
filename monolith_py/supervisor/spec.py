"""What the supervisor runs: one :class:`RoleSpec` per process.

A role is a command line plus what the supervisor needs to watch and restart it: where
its metrics are (heartbeat, step times), how it signals readiness, which simulated host it
belongs to (``host=None``: infrastructure outside every host, e.g. the local broker), and
what a death means (:data:`RESTART_POLICIES`).

Example::

    >>> spec = RoleSpec("ps/0", "ps", ("monolith", "ps", "--shard", "0"), host=0,
    ...                 metrics_url="http://127.0.0.1:9100/metrics")
    >>> spec.index, spec.restart
    (0, 'always')
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from monolith_py.errors import ConfigError

__all__ = ["RoleSpec", "KINDS", "RESTART_POLICIES", "START_ORDER"]

KINDS = ("broker", "producer", "joiner", "smp", "ps", "trainer", "serve")
"""Role kinds, in the order :func:`START_ORDER` starts them after a failure."""

START_ORDER = {"broker": 0, "smp": 1, "ps": 2, "joiner": 3, "serve": 4, "trainer": 5,
               "producer": 6}
"""Restart order: SMPs before the PS shards that snapshot to them, PS shards before the
trainers that restore them."""

RESTART_POLICIES = ("always", "never")
"""``always``: restart whenever it dies (or hangs); ``never``: a death fails the run (the
in-memory broker, a producer that cannot resume)."""

_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}(/[0-9]{1,4})?$")


@dataclass(frozen=True)
class RoleSpec:
    """One supervised process.

    Args:
        name: ``kind/index`` or a plain name (``"broker"``), unique in a job.
        kind: one of :data:`KINDS`.
        argv: the command line (``argv[0]`` an executable).
        host: simulated host index (its process group; killed together), ``None`` for
            infrastructure.
        metrics_url: its Prometheus endpoint (``None``: not scraped).
        health_url: an HTTP URL that answers 200 while it is alive (serving's ``/healthz``).
        ready_file: the role writes this file once it serves (removed before each start).
        heartbeat: watch ``monolith_heartbeat_beats_total{role=name}`` for hangs.
        restart: one of :data:`RESTART_POLICIES`.
        finite: the role ends by itself; exit status 0 means it is done (producers).
        chaos: ``monolith up --chaos`` may kill it.
        env: extra environment variables.
        start_timeout_s: how long it may take to become ready / send its first beat.
    """

    name: str
    kind: str
    argv: tuple[str, ...]
    host: int | None = None
    metrics_url: str | None = None
    health_url: str | None = None
    ready_file: str | None = None
    heartbeat: bool = True
    restart: str = "always"
    finite: bool = False
    chaos: bool = True
    env: tuple[tuple[str, str], ...] = field(default=())
    start_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ConfigError(f"role name must look like 'ps/0' or 'broker', got {self.name!r}")
        if self.kind not in KINDS:
            raise ConfigError(f"role {self.name}: kind must be one of {KINDS}, got {self.kind!r}")
        if not self.argv or not all(isinstance(a, str) for a in self.argv):
            raise ConfigError(f"role {self.name}: argv must be a non-empty tuple of strings")
        if self.restart not in RESTART_POLICIES:
            raise ConfigError(f"role {self.name}: restart must be one of {RESTART_POLICIES}, "
                              f"got {self.restart!r}")
        if self.host is not None and (isinstance(self.host, bool) or self.host < 0):
            raise ConfigError(f"role {self.name}: host must be an index >= 0 or None")
        if self.start_timeout_s <= 0:
            raise ConfigError(f"role {self.name}: start_timeout_s must be > 0")
        if self.heartbeat and self.metrics_url is None:
            raise ConfigError(f"role {self.name}: heartbeat=True needs a metrics_url")

    @property
    def index(self) -> int:
        """The number after the slash (0 for a plain name)."""
        _, _, idx = self.name.partition("/")
        return int(idx) if idx else 0
