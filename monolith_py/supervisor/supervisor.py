"""The supervisor: start the roles, watch them, restart what fails, record everything.

Call order (one thread drives it; recoveries run on a helper thread)::

    sup = Supervisor(roles, run_dir, hosts={0: "/dev/shm/...", ...}, config=...)
    sup.start()                   # every role, in START_ORDER, waiting for ready files
    while not done:
        sup.tick()                # exits, heartbeats, hangs, stragglers, chaos; ~interval
    sup.shutdown()                # everything, reverse order, SIGTERM then SIGKILL

Each :meth:`tick` (about ``interval_s``):

1. **exits** -- a finite role that exits 0 is *done*; any other exit is a death;
2. **scrape** every role's ``/metrics`` (in parallel, short timeout) and derive the series
   of the status page (:mod:`.collect`);
3. **readiness** -- ready file written, first heartbeat, or health URL answering;
4. **hangs** -- a heartbeat counter that did not move for ``hung_misses`` x
   ``heartbeat_interval_s`` (:func:`~monolith_py.observe.heartbeat.is_hung`; for a role
   without a main loop to beat, e.g. serving, its ``/metrics`` not answering): the role is
   killed (SIGKILL) and treated as dead;
5. **stragglers** among trainers (step time) and PS shards (RPC time)
   (:func:`~monolith_py.observe.stragglers.find_stragglers`): recorded, shown, not killed;
6. **recovery** -- failures are planned by :func:`.policy.plan_recovery` and carried out
   on a helper thread (stop, start in order, wait for readiness), one plan at a time;
7. **chaos** (optional) when the job is healthy and a kill is due (:mod:`.chaos`).

Every decision is an event (:class:`.events.EventLog`).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from monolith_py.errors import ConfigError, MonolithError
from monolith_py.observe.heartbeat import STEPS, is_hung
from monolith_py.observe.metrics import counter, gauge
from monolith_py.observe.stragglers import StragglerPolicy, find_stragglers
from monolith_py.observe.timeseries import Samples, SeriesStore, select
from monolith_py.supervisor.chaos import Chaos, ChaosConfig
from monolith_py.supervisor.collect import Scraper, beats, derive
from monolith_py.supervisor.events import EventLog
from monolith_py.supervisor.policy import RecoveryPlan, plan_recovery
from monolith_py.supervisor.process import ProcessGroup, terminate
from monolith_py.supervisor.spec import START_ORDER, RoleSpec
from monolith_py.supervisor.watchers import LogWatcher, SnapshotWatcher

__all__ = ["Supervisor", "SupervisorConfig", "RoleState"]

log = logging.getLogger("monolith.supervisor")

STATUSES = ("pending", "starting", "running", "done", "stopped", "dead", "restarting")


@dataclass(frozen=True)
class SupervisorConfig:
    """Args:
        interval_s: seconds between ticks (scrapes).
        heartbeat_interval_s: a role beats at least this often; ``hung_misses`` intervals
            without progress make it hung.
        stragglers: the straggler rule (factor x median for k intervals).
        stop_grace_s: SIGTERM -> SIGKILL delay at shutdown.
        max_restarts: restarts of one role before the run is declared failed.
        smp_group, job: the SMP group (snapshot timeline; empty: none).
        chaos: kill roles and hosts at random (``None``: off).
    """

    interval_s: float = 1.0
    heartbeat_interval_s: float = 5.0
    hung_misses: int = 2
    stragglers: StragglerPolicy = field(default_factory=StragglerPolicy)
    stop_grace_s: float = 20.0
    max_restarts: int = 25
    smp_group: tuple[str, ...] = ()
    job: str = "monolith"
    chaos: ChaosConfig | None = None

    def __post_init__(self) -> None:
        if self.interval_s <= 0 or self.heartbeat_interval_s <= 0 or self.hung_misses < 1:
            raise ConfigError("interval_s and heartbeat_interval_s must be > 0 and "
                              f"hung_misses >= 1, got {self}")
        if self.max_restarts < 0 or self.stop_grace_s < 0:
            raise ConfigError("max_restarts and stop_grace_s must be >= 0")


@dataclass
class RoleState:
    """What the supervisor knows about one role (mutable; guarded by the lock)."""

    spec: RoleSpec
    status: str = "pending"
    proc: subprocess.Popen[bytes] | None = None
    started_at: float | None = None
    ready_at: float | None = None
    beats: float | None = None
    beat_changed_at: float | None = None
    restarts: int = 0
    exit_code: int | None = None
    scraped: tuple[float, Samples] | None = None
    straggler: bool = False
    stepped: bool = False

    def view(self, now: float) -> dict[str, Any]:
        s = self.spec
        return {"name": s.name, "kind": s.kind, "host": s.host, "status": self.status,
                "pid": self.proc.pid if self.proc is not None else None,
                "restarts": self.restarts, "exit_code": self.exit_code,
                "uptime_s": None if self.started_at is None else round(now - self.started_at, 1),
                "beat_age_s": None if self.beat_changed_at is None
                else round(now - self.beat_changed_at, 1),
                "straggler": self.straggler, "metrics_url": s.metrics_url}


class Supervisor:
    """See the module docstring.

    Args:
        roles: the job's roles (unique names).
        run_dir: logs (``<role>.log`` with ``/`` as ``-``) and ``events.jsonl``.
        hosts: ``{host index: shared-memory directory or None}`` of the simulated hosts.
        config: :class:`SupervisorConfig`.
        events: an event log (default: ``run_dir/events.jsonl``).
        clock: monotonic seconds.
    """

    def __init__(self, roles: Sequence[RoleSpec], run_dir: str, *,
                 hosts: Mapping[int, str | None] | None = None,
                 config: SupervisorConfig = SupervisorConfig(), events: EventLog | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        names = [r.name for r in roles]
        if len(set(names)) != len(names):
            raise ConfigError(f"role names must be unique, got {names}")
        self.config = config
        self.run_dir = run_dir
        os.makedirs(run_dir, exist_ok=True)
        self.events = events or EventLog(os.path.join(run_dir, "events.jsonl"))
        self.clock = clock
        self.t0 = clock()
        self.roles: dict[str, RoleState] = {r.name: RoleState(r) for r in roles}
        host_ids = sorted({r.host for r in roles if r.host is not None} | set(hosts or {}))
        self.groups: dict[int | None, ProcessGroup] = {
            h: ProcessGroup(f"host{h}", (hosts or {}).get(h)) for h in host_ids}
        self.groups[None] = ProcessGroup("infra")
        self.series = SeriesStore()
        self.scraper = Scraper()
        self.snapshots = SnapshotWatcher(config.smp_group, config.job, self.events)
        self.logs = LogWatcher(self.log_paths, self.events,
                               kinds=lambda n: self.roles[n].spec.kind)
        self.chaos = Chaos(config.chaos, clock()) if config.chaos is not None else None
        self.phase = "starting"
        self.fatal: str | None = None
        self._lock = threading.RLock()
        self._failed: set[str] = set()
        self._recovery: threading.Thread | None = None
        self._last_recovery_end: float | None = None
        self._snap_at_recovery = -1
        self._step_hist: deque[dict[str, float]] = deque(maxlen=max(30, config.stragglers.k))
        self._stop = threading.Event()
        self._watching = False
        self._m_restarts = counter("monolith_supervisor_restarts_total", "Role restarts.",
                                   ["role"])
        self._m_up = gauge("monolith_supervisor_role_up", "1 while the role runs.", ["role"])

    # -- paths -------------------------------------------------------------------------------

    def log_path(self, name: str) -> str:
        return os.path.join(self.run_dir, name.replace("/", "-") + ".log")

    def log_paths(self) -> dict[str, str]:
        return {n: self.log_path(n) for n in self.roles}

    def elapsed(self) -> float:
        return self.clock() - self.t0

    # -- starting and stopping -----------------------------------------------------------------

    def _spawn(self, name: str) -> None:
        st = self.roles[name]
        spec = st.spec
        if spec.ready_file and os.path.exists(spec.ready_file):
            os.remove(spec.ready_file)
        proc = self.groups[spec.host].spawn(spec.argv, self.log_path(name), dict(spec.env))
        with self._lock:
            st.proc, st.status, st.exit_code = proc, "starting", None
            st.started_at, st.ready_at = self.clock(), None
            st.beats = st.beat_changed_at = None
            st.scraped = None
            st.straggler = st.stepped = False
        self._m_up.labels(role=name).set(1)
        self.events.record("started", name, f"pid {proc.pid}" + (
            f" on host {spec.host}" if spec.host is not None else ""), pid=proc.pid)

    def _wait_ready(self, names: Sequence[str], timeout_s: float | None = None) -> None:
        """Wait until each role is ready (ready file / first beat / health URL)."""
        pending = list(names)
        deadline = {n: self.clock() + (timeout_s or self.roles[n].spec.start_timeout_s)
                    for n in pending}
        while pending:
            if self._stop.is_set():
                raise MonolithError("stopped while waiting for roles to start")
            for n in list(pending):
                st = self.roles[n]
                if st.proc is None:
                    pending.remove(n)
                    continue
                if self._check_ready(st) or st.status in ("running", "done"):
                    pending.remove(n)
                elif st.proc.poll() is not None:
                    raise MonolithError(f"{n} exited with {st.proc.returncode} while starting; "
                                        f"see {self.log_path(n)}")
                elif self.clock() > deadline[n]:
                    raise MonolithError(f"{n} did not become ready within "
                                        f"{st.spec.start_timeout_s:.0f} s; see {self.log_path(n)}")
            if pending:
                time.sleep(0.1)

    def _check_ready(self, st: RoleState) -> bool:
        """Promote a starting role to running when it shows it is ready."""
        if st.status != "starting":
            return st.status == "running"
        spec = st.spec
        ok = False
        if spec.ready_file:
            ok = os.path.exists(spec.ready_file)
        elif spec.heartbeat:
            ok = st.beats is not None
        elif spec.health_url:
            ok = _http_ok(spec.health_url)
        else:
            ok = True
        if ok:
            with self._lock:
                st.status, st.ready_at = "running", self.clock()
            took = st.ready_at - (st.started_at or st.ready_at)
            self.events.record("ready", spec.name, f"ready after {took:.1f} s")
        return ok

    def start(self, names: Sequence[str] | None = None) -> None:
        """Start roles (default: all) in :data:`START_ORDER` stages; each stage waits
        until its roles are ready, so dependencies come up first."""
        todo = [n for n in (names or list(self.roles))]
        stages: dict[int, list[str]] = {}
        for n in todo:
            stages.setdefault(START_ORDER[self.roles[n].spec.kind], []).append(n)
        if not self._watching:
            self._watching = True
            self.logs.start()
            self.snapshots.start()
        for _, stage in sorted(stages.items()):
            for n in stage:
                self._spawn(n)
            self._wait_ready([n for n in stage if self.roles[n].spec.ready_file])
        self.phase = "running"

    def start_role(self, name: str, wait: bool = True) -> None:
        self._spawn(name)
        if wait:
            self._wait_ready([name])

    def stop_role(self, name: str, grace_s: float | None = None,
                  sig: int = signal.SIGTERM) -> int | None:
        """Stop one role on purpose (no recovery). Returns its exit code."""
        st = self.roles[name]
        with self._lock:
            if st.status in ("pending", "stopped", "done") or st.proc is None:
                return st.exit_code
            st.status = "stopped"
        proc = st.proc
        if sig != signal.SIGTERM and proc.poll() is None:
            proc.send_signal(sig)
        terminate([proc], self.config.stop_grace_s if grace_s is None else grace_s)
        st.exit_code = proc.returncode
        self._m_up.labels(role=name).set(0)
        return st.exit_code

    def replace(self, spec: RoleSpec) -> None:
        """Change a role's spec (takes effect at its next start)."""
        with self._lock:
            self.roles[spec.name].spec = spec

    def send_signal(self, name: str, sig: int) -> None:
        st = self.roles[name]
        if st.proc is not None and st.proc.poll() is None:
            st.proc.send_signal(sig)

    def request_stop(self) -> None:
        """Abort waits for roles to start and any recovery (thread- and signal-safe)."""
        self._stop.set()

    def shutdown(self) -> None:
        """Stop every role (reverse start order), the watchers and the keepers."""
        self._stop.set()
        self.phase = "stopping"
        if self._recovery is not None:
            self._recovery.join(timeout=self.config.stop_grace_s + 60)
        order = sorted(self.roles.values(),
                       key=lambda s: -START_ORDER[s.spec.kind])
        by_stage: dict[int, list[RoleState]] = {}
        for st in order:
            by_stage.setdefault(START_ORDER[st.spec.kind], []).append(st)
        for _, stage in sorted(by_stage.items(), reverse=True):
            procs = []
            for st in stage:
                if st.proc is not None and st.proc.poll() is None:
                    with self._lock:
                        st.status = "stopped"
                    procs.append(st.proc)
            terminate(procs, self.config.stop_grace_s)
            for st in stage:
                if st.proc is not None:
                    st.exit_code = st.proc.returncode
                self._m_up.labels(role=st.spec.name).set(0)
        self.logs.close()
        self.snapshots.close()
        self.scraper.close()
        for g in self.groups.values():
            g.close()
        self.phase = "stopped"
        self.events.record("phase", None, "every role stopped")

    # -- the loop ------------------------------------------------------------------------------

    def tick(self) -> None:
        """One round of watching (see the module docstring)."""
        now = self.clock()
        self._poll_exits()
        self._scrape(now)
        for st in list(self.roles.values()):
            if st.status == "starting":
                self._check_ready(st)
        self._check_hangs(now)
        self._check_stragglers()
        self._maybe_recover()
        self._maybe_chaos(now)

    def _poll_exits(self) -> None:
        for name, st in self.roles.items():
            with self._lock:
                if st.proc is None or st.status not in ("starting", "running"):
                    continue
                rc = st.proc.poll()
                if rc is None:
                    continue
                st.exit_code = rc
                if st.spec.finite and rc == 0:
                    st.status = "done"
                    self._m_up.labels(role=name).set(0)
                    self.events.record("exited", name, "finished (exit status 0)")
                    continue
                st.status = "dead"
                self._failed.add(name)
            self._m_up.labels(role=name).set(0)
            self.events.record("died", name, f"exit status {rc}", exit_code=rc)

    def _scrape(self, now: float) -> None:
        urls = {n: st.spec.metrics_url for n, st in self.roles.items()
                if st.spec.metrics_url and st.status in ("starting", "running")}
        got = self.scraper.scrape(urls) if urls else {}
        wall = time.time()  # metrics carry wall-clock timestamps (sync freshness)
        t = round(wall, 2)
        steps: dict[str, float] = {}
        for name, samples in got.items():
            st = self.roles[name]
            if samples is None:
                continue
            # a role without a main loop to beat (serving): a successful scrape is its beat
            b = beats(samples, name) if st.spec.heartbeat else (st.beats or 0.0) + 1.0
            with self._lock:
                if b is not None and b != st.beats:
                    st.beats, st.beat_changed_at = b, now
                prev, st.scraped = st.scraped, (wall, samples)
                if not st.stepped and (select(samples, STEPS, role=name) or 0) > 0:
                    st.stepped = True
            for key, v in derive(st.spec.kind, name, samples, prev, wall).items():
                self.series.add(key, t, v)
                if key.startswith("step_s:") and st.spec.kind == "trainer":
                    steps[name] = v
                if key.startswith("rpc_ms:"):
                    steps[name] = v
        self._step_hist.append(steps)
        self._aggregate(t)

    def _aggregate(self, t: float) -> None:
        """Job-wide series: total examples/s, total lag, total rows."""
        for series, kind in (("ex_rate", "trainer"), ("lag", "trainer"), ("rows", "ps")):
            vals = [self.series.last(f"{series}:{n}") for n, st in self.roles.items()
                    if st.spec.kind == kind and st.status == "running"]
            known = [v for v in vals if v is not None]
            if known:
                self.series.add(f"{series}:all", t, float(sum(known)))

    def _check_hangs(self, now: float) -> None:
        c = self.config
        for name, st in self.roles.items():
            watched = st.spec.heartbeat or st.spec.metrics_url is not None
            if not watched or st.status not in ("starting", "running"):
                continue
            # a trainer's first step (model build, first collectives, compiled kernels
            # loading) is judged by the start timeout; its loop beats from then on
            last = None if st.spec.kind == "trainer" and not st.stepped else st.beat_changed_at
            hung = is_hung(last, now, c.heartbeat_interval_s, c.hung_misses,
                           started=st.started_at, start_timeout_s=st.spec.start_timeout_s)
            if not hung:
                continue
            with self._lock:
                st.status = "dead"
                self._failed.add(name)
            why = ("no first heartbeat or step within the start timeout" if last is None
                   else f"no heartbeat progress for {now - last:.1f} s")
            self.events.record("hung", name, f"{why}: killed")
            if st.proc is not None and st.proc.poll() is None:
                st.proc.kill()
                st.proc.wait(timeout=30)
            self._m_up.labels(role=name).set(0)

    def _check_stragglers(self) -> None:
        pol = self.config.stragglers
        for kind in ("trainer", "ps"):
            members = [n for n, st in self.roles.items()
                       if st.spec.kind == kind and st.status == "running"]
            if len(members) < 2:
                continue
            series = {n: [h.get(n) for h in self._step_hist] for n in members}
            flagged = set(find_stragglers(series, factor=pol.factor, k=pol.k))
            for n in members:
                st = self.roles[n]
                if (n in flagged) != st.straggler:
                    st.straggler = n in flagged
                    what = "trainer step time" if kind == "trainer" else "PS RPC time"
                    msg = (f"{what} above {pol.factor}x the median for {pol.k} intervals"
                           if st.straggler else "back within the median band")
                    self.events.record("straggler" if st.straggler else "info", n, msg)

    # -- recovery ------------------------------------------------------------------------------

    @property
    def recovering(self) -> bool:
        return self._recovery is not None and self._recovery.is_alive()

    def finished_roles(self) -> set[str]:
        return {n for n, st in self.roles.items() if st.status in ("done", "stopped")}

    def _maybe_recover(self) -> None:
        if self.recovering or self.fatal is not None:
            return
        with self._lock:
            failed, self._failed = set(self._failed), set()
        if not failed:
            return
        plan = plan_recovery(failed, {n: st.spec for n, st in self.roles.items()},
                             finished=self.finished_roles())
        if plan.fatal is None:
            over = [n for n in plan.failed if self.roles[n].restarts >= self.config.max_restarts]
            if over:
                plan = RecoveryPlan(plan.failed, (), (), False,
                                    f"{', '.join(over)} restarted {self.config.max_restarts} "
                                    "times already")
        if plan.fatal is not None:
            self.fatal = plan.fatal
            self.events.record("error", None, f"cannot recover: {plan.fatal}")
            return
        self._recovery = threading.Thread(target=self._recover, args=(plan,),
                                          name="recovery", daemon=True)
        self._recovery.start()

    def _recover(self, plan: RecoveryPlan) -> None:
        t0 = self.clock()
        self.events.record("restart", None,
                           f"failed: {', '.join(plan.failed)}; restarting "
                           f"{', '.join(plan.start)}" + (
                               f" (stopping {', '.join(plan.stop)} first)" if plan.stop else ""),
                           failed=list(plan.failed), start=list(plan.start))
        try:
            for n in plan.stop:
                st = self.roles[n]
                with self._lock:
                    st.status = "restarting"
                if st.proc is not None and st.proc.poll() is None:
                    st.proc.kill()  # it restores from the snapshot anyway
                    st.proc.wait(timeout=60)
            for n in plan.start:
                with self._lock:
                    self.roles[n].status = "restarting"
            if plan.restore:
                self._announce_restore()
            stages: dict[int, list[str]] = {}
            for n in plan.start:
                stages.setdefault(START_ORDER[self.roles[n].spec.kind], []).append(n)
            for _, stage in sorted(stages.items()):
                if self._stop.is_set():
                    return
                for n in stage:
                    st = self.roles[n]
                    if st.proc is not None and st.proc.poll() is None:
                        st.proc.kill()
                        st.proc.wait(timeout=60)
                    st.restarts += 1
                    self._m_restarts.labels(role=n).inc()
                    self._spawn(n)
                self._wait_ready([n for n in stage if self.roles[n].spec.ready_file])
            self._wait_ready(list(plan.start))  # heartbeats too: recovered = serving again
            self._last_recovery_end = self.clock()
            newest = self.snapshots.newest()
            self._snap_at_recovery = newest["id"] if newest else -1
            self.events.record("recovered", None,
                               f"restarted {', '.join(plan.start)} in "
                               f"{self.clock() - t0:.1f} s", seconds=round(self.clock() - t0, 2))
        except MonolithError as exc:
            if self._stop.is_set():
                return
            self.events.record("error", None, f"recovery failed: {exc}")
            with self._lock:  # try again at the next tick
                for n in plan.start:
                    proc = self.roles[n].proc
                    if proc is None or proc.poll() is not None:
                        self._failed.add(n)

    def _announce_restore(self) -> None:
        """Say which snapshot the trainers will restore (the roles do the restore)."""
        names = [n for n, st in self.roles.items() if st.spec.kind in ("trainer", "ps")]
        if not self.config.smp_group:
            return
        try:
            from monolith_py.snapshot.recovery import Recovery
            from monolith_py.snapshot.smp import smp_clients

            clients = smp_clients(self.config.smp_group, timeout_s=3.0)
            try:
                man = Recovery(clients, job=self.config.job).newest_common(names)
            finally:
                for c in clients.values():
                    c.close()
        except MonolithError as exc:
            self.events.record("restore", None, f"snapshot catalog unavailable ({exc}); the "
                               "trainers fall back to the newest checkpoint or start fresh")
            return
        if man is None:
            self.events.record("restore", None, "no sealed snapshot yet: the trainers start "
                               "from the beginning of the stream")
        else:
            self.events.record("restore", None,
                               f"job-wide restore of snapshot {man.snapshot_id} (step "
                               f"{man.step}): trainers seek to its offsets, rank 0 reloads "
                               "every PS shard", snapshot_id=man.snapshot_id, step=man.step)

    # -- chaos ---------------------------------------------------------------------------------

    def healthy(self) -> bool:
        """No recovery running or pending, every live role running, and a snapshot sealed
        since the last recovery (so one more loss is recoverable)."""
        if self.recovering or self._failed or self.fatal is not None:
            return False
        if any(st.status in ("starting", "dead", "restarting") for st in self.roles.values()):
            return False
        if not self.config.smp_group:
            return True
        newest = self.snapshots.newest()
        return newest is not None and newest["id"] > self._snap_at_recovery

    def _maybe_chaos(self, now: float) -> None:
        if self.chaos is None or self.phase != "running" or not self.chaos.due(now):
            return
        if not self.healthy():
            return
        roles = [n for n, st in self.roles.items()
                 if st.spec.chaos and st.status == "running"]
        hosts = sorted(h for h in self.groups if h is not None and all(
            st.spec.chaos for st in self.roles.values() if st.spec.host == h
            and st.status == "running"))
        if not roles and not hosts:
            return
        kind, target = self.chaos.pick(roles, hosts)
        self.chaos.struck(now)
        if kind == "host":
            victims = [n for n, st in self.roles.items() if st.spec.host == target
                       and st.status in ("starting", "running")]
            self.events.record("chaos", None, f"killing host {target} ({', '.join(victims)}) "
                               "and wiping its shared memory", host=target, victims=victims)
            self.groups[int(target)].kill()
        else:
            st = self.roles[str(target)]
            self.events.record("chaos", str(target), "kill -9", pid=st.proc.pid
                               if st.proc else None)
            if st.proc is not None and st.proc.poll() is None:
                st.proc.kill()
                st.proc.wait(timeout=30)
        self._poll_exits()

    # -- views ---------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        now = self.clock()
        with self._lock:
            roles = [st.view(now) for st in self.roles.values()]
        return {"phase": self.phase, "elapsed_s": round(now - self.t0, 1), "roles": roles,
                "recovering": self.recovering, "fatal": self.fatal,
                "restarts": sum(st.restarts for st in self.roles.values()),
                "events": self.events.counts(), "snapshots": self.snapshots.timeline(),
                "snapshot_problems": self.snapshots.problems[:5],
                "chaos": None if self.chaos is None else {
                    "kills": self.chaos.kills,
                    "next_in_s": round(max(0.0, self.chaos.next_at - now), 1)}}


def _http_ok(url: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:  # noqa: S310 (loopback)
            return bool(200 <= r.status < 300)
    except (OSError, ValueError):
        return False
