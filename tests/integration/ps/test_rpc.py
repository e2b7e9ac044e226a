"""PS shards over real gRPC on loopback: same tables as in-process training, hostile
payloads rejected while the shard keeps serving, retriable errors (never a hang) when a
shard is down, idempotent push retries, messages split under the size limit."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from monolith_py.errors import (
    ConfigError,
    DeadlineExceededError,
    InvalidInputError,
    RetriableError,
    ShardError,
    UnavailableError,
)
from monolith_py.jobconfig import load_job
from monolith_py.observe.metrics import REGISTRY
from monolith_py.ps import ClientOptions, PSClient, PSServer, PSShard, shard_of
from monolith_py.ps import _protocol as proto
from monolith_py.ps.server import channel_options
from monolith_py.table import TableConfig
from monolith_py.training import OnlineTrainer, TrainerConfig
from monolith_py.wire import encode_arrays
from streaming.columns import to_batch
from streaming.generate import SyntheticConfig, SyntheticCTR
from streaming.trainer import build_model

from .conftest import free_port

pytestmark = pytest.mark.integration

JOB = """
[table_defaults]
dim = 8
optimizer = { kind = "adagrad", lr = 0.1 }
init_scale = 0.05
ttl_seconds = 60

[model]
features = ["f0", "f1"]
bottom_mlp = [16]
top_mlp = [16]

