"""The job ``monolith up`` runs: every role's command line, its host, ports and files.

:func:`build_pipeline` turns a :class:`PipelineConfig` into :class:`RoleSpec`\\ s (plain
``monolith <command> ...`` command lines, so each role is exactly what an operator would
run by hand) and the addresses they share. Nothing is started here.

Layout with the defaults (3 simulated hosts, erasure code k=2 of m=3)::

    infra   broker (unless --bootstrap-servers), producer (MovieLens replay or generator)
    host 0  smp/0  ps/0  trainer/0
    host 1  smp/1  ps/1  (trainer/1 ...)
    host 2  smp/2  joiner/0  serve/0

Topics: ``<job>.impressions`` and ``<job>.actions`` (producer -> joiner) and
``<job>.examples`` (joiner -> trainers; 2 partitions per trainer).

Example::

    >>> from monolith_py.supervisor.pipeline import PipelineConfig, build_pipeline
    >>> p = build_pipeline(PipelineConfig(), "/tmp/run")
    >>> [r.name for r in p.roles]                                   # doctest: +NORMALIZE_WHITESPACE
    ['broker', 'smp/0', 'smp/1', 'smp/2', 'ps/0', 'ps/1', 'joiner/0', 'serve/0', 'trainer/0',
     'producer']
"""

from __future__ import annotations

import math
import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from monolith_py.errors import ConfigError
from monolith_py.supervisor.spec import RoleSpec

__all__ = ["PipelineConfig", "Pipeline", "build_pipeline", "free_port", "MOVIELENS_FEATURES",
           "MOVIELENS_SPAN_S"]

MOVIELENS_FEATURES = ("user", "movie", "genres", "user_genre", "year", "hour", "weekday")
MOVIELENS_SPAN_S = 1537799250 - 828124615
"""Event-time span of ml-latest-small (first to last rating)."""
_GENERATOR_CARDS = (100_000, 10_000, 1_000, 100)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class PipelineConfig:
    """Settings of the ``monolith up`` job (see ``docs/configuration.md``).

    Args:
        source: ``"movielens"`` (replay of ml-latest-small) or ``"generator"`` (synthetic).
        examples: how many impressions to produce (``None``: the whole MovieLens set;
            generator default 60000).
        produce_rate: impressions per wall second (0: as fast as possible).
        hosts: simulated hosts (one SMP each); ``k``/``m``: erasure code of the snapshots.
        ps_shards, trainers: how many of each.
        batch_size: examples per training step (per trainer).
        dim: embedding dim.
        snapshot_every_s: seconds between snapshots (one trainer).
        snapshot_every_steps: rounds between snapshots (several trainers).
        checkpoint_every: a universal checkpoint every N sealed snapshots (0: never).
        window_s: the joiner's window in event-time seconds (``None``: half a wall second
            of event time for MovieLens, whose actions come with their impressions; 120 for
            the generator, whose clicks come 20 event-seconds later on average).
        job: job and topic prefix.
        sync_interval_s: serving sync period.
        ps_deadline_s: how long a trainer waits for a PS shard before failing.
        job_config: a job config file for the PS shards and trainers (``--config``).
        python: the interpreter that runs the roles.
    """

    source: str = "movielens"
    examples: int | None = None
    produce_rate: float = 1500.0
    hosts: int = 3
    k: int = 2
    m: int = 3
    ps_shards: int = 2
    trainers: int = 1
    batch_size: int = 512
    dim: int = 16
    snapshot_every_s: float = 5.0
    snapshot_every_steps: int = 20
    checkpoint_every: int = 10
    window_s: int | None = None
    job: str = "up"
    sync_interval_s: float = 1.0
    ps_deadline_s: float = 15.0
    seed: int = 0
    job_config: str | None = None
    python: str = field(default_factory=lambda: sys.executable)

    def __post_init__(self) -> None:
        if self.source not in ("movielens", "generator"):
            raise ConfigError(f"source must be 'movielens' or 'generator', got {self.source!r}")
        if self.hosts < 1 or self.ps_shards < 1 or self.trainers < 1:
            raise ConfigError(f"need hosts, ps_shards, trainers >= 1, got {self.hosts}, "
                              f"{self.ps_shards}, {self.trainers}")
        if not 1 <= self.k <= self.m <= self.hosts:
            raise ConfigError(f"erasure code needs 1 <= k <= m <= hosts, got k={self.k}, "
                              f"m={self.m}, hosts={self.hosts} (e.g. --hosts 3 --k 2 --m 3)")
        if self.examples is not None and self.examples < 1:
            raise ConfigError(f"examples must be >= 1, got {self.examples}")
        if self.produce_rate < 0 or self.batch_size < 1 or self.dim < 1:
            raise ConfigError("produce_rate >= 0, batch_size >= 1 and dim >= 1 are required")
        if not self.job.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"job must be letters, digits, '-' or '_', got {self.job!r}")

    @property
    def features(self) -> tuple[str, ...]:
        if self.source == "movielens":
            return MOVIELENS_FEATURES
        return tuple(f"f{i}" for i in range(len(_GENERATOR_CARDS)))

    @property
    def time_scale(self) -> float:
        """Event-time seconds per wall second of the produced stream. MovieLens is paced by
        count (22 years in about a minute); the generator runs 100x faster than real time."""
        rate = self.produce_rate or 10_000.0
        if self.source == "movielens":
            return MOVIELENS_SPAN_S * rate / float(self.examples or 100_836)
        return 100.0

    @property
    def joiner_window_s(self) -> int:
        """The joiner's window (event time). A positive is emitted when its action comes,
        a negative only when the watermark passes the window: a window much longer than
        the actions' delay makes the trainer see a session's positives before its
        negatives (MovieLens users rate many movies at once), which hurts the model."""
        if self.window_s is not None:
            return self.window_s
        return 3600 if self.source == "movielens" else 120

    @property
    def joiner_horizon_s(self) -> int:
        """How long the joiner remembers requests after their window. An impression that
        comes more than window + horizon behind the watermark is dropped as late, and the
        two input topics are read up to a poll apart: one wall second of event time."""
        return max(self.joiner_window_s, int(math.ceil(1.0 * self.time_scale)))

    @property
    def total_examples(self) -> int | None:
        """Impressions the producer writes when it runs to the end (``None``: unknown)."""
        if self.source == "generator":
            return self.examples or 60_000
        return self.examples


