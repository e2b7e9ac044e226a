"""The SMP's data port: bulk reads of parts and blocks over plain TCP (``snapshot.bulk``)."""

from __future__ import annotations

import os
import socket
import time
from typing import Any

import numpy as np
import pytest

import crc32c

from monolith_py.errors import (
    CorruptDataError,
    DeadlineExceededError,
    InvalidInputError,
    UnavailableError,
)
from monolith_py.observe.metrics import REGISTRY
from monolith_py.ps import PSShard
from monolith_py.snapshot.blocks import block_frame
from monolith_py.snapshot.bulk import MAX_REQUEST, BulkServer, BulkWriter, bulk_read
from monolith_py.snapshot.pspart import ShardCapturer
from monolith_py.snapshot.shm import attach
from monolith_py.snapshot.smp import SMPClient, SMPServer, _frame
from monolith_py.snapshot.store import SMPConfig, SnapshotStore
from monolith_py.table import TableConfig
from monolith_py.wire import encode_arrays


def _part(rows: int = 20_000, capture: str | None = None) -> bytes:
    shard = PSShard(0, 1, [TableConfig("t", dim=8)])
    shard.pull("t", np.arange(rows), train=True)
    meta = {"participant": "ps/0", **({"capture": capture} if capture else {})}
    return bytes(ShardCapturer(shard).capture(1, 1, None, extra_meta=meta).frame())


@pytest.fixture()
def smp(tmp_path: Any) -> Any:
    cfg = SMPConfig(job="bulk", host_id=0, num_hosts=1, k=1, m=1, shm_dir=str(tmp_path / "shm"))
    server = SMPServer(cfg).start(repair=False)
    try:
        yield server
    finally:
        server.stop()


def _collect(size: int) -> tuple[bytearray, Any]:
    out = bytearray(size)

    def sink(off: int, chunk: memoryview) -> None:
        out[off: off + chunk.nbytes] = chunk

    return out, sink


def _read(client: SMPClient, key: Any) -> bytes | None:
    """The whole part ``key`` as ``client`` streams it (``None``: not held)."""
    got: dict[int, bytes] = {}
    size = client.stream_part(key, lambda off, chunk: got.__setitem__(off, bytes(chunk)))
    return None if size is None else b"".join(got[o] for o in sorted(got))


def _rejected(what: str = "bulk") -> float:
    return REGISTRY.get_sample_value("monolith_smp_rejected_total",
                                     {"host": "0", "what": what}) or 0.0