[[tables]]
name = "f2"
features = ["f2"]
admit_threshold = 2
optimizer = { kind = "adam", lr = 0.01 }
"""


def _train(job, backend, batches):  # type: ignore[no-untyped-def]
    model, opt = build_model(job, 3, backend)
    trainer = OnlineTrainer(model, opt, TrainerConfig(evict_interval_s=30))
    return trainer.fit(batches), model


def test_two_shards_over_rpc_give_the_in_process_tables(start_shards, tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_text(JOB)
    job = load_job(path)
    gen = SyntheticCTR(SyntheticConfig(cardinalities=(3000, 400, 60), num_dense=3,
                                       events_per_s=10, seed=5))
    batches = [to_batch(gen.batch(i, 256)[0]) for i in range(30)]

    local, local_model = _train(job, None, batches)
    shards = start_shards(2, ["--config", str(path)])
    with PSClient(shards.addresses, job.tables) as client:
        remote, remote_model = _train(job, client, batches)
        assert remote["auc"] == local["auc"] and remote["loss"] == local["loss"]
        assert remote["expired"] == local["expired"] > 0  # TTL eviction ran on both
        tables = local_model.embedding.backend.tables
        stats = client.stats()
        for name, table in tables.items():
            sd = table.state_dict()
            assert stats[name]["size"] == len(table) > 0
            assert stats[name]["evicted"] == sd["stat.evicted"]
            assert stats[name]["admitted"] == sd["stat.admitted"]
            rows = client.lookup({name: torch.from_numpy(sd["keys"])}, train=False)[name]
            np.testing.assert_allclose(rows.numpy(), sd["weights"], rtol=0, atol=1e-6)
        for a, b in zip(local_model.parameters(), remote_model.parameters()):
            assert torch.equal(a, b)
        # each key lives on its own shard only
        per_shard = stats["f0"]["shards"]
        assert len(per_shard) == 2 and sum(s["size"] for s in per_shard) == stats["f0"]["size"]


# -- hostile payloads ---------------------------------------------------------------------------

CFG = [TableConfig("t", dim=8)]


@pytest.fixture
def server():  # type: ignore[no-untyped-def]
    srv = PSServer(PSShard(0, 2, CFG), max_message_bytes=1 << 20).start()
    try:
        yield srv
    finally:
        srv.stop(grace=None)


def _call(srv: PSServer, method: str, body: bytes) -> bytes:
    with grpc.insecure_channel(srv.address, options=channel_options(8 << 20)) as ch:
        return ch.unary_unary(proto.path(method))(body, timeout=30)


def _rejected(srv: PSServer, method: str, body: bytes) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        _call(srv, method, body)
    return info.value.code(), info.value.details()


def test_bad_payloads_are_rejected_and_the_shard_keeps_serving(server: PSServer) -> None:
    keys = np.arange(200, dtype=np.int64)
    mine, foreign = keys[shard_of(keys, 2) == 0], keys[shard_of(keys, 2) == 1]
    ok_grads = np.ones((len(mine), 8), np.float32)
    def push(parts: list) -> bytes:
        return proto.encode_push(parts, 1, "c", 1, True)

    bad = [  # (what the answer must say, method, body)
        ("shorter than", proto.PULL, b"\x00garbage"),
        ("bad array frame", proto.PULL, proto.encode_pull([("t", mine)], True, True)[:40]),
        ("unknown table", proto.PULL, proto.encode_pull([("nope", mine)], True, True)),
        ("int64", proto.PULL, encode_arrays({"keys.0": mine.astype(np.float64)},
                                            {"tables": ["t"], "train": True})),
        ("belongs to shard 1", proto.PULL, proto.encode_pull([("t", foreign)], True, True)),
        ("NaN", proto.PUSH, push([("t", mine, np.full_like(ok_grads, np.nan))])),
        ("shape", proto.PUSH, push([("t", mine, ok_grads[:, :4].copy())])),
        ("float32", proto.PUSH, push([("t", mine, ok_grads.astype(np.float64))])),
        ("now", proto.EVICT, proto.encode_meta({"now": "later"})),
        ("checksum", proto.STATS, encode_arrays({}, {}, checksum=False)),
    ]
    for expect, method, body in bad:
        code, details = _rejected(server, method, body)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (expect, code, details)
        assert expect in details and "PS shard 0" in details, (expect, details)
    corrupt = bytearray(proto.encode_pull([("t", mine)], True, True))
    corrupt[-1] ^= 1
    assert _rejected(server, proto.PULL, bytes(corrupt))[0] == grpc.StatusCode.INVALID_ARGUMENT
    # oversized: a 2 MB request (gRPC refuses it) and a request whose answer would be too big
    code, _ = _rejected(server, proto.PULL, b"\x00" * (2 << 20))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    many = np.arange(100_000, dtype=np.int64)  # ~50k keys x 32 B of rows > 1 MiB
    many = many[shard_of(many, 2) == 0]
    code, details = _rejected(server, proto.PULL, proto.encode_pull([("t", many)], True, True))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "split" in details
    # nothing above changed the shard; it still serves, and good requests work
    assert server.shard.stats()["t"]["size"] == 0
    health = proto.decode(_call(server, proto.HEALTH, proto.encode_meta({})),
                          proto.limits_for(1 << 20))
    assert health[1]["status"] == "SERVING"
    rows = proto.decode(_call(server, proto.PULL, proto.encode_pull([("t", mine)], True, True)),
                        proto.limits_for(1 << 20))[0]["rows.0"]
    assert rows.shape == (len(mine), 8)
    rejected = REGISTRY.get_sample_value(
        "monolith_ps_server_rejected_total", {"shard": "0", "method": "Pull",
                                              "code": "INVALID_ARGUMENT"})
    assert rejected is not None and rejected >= 5


def test_retried_push_is_applied_once(server: PSServer) -> None:
    keys = np.arange(100, dtype=np.int64)
    mine = keys[shard_of(keys, 2) == 0]
    body = proto.encode_push([("t", mine, np.ones((len(mine), 8), np.float32))], 7, "client-a",
                             42, True)
    first = proto.decode(_call(server, proto.PUSH, body), proto.limits_for(1 << 20))[1]
    before = server.shard.pull("t", mine, train=False)
    again = proto.decode(_call(server, proto.PUSH, body), proto.limits_for(1 << 20))[1]
    assert first == {"applied": len(mine), "duplicate": False}
    assert again == {"applied": len(mine), "duplicate": True}
    np.testing.assert_array_equal(server.shard.pull("t", mine, train=False), before)


def test_client_splits_messages_under_its_limit(server: PSServer) -> None:
    keys = torch.arange(50_000, dtype=torch.int64)
    mine = keys[torch.from_numpy(shard_of(keys, 2) == 0)]
    other = PSServer(PSShard(1, 2, CFG), max_message_bytes=1 << 20).start()
    try:
        opts = ClientOptions(max_message_bytes=256 << 10, deadline_s=60)
        with PSClient([server.address, other.address], CFG, opts) as client:
            count = lambda: REGISTRY.get_sample_value(  # noqa: E731
                "monolith_ps_server_rpc_seconds_count", {"shard": "0", "method": "Pull"}) or 0
            n0 = count()
            rows = client.lookup({"t": keys}, train=True)["t"]
            assert count() - n0 >= 4  # ~25k keys x 33 B of rows, at most 192 KiB per message
            client.apply_gradients({"t": (keys, torch.ones(len(keys), 8))}, now=3)
            after = client.lookup({"t": keys}, train=False)["t"]
            assert after.shape == (50_000, 8) and not torch.equal(after, rows)
            np.testing.assert_array_equal(
                after[: len(keys)][torch.from_numpy(shard_of(keys, 2) == 0)].numpy(),
                server.shard.pull("t", mine.numpy(), train=False))
            assert client.stats()["t"]["size"] == 50_000
    finally:
        other.stop(grace=None)


def test_client_refuses_mismatched_shards(server: PSServer) -> None:
    with pytest.raises(ConfigError, match="expected shard 0 of 1"):
        PSClient([server.address], CFG, ClientOptions(connect_timeout_s=30))
    other = PSServer(PSShard(1, 2, [TableConfig("t", dim=4)])).start()
    try:
        with pytest.raises(ConfigError, match="holds tables"):
            PSClient([server.address, other.address], CFG)
    finally:
        other.stop(grace=None)


# -- shards that are down -------------------------------------------------------------------------

def test_shard_down_gives_a_retriable_error_after_the_deadline() -> None:
    port = free_port()
    srv = PSServer(PSShard(0, 1, CFG), port=port).start()
    client = PSClient([srv.address], CFG, ClientOptions(deadline_s=2.0, backoff_initial_s=0.05,
                                                        backoff_max_s=0.4))
    client.lookup({"t": torch.arange(10)}, train=True)
    srv.stop(grace=None)
    retries = lambda: REGISTRY.get_sample_value(  # noqa: E731
        "monolith_ps_client_retries_total", {"shard": "0"}) or 0
    r0 = retries()
    t0 = time.monotonic()
    with pytest.raises(UnavailableError) as info:
        client.lookup({"t": torch.arange(10)}, train=True)
    elapsed = time.monotonic() - t0
    msg = str(info.value)
    assert info.value.retriable and 1.0 <= elapsed <= 6.0, elapsed
    assert f"PS shard 0 at 127.0.0.1:{port}" in msg and "attempt" in msg and "deadline" in msg
    assert retries() - r0 >= 2  # backed off and retried before giving up
    assert client.last_error is info.value
    # the shard comes back on the same port: the same client works again
    srv = PSServer(PSShard(0, 1, CFG), port=port).start()
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                assert client.lookup({"t": torch.arange(10)}, train=False)["t"].shape == (10, 8)
                break
            except RetriableError:
                assert time.monotonic() < deadline
        client.close()
    finally:
        srv.stop(grace=None)


def test_never_started_shard_times_out_at_connect() -> None:
    t0 = time.monotonic()
    with pytest.raises(UnavailableError, match=r"did not become ready within 1\.5 s"):
        PSClient([f"127.0.0.1:{free_port()}"], CFG, ClientOptions(connect_timeout_s=1.5))
    assert time.monotonic() - t0 < 10


def test_several_shards_down_are_named_in_one_error() -> None:
    servers = [PSServer(PSShard(i, 3, CFG)).start() for i in range(3)]
    client = PSClient([s.address for s in servers], CFG, ClientOptions(deadline_s=1.5))
    client.lookup({"t": torch.arange(100)}, train=True)
    servers[0].stop(grace=None)
    servers[2].stop(grace=None)
    try:
        with pytest.raises(ShardError) as info:
            client.lookup({"t": torch.arange(100)}, train=True)
        assert info.value.retriable and set(info.value.errors) == {
            f"0 ({servers[0].address})", f"2 ({servers[2].address})"}
        assert all(isinstance(e, UnavailableError) for e in info.value.errors.values())
        # an async push to a dead shard surfaces at the next call (here: flush)
        client.apply_gradients({"t": (torch.arange(100), torch.ones(100, 8))}, now=1)
        with pytest.raises(ShardError):
            client.flush()
    finally:
        servers[1].stop(grace=None)


def test_killed_shard_process_mid_training(start_shards, tmp_path: Path) -> None:
    shards = start_shards(2, ["--features", "a,b", "--dim", "4"])
    tables = [TableConfig("a", dim=4, feature_names=("a",)),
              TableConfig("b", dim=4, feature_names=("b",))]
    client = PSClient(shards.addresses, tables, ClientOptions(deadline_s=2.0))
    keys = {"a": torch.arange(1000), "b": torch.arange(50)}
    client.lookup(keys, train=True)
    shards.kill(1, signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(UnavailableError, match=rf"PS shard 1 at {shards.addresses[1]}"):
        client.lookup(keys, train=True)
    assert time.monotonic() - t0 < 10
    shards.kill(0, signal.SIGSTOP)  # hung, not dead: the deadline still ends the call
    try:
        t0 = time.monotonic()
        with pytest.raises((DeadlineExceededError, ShardError)) as info:
            client.lookup(keys, train=True)
        assert info.value.retriable and time.monotonic() - t0 < 10
    finally:
        shards.kill(0, signal.SIGCONT)
    with pytest.raises(InvalidInputError, match="unknown table"):
        client.lookup({"zzz": torch.arange(3)}, train=True)  # checked locally, nothing sent
