"""The recovery policy: which roles to restart, in which order, after a failure.

A pure function of the failed roles and the job's roles (no processes, no clock), so it is
unit-tested on its own. The rules follow the snapshot design (docs/design/0006):

* **restores are job-wide**: trainers and PS shards must resume from the *same* sealed
  snapshot, so when any trainer or PS shard fails, every trainer is stopped and restarted
  with ``--restore latest``; trainer rank 0 then makes every PS shard load that snapshot
  and every trainer seeks its partitions to the stored offsets (recovery order inside the
  roles: local SMP copy, then erasure-coded blocks from peer SMPs, then the newest disk
  checkpoint -- :mod:`monolith_py.snapshot.recovery`);
* a restarted **PS shard** starts empty (the trainers' restore fills it);
* a restarted **SMP** rebuilds its share of the blocks from its peers;
* the **joiner** resumes from its state file (its output stays exactly-once), the
  **serving** worker resyncs from the PS shards;
* a role with ``restart="never"`` (the in-memory broker, producers) cannot be recovered:
  the plan is fatal.

Start order: SMPs, PS shards, joiner, serving, trainers (:data:`~.spec.START_ORDER`).

Example::

    >>> from monolith_py.supervisor.spec import RoleSpec
    >>> roles = {n: RoleSpec(n, k, ("x",), heartbeat=False) for n, k in [
    ...     ("smp/0", "smp"), ("ps/0", "ps"), ("ps/1", "ps"), ("trainer/0", "trainer"),
    ...     ("trainer/1", "trainer"), ("joiner/0", "joiner")]}
    >>> plan = plan_recovery({"ps/1"}, roles)
    >>> plan.stop, plan.start, plan.restore
    (('trainer/0', 'trainer/1'), ('ps/1', 'trainer/0', 'trainer/1'), True)
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

from monolith_py.supervisor.spec import START_ORDER, RoleSpec

__all__ = ["RecoveryPlan", "plan_recovery"]


@dataclass(frozen=True)
class RecoveryPlan:
    """What to do about a set of failed roles.

    Attributes:
        failed: the roles that died or hung (sorted).
        stop: healthy roles to stop first because they restart with the failed ones.
        start: roles to start, in order.
        restore: trainers restart from the newest sealed snapshot (job-wide).
        fatal: why the job cannot continue (``None``: recoverable).
    """

    failed: tuple[str, ...]
    stop: tuple[str, ...]
    start: tuple[str, ...]
    restore: bool
    fatal: str | None = None


def _order(names: Collection[str], roles: Mapping[str, RoleSpec]) -> tuple[str, ...]:
    return tuple(sorted(names, key=lambda n: (START_ORDER[roles[n].kind], roles[n].index, n)))


def plan_recovery(failed: Collection[str], roles: Mapping[str, RoleSpec],
                  finished: Collection[str] = ()) -> RecoveryPlan:
    """The plan for ``failed`` roles (names in ``roles``); ``finished`` roles (done,
    exit 0) are never restarted."""
    failed_t = tuple(sorted(failed))
    unknown = [n for n in failed_t if n not in roles]
    if unknown:
        return RecoveryPlan(failed_t, (), (), False, f"unknown roles {unknown}")
    fatal = [n for n in failed_t if roles[n].restart == "never"]
    if fatal:
        return RecoveryPlan(failed_t, (), (), False,
                            f"{', '.join(fatal)} cannot be restarted (restart='never')")
    start = set(failed_t) - set(finished)
    stop: set[str] = set()
    restore = any(roles[n].kind in ("ps", "trainer") for n in start)
    if restore:
        trainers = {n for n, r in roles.items() if r.kind == "trainer" and n not in finished}
        stop = trainers - start
        start |= trainers
    return RecoveryPlan(failed_t, _order(stop, roles), _order(start, roles), restore)