def _raw(port: int, payload: bytes) -> bytes:
    """Send ``payload`` to the data port and return everything it answers until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            b = s.recv(65536)
            if not b:
                return b"".join(chunks)
            chunks.append(b)


def test_parts_and_blocks_are_read_through_the_data_port(smp: SMPServer) -> None:
    data = _part()
    client = SMPClient(smp.address)
    try:
        key = client.put_part("ps/0", data)
        assert _read(client, key) == data
        assert client._bulk == ("127.0.0.1", smp.bulk.port)  # the data port carried it
        out, sink = _collect(len(data))
        assert client.stream_block((*key, 0), sink) == len(data)  # k=1: block 0 is the part
        assert bytes(out) == data
        assert _read(client, ("ps/0", 99, "full")) is None
        assert client.stream_block((*key, 3), sink) is None
        part = memoryview(bytearray(1000))
        assert client.read_block_into((*key, 0), 123, part) and bytes(part) == data[123:1123]
        # the gRPC calls give the same bytes (SMPs without a data port)
        client._bulk = False
        assert _read(client, key) == data
        part = memoryview(bytearray(1000))
        assert client.read_block_into((*key, 0), 123, part) and bytes(part) == data[123:1123]
        assert not client.read_block_into((*key, 3), 0, part)
    finally:
        client.close()


def test_catalog_and_wait_part_over_grpc_tell_two_runs_parts_apart(smp: SMPServer) -> None:
    """``Catalog`` reports the newest id held (sealed or not); ``WaitPart`` with a capture
    token answers only with that capture's part, even when another run's part has the
    same key."""
    client = SMPClient(smp.address)
    try:
        assert client.catalog()["newest_id"] == -1
        client.put_part("ps/0", _part(capture="run-a"))
        old = client.wait_part("ps/0", 1, "full", 30.0, capture="run-a")
        assert client.catalog()["newest_id"] == 1
        with pytest.raises(DeadlineExceededError):
            client.wait_part("ps/0", 1, "full", 0.3, capture="run-b")
        with pytest.raises(InvalidInputError):
            client._call("WaitPart", _frame({"participant": "ps/0", "snapshot_id": 1,
                                             "kind": "full", "capture": 7}))
        data = _part(rows=30_000, capture="run-b")
        client.put_part("ps/0", data)
        rec = client.wait_part("ps/0", 1, "full", 30.0, capture="run-b")
        assert rec.size == len(data) != old.size and _read(client, ("ps/0", 1, "full")) == data
    finally:
        client.close()


def test_client_asks_again_when_the_data_port_moved(smp: SMPServer) -> None:
    data = _part()
    client = SMPClient(smp.address)
    try:
        key = client.put_part("ps/0", data)
        assert _read(client, key) == data
        old = smp.bulk
        smp.bulk = BulkServer(smp._open_bulk, "127.0.0.1").start()
        old.stop()
        assert _read(client, key) == data
        assert client._bulk == ("127.0.0.1", smp.bulk.port) != ("127.0.0.1", old.port)
    finally:
        client.close()


def test_hostile_requests_are_answered_counted_and_the_port_keeps_serving(smp: SMPServer
                                                                        ) -> None:
    port = smp.bulk.port
    data = _part()
    client = SMPClient(smp.address)
    key = client.put_part("ps/0", data)
    before = _rejected()
    frame = encode_arrays({}, {"op": "part", "participant": "ps/0", "snapshot_id": 1,
                               "kind": "full"})
    bad = [
        (MAX_REQUEST + 1).to_bytes(4, "big"),                           # too long
        (0).to_bytes(4, "big"),                                         # empty
        (16).to_bytes(4, "big") + b"not a wire frame",                  # garbage
        len(frame).to_bytes(4, "big") + frame[:-1] + bytes([frame[-1] ^ 1]),  # flipped
    ]
    for op_meta in ({"op": "delete", "participant": "ps/0", "snapshot_id": 1, "kind": "full"},
                    {"op": "part", "participant": "../x", "snapshot_id": 1, "kind": "full"},
                    {"op": "block", "participant": "ps/0", "snapshot_id": -1, "kind": "full",
                     "index": 0},
                    {"op": "block", "participant": "ps/0", "snapshot_id": 1, "kind": "full",
                     "index": "0"}):
        f = encode_arrays({}, op_meta)
        bad.append(len(f).to_bytes(4, "big") + f)
    for payload in bad:
        answer = _raw(port, payload)
        assert b"error" in answer, payload[:40]
    assert _rejected() == before + len(bad)
    with pytest.raises(InvalidInputError, match="unknown data port op"):
        bulk_read(("127.0.0.1", port), {"op": "nope"}, lambda o, c: None)
    # a truncated request (the peer goes away mid-message) is dropped quietly
    assert _raw(port, (100).to_bytes(4, "big") + b"abc") == b""
    assert _read(client, key) == data
    client.close()


def test_stalled_peers_time_out_and_connections_are_bounded() -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB

    class Reader:
        def __enter__(self) -> memoryview:
            return memoryview(payload)

        def __exit__(self, *exc: object) -> None:
            pass

    server = BulkServer(lambda meta: Reader(), "127.0.0.1", io_timeout_s=0.5,
                        max_connections=1).start()
    try:
        idle = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        deadline = time.monotonic() + 30
        # the limit: a second connection is closed while the first one is held
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as second:
            assert second.recv(1) == b""
        # the idle one is dropped after the io timeout, which frees its slot
        assert idle.recv(1) == b""
        assert time.monotonic() < deadline
        idle.close()
        got = bytearray()
        while True:  # the slot is released just after the close: retry until served
            try:
                n = bulk_read(("127.0.0.1", server.port), {"op": "any"},
                              lambda off, c: got.extend(c))
                break
            except UnavailableError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert n == len(payload) and bytes(got) == payload
    finally:
        server.stop()
    with pytest.raises(UnavailableError):
        bulk_read(("127.0.0.1", server.port), {"op": "any"}, lambda o, c: None, timeout_s=5)


def test_restore_from_peers_streams_rows_into_the_tables(tmp_path: Any) -> None:
    """Three SMP servers with data ports; host 0 (the PS's home) is gone: the chain's
    data blocks are read from hosts 1 and 2 and their rows written straight into a new
    shard's tables (rows of 20 bytes, so many straddle the 1 MiB socket reads)."""
    from monolith_py.snapshot.coordinator import SnapshotCoordinator
    from monolith_py.snapshot.participant import PSParticipant
    from monolith_py.snapshot.recovery import Recovery
    from monolith_py.snapshot.smp import smp_clients
    from monolith_py.table import OptimizerConfig
    from monolith_py.testing.hosts import free_port
    from monolith_py.testing.state import assert_states_equal

    ports = [free_port() for _ in range(3)]
    addrs = [f"127.0.0.1:{p}" for p in ports]
    servers = [SMPServer(SMPConfig(job="bulk", host_id=h, num_hosts=3, k=2, m=3, keep=2,
                                   full_every=0, shm_dir=str(tmp_path / f"h{h}")),
                         port=ports[h], peers=addrs).start(repair=False) for h in range(3)]
    tables = [TableConfig("a", dim=5, optimizer=OptimizerConfig("adagrad", lr=0.1)),
              TableConfig("b", dim=3, optimizer=OptimizerConfig("rowwise_adagrad", lr=0.1))]
    smps = smp_clients(addrs, timeout_s=60.0)
    shard = PSShard(0, 1, tables)
    part = PSParticipant(shard, smps[0], 0, group=smps, job="bulk")
    coord = SnapshotCoordinator("bulk", smps, [part], timeout_s=60.0, hosts=addrs)
    rng = np.random.default_rng(5)
    try:
        for step in range(4):  # a full part, then increments over changed and erased rows
            for t in tables:
                keys = np.unique(rng.integers(0, 120_000, 60_000))
                shard.pull(t.name, keys, train=True)
                shard.push(t.name, keys, rng.standard_normal((keys.shape[0], t.dim)).astype(
                    np.float32), 100 + step)
            with shard.lock:
                shard.tables["a"].erase(rng.integers(0, 120_000, 500).astype(np.int64))
            part.wait_shipped(60)
            man = coord.snapshot(step)
        expected = shard.state_dict()
        assert [r.kind for r in man.chain("ps/0")] == ["full", "inc", "inc", "inc"]
        for h in (1, 2):  # the blocks came through the data ports, not PutBlock
            assert "PutBlock" not in smps[h].stats()["handler_cpu_s"]
        fresh = PSShard(0, 1, tables)
        rec = Recovery({1: smps[1], 2: smps[2]}, None, job="bulk", stream_min_bytes=0)
        r = rec.restore("ps/0", man.snapshot_id,
                        stage=lambda t, n: fresh.tables[t].staged_state(n))
        rec.close()
        assert sum("rows stream into the tables" in s for s in r.log) == 4, r.log
        fresh.load_state_dict(r.state)
        assert_states_equal(fresh.state_dict(), expected)
    finally:
        coord.close()
        part.close()
        for c in smps.values():
            c.close()
        for s in servers:
            s.stop()


def _wait_until(cond: Any, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_blocks_are_placed_through_the_data_port_and_checked(smp: SMPServer) -> None:
    """``op: put``: a block streamed into a segment, kept only with the right crc32c; bad
    requests, a wrong crc and a dropped connection are refused, counted and leave no
    segment behind."""
    addr = ("127.0.0.1", smp.bulk.port)
    data = np.random.default_rng(3).integers(0, 256, 3 * (1 << 20) + 77, dtype=np.uint8)
    meta = {"participant": "ps/0", "snapshot_id": 4, "kind": "inc", "index": 0,
            "block_bytes": data.nbytes, "part_size": data.nbytes}
    live = smp.store.pool.stats()["live_segments"]
    w = BulkWriter(addr, meta)
    for lo in range(0, data.nbytes, 1 << 20):
        w.write(data[lo: lo + (1 << 20)])
    w.finish(crc32c.crc32c(data))
    assert smp.store.get_block(("ps/0", 4, "inc", 0)) == data.tobytes()
    assert smp.store.pool.stats()["live_segments"] == live + 1

    bulk0, block0 = _rejected(), _rejected("block")
    for bad in ({**meta, "index": 1},                            # m = 1: no block 1 here
                {**meta, "part_size": data.nbytes + 1},           # not this part's block size
                {**meta, "participant": "../x"}, {**meta, "block_bytes": "big"}):
        with pytest.raises(InvalidInputError):
            BulkWriter(addr, bad)
    w = BulkWriter(addr, {**meta, "snapshot_id": 5})
    w.write(data)
    with pytest.raises(CorruptDataError):
        w.finish(crc32c.crc32c(data) ^ 1)
    assert smp.store.get_block(("ps/0", 5, "inc", 0)) is None
    w = BulkWriter(addr, {**meta, "snapshot_id": 6})
    w.write(data[:1000])
    w.close()                                                     # gone midway
    with pytest.raises(InvalidInputError):                        # more than the block
        BulkWriter(addr, {**meta, "snapshot_id": 7}).write(np.zeros(data.nbytes + 1, np.uint8))
    _wait_until(lambda: smp.store.pool.stats()["live_segments"] == live + 1)
    assert smp.store.get_block(("ps/0", 6, "inc", 0)) is None
    assert _rejected() + _rejected("block") - bulk0 - block0 >= 5
    # PutBlock chunks are held to the same rules (a block of this group's coding)
    for bb, ps, idx in ((data.nbytes, data.nbytes + 1, 0), (data.nbytes, 0, 0),
                        (data.nbytes, data.nbytes, 1)):
        with pytest.raises(InvalidInputError):
            smp.store.put_block(block_frame(("ps/0", 8, "inc", idx), 0, data[:10],
                                            block_bytes=bb, part_size=ps, final=False,
                                            block_crc=0))
    assert smp.store.get_block(("ps/0", 8, "inc", 0)) is None
    out, sink = _collect(data.nbytes)                             # and it still serves
    assert bulk_read(addr, {"op": "block", "participant": "ps/0", "snapshot_id": 4,
                            "kind": "inc", "index": 0}, sink) == data.nbytes
    assert bytes(out) == data.tobytes()


def test_placement_falls_back_to_put_block_when_a_data_port_fails(tmp_path: Any) -> None:
    """A data-port stream that fails midway: the part is placed again chunk by chunk."""
    from monolith_py.testing.smpgroup import LocalGroup

    group = LocalGroup(3, k=2, m=3, root=str(tmp_path))
    opened: list[Any] = []

    class Broken:
        def __init__(self) -> None:
            self.closed = False

        def write(self, chunk: Any) -> None:
            pass

        def finish(self, block_crc: int) -> None:
            raise UnavailableError("data port went away")

        def close(self) -> None:
            self.closed = True

    home = group.store(0)
    peers = home.peers

    class FlakyPeers:
        def __getattr__(self, name: str) -> Any:
            return getattr(peers, name)

        def block_writer(self, host: int, key: Any, block_bytes: int, part_size: int) -> Any:
            opened.append(Broken())
            return opened[-1]

    home.peers = FlakyPeers()
    try:
        home.put_part("ps/0", _part())
        rec = home.wait_part("ps/0", 1, "full", timeout_s=60)
        assert len(opened) == 2 and all(w.closed for w in opened)
        for i, host in enumerate(rec.placement):
            if host != 0:
                block = group.store(host).get_block(("ps/0", 1, "full", i))
                assert block is not None and crc32c.crc32c(block) == rec.block_crcs[i]
    finally:
        group.close()


def test_parts_larger_than_the_smp_accepts_are_refused_before_memory_is_reserved(
        tmp_path: Any) -> None:
    """``max_part_bytes``: a lease, a sent part and a placed block (either way) of a larger
    part are refused with a clear error and counted; nothing is reserved for them."""
    mib = 1 << 20
    cfg = SMPConfig(job="bulk", host_id=0, num_hosts=1, k=1, m=1, shm_dir=str(tmp_path / "shm"),
                    max_part_bytes=8 * mib)
    server = SMPServer(cfg).start(repair=False)
    client = SMPClient(server.address)
    try:
        store = server.store
        created = store.pool.stats()["created_bytes"]
        with pytest.raises(InvalidInputError, match="largest part"):
            client.lease("ps/0", 8 * mib + 1)
        assert client.lease("ps/0", 8 * mib)["capacity"] >= 8 * mib     # at the limit: fine
        with pytest.raises(InvalidInputError, match="largest part"):
            store.put_part("ps/0", bytes(8 * mib + 1))
        big = 1 << 40
        meta = {"participant": "ps/0", "snapshot_id": 4, "kind": "inc", "index": 0,
                "block_bytes": big, "part_size": big}
        with pytest.raises(InvalidInputError, match="largest part"):
            BulkWriter(("127.0.0.1", server.bulk.port), meta)
        with pytest.raises(InvalidInputError, match="largest part"):
            store.put_block(block_frame(("ps/0", 4, "inc", 0), 0, b"x" * 10, block_bytes=big,
                                        part_size=big, final=False, block_crc=0))
        assert store.pool.stats()["created_bytes"] - created <= 8 * mib + mib  # the lease only
        assert _rejected("lease") >= 1 and _rejected("block") >= 2
    finally:
        client.close()
        server.stop()
    default = SMPConfig(job="bulk", host_id=0, num_hosts=1, k=1, m=1,
                        shm_dir=str(tmp_path / "shm2"))
    st = os.statvfs(str(tmp_path))
    store = SnapshotStore(default)
    try:
        assert store.max_part_bytes == st.f_blocks * st.f_frsize // 2
    finally:
        store.close()


def test_a_part_much_smaller_than_its_lease_moves_only_into_free_memory(smp: Any) -> None:
    """A part committed into a lease far larger than itself moves to a free segment of
    its size (the lease goes back to the pool); with none free it keeps the lease: making
    new memory for the move would cost more than the memory it saves."""
    mib = 1 << 20
    store = smp.store
    shard = PSShard(0, 1, [TableConfig("t", dim=8)])
    shard.pull("t", np.arange(20_000), train=True)

    def commit(sid: int, free_one: bool = False) -> tuple[str, int]:
        frame = ShardCapturer(shard).capture(sid, sid, None,
                                             extra_meta={"participant": "ps/0"}).frame()
        lease = store.lease("ps/0", 64 * mib)
        if free_one:  # a free segment of the part's size
            store.pool.release(store.pool.create(frame.nbytes))
        with attach(lease["path"], lease["capacity"], directory=lease["directory"]) as view:
            view[: frame.nbytes] = frame
        created = store.pool.stats()["created_bytes"]
        store.commit("ps/0", lease["segment"], frame.nbytes)
        assert store.pool.stats()["created_bytes"] == created       # no new memory
        assert store.wait_part("ps/0", sid, "full", timeout_s=60) is not None
        return lease["segment"], frame.nbytes

    segment, nbytes = commit(1)
    assert store._parts[("ps/0", 1, "full")].seg.name == segment     # kept its lease
    segment = commit(2, free_one=True)[0]
    moved = store._parts[("ps/0", 2, "full")].seg
    assert moved.name != segment and moved.capacity < 2 * nbytes      # moved, lease back
    assert store.pool.get(segment) is None and bytes(moved.view[:8]) != bytes(8)