@dataclass
class Pipeline:
    """Roles and shared addresses of one ``monolith up`` job."""

    config: PipelineConfig
    run_dir: str
    bootstrap: str
    roles: list[RoleSpec]
    hosts: dict[int, str]                  # host -> shared-memory directory
    smp_group: tuple[str, ...]
    ps_addresses: tuple[str, ...]
    serve_url: str
    topics: dict[str, str]
    joiner_state: str
    checkpoint_dir: str

    def role(self, name: str) -> RoleSpec:
        for r in self.roles:
            if r.name == name:
                return r
        raise ConfigError(f"no role {name!r}")

    def final_joiner(self) -> RoleSpec:
        """The joiner that reads the inputs to their end, closes every window and exits."""
        j = self.role("joiner/0")
        return replace(j, argv=(*j.argv, "--until-caught-up", "--drain"), finite=True,
                       chaos=False)


def build_pipeline(config: PipelineConfig, run_dir: str, *, bootstrap: str | None = None,
                   port: Callable[[], int] = free_port,
                   shm_root: str | None = None) -> Pipeline:
    """The roles of the job (see the module docstring). ``bootstrap``: an existing Kafka
    cluster (``None``: a ``broker`` role runs the local broker). ``port`` picks free ports
    (fixed for the whole run, so restarted roles keep their addresses)."""
    c = config
    picked: set[int] = set()

    def next_port() -> int:  # distinct: a port just released may be handed out again
        for _ in range(1000):
            p = port()
            if p not in picked:
                picked.add(p)
                return p
        raise ConfigError("could not pick distinct free ports")

    run_dir = os.path.abspath(run_dir)
    ready = os.path.join(run_dir, "ready")
    shm_root = shm_root or ("/dev/shm" if os.path.isdir("/dev/shm") else run_dir)
    tag = f"{c.job}-{os.getpid()}"
    cli = (c.python, "-m", "monolith_py.cli")
    hosts = {h: os.path.join(shm_root, f"monolith-{tag}-h{h}") for h in range(c.hosts)}
    smp_ports = [next_port() for _ in range(c.hosts)]
    smp_group = tuple(f"127.0.0.1:{p}" for p in smp_ports)
    ps_addresses = tuple(f"127.0.0.1:{next_port()}" for _ in range(c.ps_shards))
    topics = {"impressions": f"{c.job}.impressions", "actions": f"{c.job}.actions",
              "examples": f"{c.job}.examples"}
    feats = ",".join(c.features)
    conf = ("--config", os.path.abspath(c.job_config)) if c.job_config else ()
    ckpt = os.path.join(run_dir, "checkpoints")
    joiner_state = os.path.join(run_dir, "joiner.state")
    roles: list[RoleSpec] = []
    if bootstrap is None:
        bport = next_port()
        bootstrap = f"127.0.0.1:{bport}"
        roles.append(RoleSpec("broker", "broker", (
            *cli, "broker", "--port", str(bport), "--ready-file", os.path.join(ready, "broker")),
            heartbeat=False, restart="never", chaos=False,
            ready_file=os.path.join(ready, "broker")))

    def metrics() -> tuple[str, str]:
        p = str(next_port())
        return p, f"http://127.0.0.1:{p}/metrics"

    def ready_file(name: str) -> str:
        return os.path.join(ready, name.replace("/", "-"))

    for h in range(c.hosts):
        mp, url = metrics()
        roles.append(RoleSpec(f"smp/{h}", "smp", (
            *cli, "smp", "--job", c.job, "--host-id", str(h), "--port", str(smp_ports[h]),
            "--peers", ",".join(smp_group), "--k", str(c.k), "--m", str(c.m),
            "--shm-dir", hosts[h], "--place-timeout-s", "30", "--metrics-port", mp,
            "--ready-file", ready_file(f"smp/{h}")), host=h, metrics_url=url,
            ready_file=ready_file(f"smp/{h}")))
    for i, addr in enumerate(ps_addresses):
        h = i % c.hosts
        mp, url = metrics()
        roles.append(RoleSpec(f"ps/{i}", "ps", (
            *cli, "ps", *conf, "--shard", str(i), "--num-shards", str(c.ps_shards),
            "--port", addr.rpartition(":")[2], "--features", feats, "--dim", str(c.dim),
            "--smp", smp_group[h], "--smp-group", ",".join(smp_group), "--host-id", str(h),
            "--job", c.job, "--checkpoint-dir", ckpt, "--metrics-port", mp,
            "--ready-file", ready_file(f"ps/{i}")), host=h, metrics_url=url,
            ready_file=ready_file(f"ps/{i}")))
    side = c.hosts - 1
    mp, url = metrics()
    examples_parts = max(2, 2 * c.trainers)
    roles.append(RoleSpec("joiner/0", "joiner", (
        *cli, "joiner", "--bootstrap-servers", bootstrap,
        "--impressions-topic", topics["impressions"], "--actions-topic", topics["actions"],
        "--output-topic", topics["examples"], "--partitions", str(examples_parts),
        "--window-s", str(c.joiner_window_s), "--horizon-s", str(c.joiner_horizon_s),
        "--state-file", joiner_state,
        "--checkpoint-every-s", "2", "--metrics-port", mp), host=side, metrics_url=url))
    serve_port = next_port()
    serve_url = f"http://127.0.0.1:{serve_port}"
    roles.append(RoleSpec("serve/0", "serve", (
        *cli, "serve", "--ps", ",".join(ps_addresses), "--port", str(serve_port),
        "--sync-interval", str(c.sync_interval_s)), host=side,
        metrics_url=f"{serve_url}/metrics", health_url=f"{serve_url}/healthz",
        heartbeat=False))
    dist = f"tcp://127.0.0.1:{next_port()}"
    trainer_hosts = ",".join(str(r % c.hosts) for r in range(c.trainers))
    for r in range(c.trainers):
        h = r % c.hosts
        mp, url = metrics()
        snap = (["--snapshot-every-s", str(c.snapshot_every_s)] if c.trainers == 1 else
                ["--snapshot-every-steps", str(c.snapshot_every_steps)])
        roles.append(RoleSpec(f"trainer/{r}", "trainer", (
            *cli, "trainer", *conf, "--rank", str(r), "--world-size", str(c.trainers),
            "--ps", ",".join(ps_addresses), "--bootstrap-servers", bootstrap,
            "--topic", topics["examples"], "--batch-size", str(c.batch_size),
            "--features", feats, "--dim", str(c.dim), "--dist-init", dist,
            "--set", f"ps.deadline_s={c.ps_deadline_s}", "--set", "ps.connect_timeout_s=120",
            "--set", f"trainers.seed={c.seed}",
            "--smp-group", ",".join(smp_group), "--host-id", str(h), "--job", c.job,
            "--trainer-hosts", trainer_hosts, *snap, "--restore", "latest",
            "--checkpoint-dir", ckpt, "--checkpoint-every", str(c.checkpoint_every),
            "--metrics-port", mp, "--every", "1000000",
            "--group-id", f"monolith-{c.job}"), host=h, metrics_url=url))
    roles.append(_producer(c, cli, bootstrap, topics))
    os.makedirs(ready, exist_ok=True)
    return Pipeline(c, run_dir, bootstrap, roles, hosts, smp_group, ps_addresses, serve_url,
                    topics, joiner_state, ckpt)


def _producer(c: PipelineConfig, cli: tuple[str, ...], bootstrap: str,
              topics: dict[str, str]) -> RoleSpec:
    if c.source == "movielens":
        argv = [*cli, "replay", "movielens", "--bootstrap-servers", bootstrap,
                "--topic", topics["impressions"], "--actions-topic", topics["actions"],
                "--batch-size", "256", "--rate", str(c.produce_rate)]
        if c.examples is not None:
            argv += ["--limit", str(c.examples)]
    else:
        argv = [*cli, "generate", "--bootstrap-servers", bootstrap,
                "--topic", topics["impressions"], "--actions-topic", topics["actions"],
                "--partitions", "2", "--examples", str(c.total_examples),
                "--batch-size", "256", "--cardinalities", ",".join(map(str, _GENERATOR_CARDS)),
                "--click-delay-s", "20", "--rate", str(c.produce_rate), "--seed", str(c.seed),
                "--events-per-s", str(max(1.0, (c.produce_rate or 10_000.0) / c.time_scale))]
    return RoleSpec("producer", "producer", tuple(argv), heartbeat=False, restart="never",
                    finite=True, chaos=False)
