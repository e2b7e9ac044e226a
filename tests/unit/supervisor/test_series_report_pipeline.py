"""Scrape parsing and derived series, exactly-once accounting, the pipeline's command lines."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest

from monolith_py.cli import build_parser
from monolith_py.errors import ConfigError, DecodeError
from monolith_py.observe.timeseries import (
    SeriesStore,
    interval_mean,
    parse_metrics,
    rate,
    select,
    select_by,
)
from monolith_py.snapshot.ledger import ExactlyOnceLedger
from monolith_py.supervisor.collect import derive
from monolith_py.supervisor.pipeline import PipelineConfig, build_pipeline
from monolith_py.supervisor.report import ProgressDisplay, account, format_summary

TEXT = """# HELP monolith_table_rows Embedding table statistic.
# TYPE monolith_table_rows gauge
monolith_table_rows{role="ps/0",table="user"} 10.0
monolith_table_rows{role="ps/0",table="item"} 5.0
# TYPE monolith_ps_server_rpc_seconds histogram
monolith_ps_server_rpc_seconds_bucket{method="pull",le="+Inf"} 4.0
monolith_ps_server_rpc_seconds_count{method="pull"} 4.0
monolith_ps_server_rpc_seconds_sum{method="pull"} 0.02
"""


def test_parse_and_select() -> None:
    s = parse_metrics(TEXT)
    assert select(s, "monolith_table_rows") == 15.0
    assert select(s, "monolith_table_rows", table="user") == 10.0
    assert select(s, "monolith_table_rows", table="nope") is None
    assert select_by(s, "monolith_table_rows", "table") == {"user": 10.0, "item": 5.0}
    assert select(s, "monolith_ps_server_rpc_seconds_count") == 4.0
    with pytest.raises(DecodeError):
        parse_metrics("metric{unclosed 1\n")


def test_series_store_and_rates() -> None:
    st = SeriesStore(maxlen=4)
    for t in range(6):
        st.add("x", float(t), t * 10.0)
    st.add("x", 9.0, float("nan"))                            # skipped
    st.add("y", 1.0, None)
    assert st.points("x") == [(2.0, 20.0), (3.0, 30.0), (4.0, 40.0), (5.0, 50.0)]
    assert st.names() == ["x"] and st.last("x") == 50.0 and st.last("y") is None
    assert st.to_json(since=3.5) == {"x": [[4.0, 40.0], [5.0, 50.0]]}
    assert rate(st.points("x")) == 10.0
    assert rate([(0.0, 100.0), (1.0, 110.0), (2.0, 5.0), (3.0, 15.0)]) == pytest.approx(25 / 3)
    assert rate([(0.0, 1.0)]) is None
    assert rate([(0.0, 0.0), (10.0, 100.0), (11.0, 200.0)], window_s=1.0) == 100.0
    assert interval_mean({"s": 1.0, "c": 2.0}, {"s": 2.0, "c": 4.0}, "s", "c") == 0.5
    assert interval_mean(None, {"s": 1.0, "c": 1.0}, "s", "c") is None
    assert interval_mean({"s": 1.0, "c": 4.0}, {"s": 1.0, "c": 4.0}, "s", "c") is None
    with pytest.raises(ConfigError):
        SeriesStore(maxlen=1)


def test_derive_per_kind() -> None:
    prev = parse_metrics(TEXT)
    cur = parse_metrics(TEXT.replace("} 4.0", "} 14.0").replace("0.02", "0.12"))
    out = derive("ps", "ps/0", cur, (0.0, prev), now=1.0)
    assert out["rows:ps/0"] == 15.0
    assert out["rpc_ms:ps/0"] == pytest.approx(10.0)          # 0.1 s over 10 calls
    # a restarted process (counters back to zero) gives no interval value
    assert "rpc_ms:ps/0" not in derive("ps", "ps/0", prev, (0.0, cur), now=1.0)
    serve = parse_metrics('monolith_serving_last_sync_timestamp_seconds{shard="0"} 100.0\n'
                          'monolith_serving_last_sync_timestamp_seconds{shard="1"} 97.0\n')
    assert derive("serve", "serve/0", serve, None, now=100.5)["freshness_s:serve/0"] == 3.5
    tr0 = parse_metrics('monolith_step_examples_total{role="trainer/0"} 100\n')
    tr1 = parse_metrics('monolith_step_examples_total{role="trainer/0"} 600\n'
                        'monolith_stream_lag_messages{topic="t",partition="0"} 3\n'
                        'monolith_stream_lag_messages{topic="t",partition="1"} 4\n')
    out = derive("trainer", "trainer/0", tr1, (10.0, tr0), now=12.0)
    assert out["ex_rate:trainer/0"] == 250.0 and out["lag:trainer/0"] == 7.0


def test_account_counts_every_kind_of_loss() -> None:
    ids = np.arange(100, dtype=np.int64)
    good = account(ids, ids, [ExactlyOnceLedger.of(ids).state_dict()])
    assert (good["lost"], good["duplicated"], good["ledger_match"]) == (0, 0, True)
    assert good["examples_trained"] == 100
    # the joiner dropped 3 impressions and wrote one example twice
    ex = np.concatenate([ids[3:], ids[10:11]])
    acc = account(ids, ex, [ExactlyOnceLedger.of(ids[3:]).state_dict()])
    assert (acc["join_lost"], acc["topic_duplicates"], acc["lost"], acc["duplicated"]) == \
        (3, 1, 3, 1)
    # a trainer trained 5 examples twice
    twice = np.concatenate([ids, ids[:5]])
    acc = account(ids, ids, [ExactlyOnceLedger.of(twice).state_dict()])
    assert (acc["lost"], acc["duplicated"], acc["ledger_match"]) == (0, 5, False)
    # one lost and one doubled: counts agree, the ledger does not
    swap = np.concatenate([ids[1:], ids[2:3]])
    acc = account(ids, ids, [ExactlyOnceLedger.of(swap).state_dict()])
    assert acc["lost"] >= 1 and acc["duplicated"] >= 1 and not acc["ledger_match"]
    # two trainers' ledgers add up
    halves = [ExactlyOnceLedger.of(ids[::2]).state_dict(),
              ExactlyOnceLedger.of(ids[1::2]).state_dict()]
    assert account(ids, ids, halves)["ledger_match"]


def test_progress_display_and_summary_text() -> None:
    out = io.StringIO()
    d = ProgressDisplay(100, stream=out, tty=False, every_s=0.0)
    d.update({"trained": 5, "auc": 0.7, "phase": "running", "elapsed": 3.0})
    d.write("an event")
    d.close()
    text = out.getvalue()
    assert "trained=5" in text and "auc=0.7000" in text and "an event" in text
    summary = format_summary({"ok": True, "source": "movielens", "examples_trained": 9,
                              "lost": 0, "duplicated": 0, "run_dir": "/r"})
    assert "OK" in summary and "lost / duplicated 0 / 0" in summary


@pytest.mark.parametrize("cfg", [PipelineConfig(), PipelineConfig(
    source="generator", trainers=2, ps_shards=3, hosts=4, k=2, m=4, examples=1000)])
def test_pipeline_command_lines_parse(cfg: PipelineConfig, tmp_path: object) -> None:
    p = build_pipeline(cfg, str(tmp_path), shm_root=str(tmp_path),
                       port=itertools.count(20000).__next__)  # no sockets in unit tests
    names = [r.name for r in p.roles]
    assert len(set(names)) == len(names)
    assert sum(r.kind == "trainer" for r in p.roles) == cfg.trainers
    assert sum(r.kind == "smp" for r in p.roles) == cfg.hosts
    ports = [a.split(":")[1] for a in (*p.smp_group, *p.ps_addresses)]
    ports += [r.metrics_url.rsplit(":", 1)[1] for r in p.roles if r.metrics_url]
    assert len(set(ports)) == len(ports)                      # every port distinct
    parser = build_parser()
    for r in [*p.roles, p.final_joiner()]:
        assert r.argv[1:3] == ("-m", "monolith_py.cli")
        args = parser.parse_args(list(r.argv[3:]))           # the roles' real parsers
        assert callable(args.func), r.name
        if r.kind in ("ps", "trainer", "smp", "joiner"):
            assert r.heartbeat and r.metrics_url and r.host is not None
    assert p.final_joiner().finite and "--drain" in p.final_joiner().argv


def test_pipeline_config_validation() -> None:
    for bad in (dict(source="csv"), dict(hosts=2, k=2, m=3), dict(trainers=0),
                dict(job="bad job"), dict(examples=0)):
        with pytest.raises(ConfigError):
            PipelineConfig(**bad)  # type: ignore[arg-type]


def test_pipeline_ports_are_distinct_even_when_the_picker_repeats(tmp_path: object) -> None:
    repeating = itertools.chain.from_iterable((p, p, p) for p in itertools.count(30000))
    p = build_pipeline(PipelineConfig(trainers=2), str(tmp_path), shm_root=str(tmp_path),
                       port=repeating.__next__)
    ports = [a.split(":")[1] for a in (*p.smp_group, *p.ps_addresses)]
    ports += [r.metrics_url.rsplit(":", 1)[1].split("/")[0] for r in p.roles if r.metrics_url]
    assert len(set(ports)) == len(ports)
