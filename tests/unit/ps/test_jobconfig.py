"""The job config: the example file loads, unknown keys are rejected at every level with
the known ones listed, command-line overrides win, bad values say what to fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from monolith_py.errors import ConfigError
from monolith_py.jobconfig import job_from_dict, load_job, parse_override, read_job_file

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = ROOT / "examples" / "job.toml"


def test_example_job_loads() -> None:
    job = load_job(EXAMPLE)
    names = [t.name for t in job.tables]
    assert sorted(names) == ["f0", "f1", "f2", "f3", "f4"]
    f4 = next(t for t in job.tables if t.name == "f4")
    assert f4.admit_threshold == 2 and f4.optimizer.kind == "rowwise_adagrad" and f4.dim == 16
    f0 = next(t for t in job.tables if t.name == "f0")
    assert f0.optimizer.lr == 0.05 and f0.ttl_seconds == 157680000
    assert len(job.ps.addresses) == 2 and job.trainers.world_size == 2
    assert job.kafka.topic == "synthetic" and job.model.num_dense == 4


def test_overrides_win(tmp_path: Path) -> None:
    job = load_job(EXAMPLE, {"ps.addresses": "h:1,h:2,h:3", "kafka.topic": "other",
                             "table_defaults.dim": 8, "table_defaults.optimizer.lr": 0.5,
                             "trainers.world_size": None})
    assert job.ps.addresses == ("h:1", "h:2", "h:3") and job.kafka.topic == "other"
    assert all(t.dim == 8 for t in job.tables)
    f0 = next(t for t in job.tables if t.name == "f0")
    assert f0.optimizer.lr == 0.5 and f0.optimizer.kind == "adagrad"
    assert job.trainers.world_size == 2  # None: not overridden
    assert parse_override("ps.deadline_s=2.5") == ("ps.deadline_s", 2.5)
    assert parse_override("kafka.topic=abc") == ("kafka.topic", "abc")
    assert parse_override("model.top_mlp=[8, 4]") == ("model.top_mlp", [8, 4])
    with pytest.raises(ConfigError):
        parse_override("nodot=1")
    with pytest.raises(ConfigError, match="cannot override"):
        job_from_dict({}, {"tables.x": 1})


@pytest.mark.parametrize("raw, match", [
    ({"psx": {}}, r"unknown key\(s\) \['psx'\]"),
    ({"ps": {"adresses": []}}, r"\[ps\]: unknown key\(s\) \['adresses'\]; known keys are"),
    ({"trainers": {"world": 2}}, r"\[trainers\]: unknown"),
    ({"table_defaults": {"dimm": 4}}, r"\[table_defaults\]: unknown"),
    ({"tables": [{"name": "a", "dim": 4, "colour": 1}]},
     r"tables\[0\]: unknown key\(s\) \['colour'\]"),
    ({"tables": [{"name": "a", "dim": 4, "optimizer": {"kind": "sgd", "rate": 1}}]},
     r"tables\[0\].optimizer: unknown"),
    ({"tables": [{"name": "a", "dim": 4, "optimizer": {"kind": "rmsprop"}}]},
     "kind must be one of"),
    ({"tables": [{"name": "a"}]}, "needs a 'name' and a 'dim'"),
    ({"tables": [{"name": "a", "dim": 0}]}, r"tables\[0\]: .*dim must be"),
    ({"tables": [{"name": "a", "dim": 4}, {"name": "a", "dim": 4}]}, "defined twice"),
    ({"tables": {"name": "a"}}, "array of tables"),
    ({"ps": {"addresses": ["nohost"]}}, "not host:port"),
    ({"ps": {"deadline_s": -1}}, "positive"),
    ({"trainers": {"world_size": 0}}, ">= 1"),
    ({"trainers": {"dist_init": "http://x"}}, "tcp://"),
    ({"model": {"interaction": "sum"}}, "'dot' or 'cat'"),
    ({"model": {"top_mlp": [0]}}, "positive ints"),
    ({"kafka": {"end_of_stream": "yes"}}, "true or false"),
    ({"ps": []}, r"\[ps\] must be a table"),
])
def test_bad_configs_are_rejected_clearly(raw: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        job_from_dict(raw)


def test_yaml_and_file_errors(tmp_path: Path) -> None:
    y = tmp_path / "job.yaml"
    y.write_text("model:\n  features: [a, b]\ntable_defaults:\n  dim: 4\nps:\n"
                 "  addresses: ['127.0.0.1:1']\n")
    job = load_job(y)
    assert [t.name for t in job.tables] == ["a", "b"] and job.ps.addresses == ("127.0.0.1:1",)
    (tmp_path / "bad.toml").write_text("[ps\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        read_job_file(tmp_path / "bad.toml")
    (tmp_path / "bad.yaml").write_text("a: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_job_file(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="mapping"):
        read_job_file(tmp_path / "list.yaml")
    (tmp_path / "job.ini").write_text("")
    with pytest.raises(ConfigError, match=".toml"):
        read_job_file(tmp_path / "job.ini")
    with pytest.raises(ConfigError, match="cannot read"):
        read_job_file(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="no tables"):
        load_job(None).require_tables()
