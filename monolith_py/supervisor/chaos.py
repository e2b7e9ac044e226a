"""Chaos: kill random roles and whole hosts at random (seeded) times.

:class:`Chaos` decides *when* (exponential gaps with mean ``mean_interval_s``, the first
not before ``first_after_s``) and *what* (a whole host with probability
``host_probability``, else one role among the candidates); the supervisor decides *whether
now* -- it strikes only when the job is healthy again: no recovery in progress, every role
running, and a snapshot sealed since the last recovery. With ``k``-of-``m`` erasure coding
one host may be lost at a time; waiting for a fresh seal makes every later loss
recoverable too. The same seed and the same candidates give the same decisions.

Example::

    >>> c = Chaos(ChaosConfig(seed=7, mean_interval_s=10, first_after_s=5), start=0.0)
    >>> c.due(now=1.0)
    False
    >>> kind, target = c.pick(["ps/0", "trainer/0", "smp/1"], hosts=[0, 1, 2])
    >>> kind in ("role", "host")
    True
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from monolith_py.errors import ConfigError

__all__ = ["ChaosConfig", "Chaos"]


@dataclass(frozen=True)
class ChaosConfig:
    """Args:
        seed: every decision derives from it.
        mean_interval_s: mean seconds between kills (exponential gaps).
        first_after_s: no kill before this many seconds after the start.
        min_gap_s: at least this many seconds between two kills.
        host_probability: share of kills that take a whole host.
        max_kills: stop after this many (``None``: no limit).
    """

    seed: int = 0
    mean_interval_s: float = 30.0
    first_after_s: float = 20.0
    min_gap_s: float = 5.0
    host_probability: float = 0.25
    max_kills: int | None = None

    def __post_init__(self) -> None:
        if self.mean_interval_s <= 0 or self.first_after_s < 0 or self.min_gap_s < 0:
            raise ConfigError("chaos intervals must be positive (mean_interval_s > 0, "
                              f"first_after_s >= 0, min_gap_s >= 0), got {self}")
        if not 0.0 <= self.host_probability <= 1.0:
            raise ConfigError(f"host_probability must be in [0, 1], got "
                              f"{self.host_probability}")
        if self.max_kills is not None and self.max_kills < 0:
            raise ConfigError(f"max_kills must be >= 0 or None, got {self.max_kills}")


class Chaos:
    """Seeded kill schedule; times are seconds on the caller's clock."""

    def __init__(self, config: ChaosConfig, start: float) -> None:
        self.config = config
        self._rng = random.Random(config.seed)
        self._next = start + config.first_after_s + self._gap()
        self.kills = 0

    def _gap(self) -> float:
        c = self.config
        return max(c.min_gap_s, self._rng.expovariate(1.0 / c.mean_interval_s))

    @property
    def next_at(self) -> float:
        return self._next

    def due(self, now: float) -> bool:
        """Whether a kill is due at ``now`` (the caller also checks the job is healthy)."""
        c = self.config
        if c.max_kills is not None and self.kills >= c.max_kills:
            return False
        return now >= self._next

    def pick(self, roles: Sequence[str], hosts: Sequence[int]) -> tuple[str, str | int]:
        """``("host", index)`` or ``("role", name)`` from the candidates (sorted first, so
        the choice depends only on the seed and the candidate sets)."""
        roles, hosts = sorted(roles), sorted(hosts)
        if not roles and not hosts:
            raise ConfigError("chaos has nothing to kill")
        if hosts and (not roles or self._rng.random() < self.config.host_probability):
            return "host", self._rng.choice(hosts)
        return "role", self._rng.choice(roles)

    def struck(self, now: float) -> None:
        """Record a kill at ``now`` and schedule the next one."""
        self.kills += 1
        self._next = now + self._gap()
