"""`monolith bench snapshot` runs end to end and prints the documented fields (a tiny
state, real SMP processes; no timing checks)."""

from __future__ import annotations

import argparse

from benchmarks.bench_snapshot import register, run

FIELDS = ("state_mb", "stall_ms", "overhead_pct", "encode_mb_per_s", "restore_local_s",
          "restore_ec_s", "disk_checkpoint_s", "incremental_bytes_ratio", "torch_save_s",
          "dcp_save_s", "torch_load_s", "smp_cpu_s_per_snapshot")


def test_bench_snapshot_fields() -> None:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["snapshot", "--state-mb", "8", "--interval-s", "1",
                              "--window-s", "2", "--windows", "1", "--warmup-snapshots", "2",
                              "--keep-free-mb", "64", "--no-dense"])
    result = run(args)
    for field in FIELDS:
        assert isinstance(result.get(field), (int, float)), field
    assert 7 < result["state_mb"] < 9
    assert 0 < result["incremental_bytes_ratio"] < 1.1  # rows + 8 B per live key at most
    # both restores rebuilt the newest snapshot: from the local SMP, then from the peers'
    # data blocks with the rows streamed into the tables
    assert any("local SMP copy" in line for line in result["restore_local_log"])
    assert any("data blocks read from hosts 1, 2" in line for line in result["restore_ec_log"])
    # each window with snapshots trained on until the SMPs finished its work
    assert len(result["snapshot_window_tail_s"]) == 1 and result["snapshot_window_tail_s"][0] >= 0
    # ... and was charged window/interval snapshots (a job's rate), the last at its end
    assert result["snapshots_per_window"] == [2]
    # restores are measured at the longest chain between compactions (--full-every 8)
    assert result["restore_chain_parts"] == 8
