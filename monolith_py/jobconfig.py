"""The job config: one TOML or YAML file describing tables, PS shards, trainers and topics.

Every role of a multi-process job (``monolith ps``, ``monolith trainer``) reads the same
file, so they agree on the tables and the shard layout; command-line flags override single
values (``--set section.key=value`` for any of them). Unknown keys are rejected with the
list of known ones, at every level, so a typo never silently falls back to a default.

Layout (all sections optional; ``examples/job.toml`` is a complete example)::

    [table_defaults]          # shared by every table below (any TableConfig field)
    dim = 16
    optimizer = { kind = "adagrad", lr = 0.05 }

    [[tables]]                # one entry per table; fields override table_defaults
    name = "user"
    features = ["user", "clicked_users"]    # default: [name]

    [model]
    features = ["f0", "f1"]   # shortcut: one table per feature, from table_defaults
    num_dense = 13            # default: the width of the first batch
    bottom_mlp = [32]         # the embedding dim is appended (dot interaction)
    top_mlp = [64, 32]
    interaction = "dot"
    dense_optimizer = "adagrad"
    dense_lr = 0.01

    [ps]
    addresses = ["127.0.0.1:50051", "127.0.0.1:50052"]   # shard i at position i

    [trainers]
    world_size = 2
    dist_init = "tcp://127.0.0.1:29500"

    [kafka]
    bootstrap_servers = "127.0.0.1:9092"
    topic = "examples"

Example::

    >>> job = job_from_dict({"model": {"features": ["a", "b"]},
    ...                      "table_defaults": {"dim": 8}}, {"ps.addresses": "h:1,h:2"})
    >>> [t.name for t in job.tables], job.tables[0].dim, job.ps.addresses
    (['a', 'b'], 8, ('h:1', 'h:2'))
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from monolith_py.errors import ConfigError
from monolith_py.table import OptimizerConfig, TableConfig

__all__ = [
    "PSSection",
    "TrainersSection",
    "ModelSection",
    "KafkaSection",
    "JobConfig",
    "load_job",
    "read_job_file",
    "job_from_dict",
    "parse_override",
]

_MAX_FILE_BYTES = 4 << 20


def _typed(where: str, value: Any, kind: type | tuple[type, ...], what: str) -> Any:
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise ConfigError(f"{where} must be {what}, got {value!r}")
    if not isinstance(value, kind):
        raise ConfigError(f"{where} must be {what}, got {value!r} ({type(value).__name__})")
    return value


def _positive(where: str, value: Any) -> float:
    v = _typed(where, value, (int, float), "a positive number")
    if not math.isfinite(v) or v <= 0:
        raise ConfigError(f"{where} must be a positive number, got {value!r}")
    return float(v)


@dataclass(frozen=True)
class PSSection:
    """``[ps]``: the shards and how clients talk to them.

    Args:
        addresses: ``host:port`` of shard ``i`` at position ``i`` (its length is the
            number of shards).
        max_message_mb: largest gRPC message either way (clients split under it).
        deadline_s: longest a trainer waits for one operation (with retries).
        connect_timeout_s: how long a trainer waits for the shards at start.
        async_push: send gradients without waiting (the next pull waits for them).
        host: where ``monolith ps`` listens (default: the host of its address).
    """

    addresses: tuple[str, ...] = ()
    max_message_mb: float = 4.0
    deadline_s: float = 60.0
    connect_timeout_s: float = 120.0
    async_push: bool = True
    host: str | None = None

    def __post_init__(self) -> None:
        addrs = self.addresses
        if isinstance(addrs, str):
            addrs = tuple(a.strip() for a in addrs.split(",") if a.strip())
        if not isinstance(addrs, (list, tuple)) or not all(isinstance(a, str) for a in addrs):
            raise ConfigError(f"ps.addresses must be a list of 'host:port' strings, got {addrs!r}")
        object.__setattr__(self, "addresses", tuple(addrs))
        for a in self.addresses:
            host, sep, port = a.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigError(f"ps.addresses entry {a!r} is not host:port "
                                  "(e.g. 127.0.0.1:50051)")
        mb = _positive("ps.max_message_mb", self.max_message_mb)
        if not 0.125 <= mb <= 1024:
            raise ConfigError(f"ps.max_message_mb must be in [0.125, 1024], got {mb}")
        _positive("ps.deadline_s", self.deadline_s)
        _positive("ps.connect_timeout_s", self.connect_timeout_s)
        _typed("ps.async_push", self.async_push, bool, "true or false")
        if self.host is not None:
            _typed("ps.host", self.host, str, "a host name or address")

    @property
    def max_message_bytes(self) -> int:
        return int(self.max_message_mb * (1 << 20))


@dataclass(frozen=True)
class TrainersSection:
    """``[trainers]``: the data-parallel trainers.

    Args:
        world_size: number of trainer processes.
        dist_init: ``torch.distributed`` init method shared by the trainers (gloo).
        dist_timeout_s: how long a collective may wait for a peer.
        batch_size: target examples per step (per trainer).
        max_wait_s: train on a partial batch after this wait.
        evict_interval_s: event-time seconds between evictions (0: never).
        metrics_window: examples in the windowed metrics.
        seed: dense initialization seed (identical on every trainer).
        dense_sync_interval_s: seconds between publications of the dense weights to
            serving (rank 0, through PS shard 0's sync service; 0: never).
    """

    world_size: int = 1
    dist_init: str = "tcp://127.0.0.1:29500"
    dist_timeout_s: float = 300.0
    batch_size: int = 1024
    max_wait_s: float = 1.0
    evict_interval_s: int = 30 * 86400
    metrics_window: int = 5000
    seed: int = 0
    dense_sync_interval_s: float = 5.0

    def __post_init__(self) -> None:
        w = _typed("trainers.world_size", self.world_size, int, "a positive int")
        if w < 1:
            raise ConfigError(f"trainers.world_size must be >= 1, got {w}")
        d = _typed("trainers.dist_init", self.dist_init, str, "an init method URL")
        if not d.startswith(("tcp://", "file://", "env://")):
            raise ConfigError(f"trainers.dist_init must start with tcp://, file:// or env://, "
                              f"got {d!r}")
        _positive("trainers.dist_timeout_s", self.dist_timeout_s)
        if _typed("trainers.batch_size", self.batch_size, int, "a positive int") < 1:
            raise ConfigError(f"trainers.batch_size must be >= 1, got {self.batch_size}")
        if _typed("trainers.max_wait_s", self.max_wait_s, (int, float), "a number") < 0:
            raise ConfigError(f"trainers.max_wait_s must be >= 0, got {self.max_wait_s}")
        if _typed("trainers.evict_interval_s", self.evict_interval_s, int, "an int") < 0:
            raise ConfigError("trainers.evict_interval_s must be >= 0 (0: never)")
        if _typed("trainers.metrics_window", self.metrics_window, int, "an int") < 1:
            raise ConfigError("trainers.metrics_window must be >= 1")
        if _typed("trainers.seed", self.seed, int, "an int") < 0:
            raise ConfigError("trainers.seed must be >= 0")
        if _typed("trainers.dense_sync_interval_s", self.dense_sync_interval_s, (int, float),
                  "a number") < 0:
            raise ConfigError("trainers.dense_sync_interval_s must be >= 0 (0: never)")


@dataclass(frozen=True)
class ModelSection:
    """``[model]``: the DLRM over the tables and its dense optimizer.

    Args:
        features: shortcut, one table per feature built from ``[table_defaults]``.
        num_dense: dense input width (``None``: taken from the first batch).
        bottom_mlp: hidden sizes of the bottom MLP; the embedding dim is appended.
        top_mlp: hidden sizes of the top MLP.
        interaction: ``"dot"`` or ``"cat"``.
        dense_optimizer: ``"adagrad"``, ``"adam"`` or ``"sgd"``.
        dense_lr: its learning rate.
    """

    features: tuple[str, ...] = ()
    num_dense: int | None = None
    bottom_mlp: tuple[int, ...] = (32,)
    top_mlp: tuple[int, ...] = (64, 32)
    interaction: str = "dot"
    dense_optimizer: str = "adagrad"
    dense_lr: float = 0.01

    def __post_init__(self) -> None:
        feats = self.features
        if isinstance(feats, str):
            feats = tuple(f.strip() for f in feats.split(",") if f.strip())
        if not all(isinstance(f, str) and f for f in feats):
            raise ConfigError(f"model.features must be a list of names, got {feats!r}")
        object.__setattr__(self, "features", tuple(feats))
        if self.num_dense is not None:
            n = _typed("model.num_dense", self.num_dense, int, "an int")
            if n < 0:
                raise ConfigError(f"model.num_dense must be >= 0, got {n}")
        for name in ("bottom_mlp", "top_mlp"):
            v = getattr(self, name)
            if isinstance(v, str):
                v = tuple(int(x) for x in v.split(",") if x.strip())
            if not isinstance(v, (list, tuple)) or not all(
                    isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v):
                raise ConfigError(f"model.{name} must be a list of positive ints, got {v!r}")
            object.__setattr__(self, name, tuple(v))
        if self.interaction not in ("dot", "cat"):
            raise ConfigError(f"model.interaction must be 'dot' or 'cat', got "
                              f"{self.interaction!r}")
        if self.dense_optimizer not in ("adagrad", "adam", "sgd"):
            raise ConfigError(f"model.dense_optimizer must be adagrad, adam or sgd, got "
                              f"{self.dense_optimizer!r}")
        _positive("model.dense_lr", self.dense_lr)


def check_group_id(group_id: Any) -> str:
    """``group_id`` if it is a usable Kafka consumer group name, else :class:`ConfigError`."""
    if not isinstance(group_id, str) or not group_id.strip():
        raise ConfigError(f"kafka.group_id must be a non-empty string, got {group_id!r}")
    if len(group_id) > 249 or any(ord(c) < 32 for c in group_id):
        raise ConfigError(f"kafka.group_id must be at most 249 printable characters, "
                          f"got {group_id!r}")
    return group_id


@dataclass(frozen=True)
class KafkaSection:
    """``[kafka]``: where the examples come from.

    Args:
        bootstrap_servers: ``host:port[,...]``.
        topic: the examples topic (trainer ``r`` of ``w`` reads its ``r``-th share of the
            partitions).
        dead_letter_topic: where undecodable messages go.
        end_of_stream: stop at the partition ends seen at start (replays, tests).
        group_id: consumer group the trainers commit their positions under, for lag tools
            (``kafka-consumer-groups --describe``): a snapshot's positions once it is
            sealed, or every few seconds without snapshots. Never read back (the
            snapshots hold the positions a restore uses). ``None``: no commits.
    """

    bootstrap_servers: str = field(
        default_factory=lambda: os.environ.get("MONOLITH_BOOTSTRAP_SERVERS", "127.0.0.1:9092"))
    topic: str = "examples"
    dead_letter_topic: str | None = None
    end_of_stream: bool = False
    group_id: str | None = None

    def __post_init__(self) -> None:
        _typed("kafka.bootstrap_servers", self.bootstrap_servers, str, "host:port[,...]")
        if not _typed("kafka.topic", self.topic, str, "a topic name"):
            raise ConfigError("kafka.topic must be a non-empty string")
        if self.dead_letter_topic is not None:
            _typed("kafka.dead_letter_topic", self.dead_letter_topic, str, "a topic name")
        _typed("kafka.end_of_stream", self.end_of_stream, bool, "true or false")
        if self.group_id is not None:
            check_group_id(self.group_id)


@dataclass(frozen=True)
class JobConfig:
    """A whole job: its tables and the four sections (see the module docstring)."""

    tables: tuple[TableConfig, ...] = ()
    model: ModelSection = field(default_factory=ModelSection)
    ps: PSSection = field(default_factory=PSSection)
    trainers: TrainersSection = field(default_factory=TrainersSection)
    kafka: KafkaSection = field(default_factory=KafkaSection)

    def __post_init__(self) -> None:
        names = [t.name for t in self.tables]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"tables defined twice: {dup}")
        feats = [f for t in self.tables for f in t.feature_names]
        dupf = sorted({f for f in feats if feats.count(f) > 1})
        if dupf:
            raise ConfigError(f"features served by two tables: {dupf}")

    def require_tables(self) -> tuple[TableConfig, ...]:
        if not self.tables:
            raise ConfigError("the job has no tables: give [[tables]] or model.features in "
                              "the job config, or --features on the command line")
        return self.tables


# -- building -----------------------------------------------------------------------------------

_SECTIONS: dict[str, type] = {"model": ModelSection, "ps": PSSection,
                              "trainers": TrainersSection, "kafka": KafkaSection}
_TOP = ("tables", "table_defaults", *_SECTIONS)
_TABLE_KEYS = tuple(f.name for f in dataclasses.fields(TableConfig)) + ("features",)
_OPT_KEYS = tuple(f.name for f in dataclasses.fields(OptimizerConfig))


def _unknown(where: str, got: Mapping[str, Any], known: tuple[str, ...]) -> None:
    extra = sorted(set(got) - set(known))
    if extra:
        raise ConfigError(f"{where}: unknown key(s) {extra}; known keys are {sorted(known)}")


def _section(name: str, raw: Any) -> Any:
    cls = _SECTIONS[name]
    if not isinstance(raw, Mapping):
        raise ConfigError(f"[{name}] must be a table of keys, got {type(raw).__name__}")
    _unknown(f"[{name}]", raw, tuple(f.name for f in dataclasses.fields(cls)))
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
    return cls(**values)


def _table(where: str, raw: Mapping[str, Any], defaults: Mapping[str, Any]) -> TableConfig:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must be a table of keys, got {type(raw).__name__}")
    _unknown(where, raw, _TABLE_KEYS)
    merged = {**defaults, **raw}
    if "features" in merged:
        if "feature_names" in raw:
            raise ConfigError(f"{where}: give 'features' or 'feature_names', not both")
        merged["feature_names"] = merged.pop("features")
    if isinstance(merged.get("feature_names"), list):
        merged["feature_names"] = tuple(merged["feature_names"])
    opt = merged.get("optimizer")
    if isinstance(opt, str):
        opt = {"kind": opt}
    if isinstance(opt, Mapping):
        _unknown(f"{where}.optimizer", opt, _OPT_KEYS)
        try:
            merged["optimizer"] = OptimizerConfig(**opt)
        except ConfigError as exc:
            raise ConfigError(f"{where}.optimizer: {exc}") from None
    elif opt is not None:
        raise ConfigError(f"{where}.optimizer must be a table like {{kind = \"adagrad\", lr = "
                          f"0.05}}, got {opt!r}")
    if "name" not in merged or "dim" not in merged:
        raise ConfigError(f"{where} needs a 'name' and a 'dim' (dim may come from "
                          "[table_defaults])")
    try:
        return TableConfig(**merged)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def job_from_dict(raw: Mapping[str, Any], overrides: Mapping[str, Any] | None = None
                  ) -> JobConfig:
    """Validate a parsed config (``overrides``: ``{"section.key": value}`` applied first)."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"the job config must be a mapping at the top, got {type(raw).__name__}")
    data: dict[str, Any] = copy.deepcopy(dict(raw))
    for dotted, value in (overrides or {}).items():
        path = dotted.split(".")
        if path[0] not in _TOP or path[0] == "tables" or len(path) < 2 or not all(path):
            raise ConfigError(f"cannot override {dotted!r}: use section.key[.subkey] with a "
                              f"section among {sorted(s for s in _TOP if s != 'tables')}")
        node = data
        for name in path[:-1]:
            child = node.setdefault(name, {})
            if not isinstance(child, dict):
                raise ConfigError(f"cannot override {dotted!r}: {name!r} is not a table")
            node = child
        node[path[-1]] = value
    _unknown("job config", data, _TOP)
    defaults = data.get("table_defaults", {})
    if not isinstance(defaults, Mapping):
        raise ConfigError("[table_defaults] must be a table of keys")
    _unknown("[table_defaults]", defaults, tuple(k for k in _TABLE_KEYS if k != "name"))
    sections = {name: _section(name, data.get(name, {})) for name in _SECTIONS}
    raw_tables = data.get("tables", [])
    if not isinstance(raw_tables, list):
        raise ConfigError("'tables' must be an array of tables ([[tables]] in TOML)")
    tables = [_table(f"tables[{i}]", t, defaults) for i, t in enumerate(raw_tables)]
    have = {f for t in tables for f in t.feature_names}
    for f in sections["model"].features:
        if f not in have:
            tables.append(_table(f"model.features[{f!r}]", {"name": f}, defaults))
    return JobConfig(tables=tuple(tables), **sections)


def read_job_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse a ``.toml`` or ``.yaml``/``.yml`` file (at most 4 MiB) into a dict."""
    p = os.fspath(path)
    try:
        with open(p, "rb") as f:
            data = f.read(_MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read job config {p!r}: {exc}") from None
    if len(data) > _MAX_FILE_BYTES:
        raise ConfigError(f"job config {p!r} is larger than {_MAX_FILE_BYTES} bytes")
    ext = os.path.splitext(p)[1].lower()
    try:
        if ext == ".toml":
            return tomllib.loads(data.decode("utf-8"))
        if ext in (".yaml", ".yml"):
            import yaml

            parsed = yaml.safe_load(data.decode("utf-8"))
            if parsed is None:
                return {}
            if not isinstance(parsed, dict):
                raise ConfigError(f"job config {p!r} must be a mapping at the top")
            return parsed
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"job config {p!r} is not valid TOML: {exc}") from None
    except Exception as exc:  # yaml.YAMLError without importing yaml at module level
        if type(exc).__module__.startswith("yaml"):
            raise ConfigError(f"job config {p!r} is not valid YAML: {exc}") from None
        raise
    raise ConfigError(f"job config {p!r}: use a .toml, .yaml or .yml file")


def parse_override(spec: str) -> tuple[str, Any]:
    """``"section.key=value"`` -> ``("section.key", value)``; the value is read as a TOML
    value when it parses as one (``3``, ``true``, ``[1, 2]``, ``"x"``), else as a string."""
    key, sep, text = spec.partition("=")
    if not sep or "." not in key:
        raise ConfigError(f"--set expects section.key=value, got {spec!r}")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    return key.strip(), value


def load_job(path: str | os.PathLike[str] | None,
             overrides: Mapping[str, Any] | None = None) -> JobConfig:
    """Read the job config at ``path`` (``None``: only defaults) and apply ``overrides``
    (``{"section.key": value}``, e.g. from command-line flags; ``None`` values skipped)."""
    raw = read_job_file(path) if path else {}
    return job_from_dict(raw, {k: v for k, v in (overrides or {}).items() if v is not None})
