"""Fault injection: kill (or fail) the current process at a named phase, reproducibly.

Library code calls :func:`fault_point` at the phases where a crash is interesting
(``"smp.encode"``, ``"coord.seal"``...). Without a plan it returns at once. A plan maps
phase names (or ``"*"``) to a probability; each call draws from a RNG seeded by the plan's
seed and the process label, so a run is reproducible. When the draw hits, the phase is
appended to ``log_path`` (fsynced, so the test learns what happened) and the process kills
itself with ``SIGKILL`` — the same thing ``kill -9`` does, no cleanup, no ``finally`` — or,
with ``action="raise"``, raises :class:`InjectedFault` (in-process tests).

A child process inherits the plan through the ``MONOLITH_FAULTS`` environment variable
(:meth:`FaultPlan.to_env`); it is installed when this module is first imported. With
``MONOLITH_FAULTS_FILE=<path>`` instead, the process (re)loads the plan whenever that file
changes (and drops it when the file is removed), so a test can arm a running process.

Example::

    >>> install(FaultPlan(seed=1, phases={"demo.phase": 1.0}, action="raise"))
    >>> try:
    ...     fault_point("demo.phase")
    ... except InjectedFault as exc:
    ...     print(exc)
    injected fault at demo.phase
    >>> install(None); fault_point("demo.phase")   # no plan: no-op
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import threading
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from monolith_py.errors import ConfigError, MonolithError

__all__ = ["FaultPlan", "InjectedFault", "install", "fault_point", "hits", "ENV", "FILE_ENV",
           "read_log", "arm"]

ENV = "MONOLITH_FAULTS"
FILE_ENV = "MONOLITH_FAULTS_FILE"
log = logging.getLogger("monolith.faults")


class InjectedFault(MonolithError):
    """Raised at a fault point by a plan with ``action="raise"``."""


@dataclass(frozen=True)
class FaultPlan:
    """Where and how often to fail.

    Args:
        seed: RNG seed (mixed with ``label``).
        phases: ``{phase name or "*": probability in [0, 1]}``.
        label: names this process (e.g. ``"smp1"``) so processes draw differently.
        action: ``"kill"`` (SIGKILL self) or ``"raise"`` (:class:`InjectedFault`).
        log_path: file to append ``"<label> <phase>"`` to before failing.
        max_faults: stop failing after this many faults in this process.
        skip: calls of each phase to let pass before drawing.
    """

    seed: int
    phases: Mapping[str, float] = field(default_factory=dict)
    label: str = ""
    action: str = "kill"
    log_path: str | None = None
    max_faults: int = 1
    skip: int = 0

    def __post_init__(self) -> None:
        if self.action not in ("kill", "raise"):
            raise ConfigError(f"FaultPlan.action must be 'kill' or 'raise', got {self.action!r}")
        for name, p in self.phases.items():
            if not isinstance(name, str) or not 0.0 <= float(p) <= 1.0:
                raise ConfigError(f"FaultPlan.phases: {name!r} -> {p!r}; expected a probability")

    def to_env(self, label: str | None = None) -> str:
        """The JSON for ``MONOLITH_FAULTS`` (optionally with another ``label``)."""
        return json.dumps({"seed": self.seed, "phases": dict(self.phases),
                           "label": self.label if label is None else label,
                           "action": self.action, "log_path": self.log_path,
                           "max_faults": self.max_faults, "skip": self.skip})

    @classmethod
    def from_env(cls, text: str) -> FaultPlan:
        try:
            d = json.loads(text)
            return cls(seed=int(d["seed"]), phases=dict(d.get("phases", {})),
                       label=str(d.get("label", "")), action=str(d.get("action", "kill")),
                       log_path=d.get("log_path"), max_faults=int(d.get("max_faults", 1)),
                       skip=int(d.get("skip", 0)))
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{ENV} is not a fault plan: {exc}") from exc


_plan: FaultPlan | None = None
_rng = random.Random(0)
_calls: dict[str, int] = {}
_hits: dict[str, int] = {}
_lock = threading.Lock()


def install(plan: FaultPlan | None) -> None:
    """Install ``plan`` in this process (``None`` removes it)."""
    global _plan, _rng
    with _lock:
        _plan = plan
        _calls.clear()
        _hits.clear()
        if plan is not None:
            _rng = random.Random(plan.seed * 1_000_003 + zlib.crc32(plan.label.encode()))


def hits() -> dict[str, int]:
    """Faults raised so far in this process, by phase."""
    with _lock:
        return dict(_hits)


def read_log(path: str) -> list[tuple[str, str]]:
    """``(label, phase)`` lines of a fault log (missing file: none)."""
    try:
        with open(path) as f:
            return [tuple(line.split(" ", 1)) for line in f.read().splitlines() if " " in line]  # type: ignore[misc]
    except FileNotFoundError:
        return []


_plan_file: str | None = None
_plan_stamp: tuple[int, int] | None = None


def arm(path: str, plan: FaultPlan | None) -> None:
    """Write ``plan`` to a plan file watched by a process (``None``: disarm)."""
    if plan is None:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(plan.to_env())
    os.replace(tmp, path)


_reload_lock = threading.Lock()


def _reload() -> None:
    global _plan_stamp
    assert _plan_file is not None
    try:
        st = os.stat(_plan_file)
        stamp: tuple[int, int] | None = (st.st_mtime_ns, st.st_ino)
    except FileNotFoundError:
        stamp = None
    if stamp == _plan_stamp:
        return
    with _reload_lock:  # one thread installs a new plan, once
        if stamp == _plan_stamp:
            return
        _plan_stamp = stamp
        if stamp is None:
            install(None)
            return
        try:
            with open(_plan_file) as f:
                install(FaultPlan.from_env(f.read()))
        except (OSError, ConfigError) as exc:
            log.warning("fault plan file %s unreadable: %s", _plan_file, exc)


def fault_point(name: str) -> None:
    """Maybe fail here (see the module docstring); a no-op without a plan."""
    if _plan_file is not None:
        _reload()
    plan = _plan
    if plan is None:
        return
    p = plan.phases.get(name, plan.phases.get("*", 0.0))
    if p <= 0.0:
        return
    with _lock:
        n = _calls.get(name, 0)
        _calls[name] = n + 1
        if n < plan.skip or sum(_hits.values()) >= plan.max_faults:
            return
        if _rng.random() >= p:
            return
        _hits[name] = _hits.get(name, 0) + 1
    if plan.log_path:
        fd = os.open(plan.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{plan.label or os.getpid()} {name}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)
    if plan.action == "raise":
        raise InjectedFault(f"injected fault at {name}")
    log.error("fault injection: killing process %d at %s", os.getpid(), name)
    os.kill(os.getpid(), signal.SIGKILL)


def _from_environment(env: Mapping[str, Any]) -> None:
    global _plan_file
    text = env.get(ENV)
    if text:
        install(FaultPlan.from_env(text))
    _plan_file = env.get(FILE_ENV) or None


_from_environment(os.environ)
