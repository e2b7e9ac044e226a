"""The SMP's data port: bulk reads of parts and blocks over plain TCP (``snapshot.bulk``)."""

from __future__ import annotations

import socket
import time
from typing import Any

import numpy as np
import pytest

from monolith_py.errors import InvalidInputError, UnavailableError
from monolith_py.observe.metrics import REGISTRY
from monolith_py.ps import PSShard
from monolith_py.snapshot.bulk import MAX_REQUEST, BulkServer, bulk_read
from monolith_py.snapshot.pspart import ShardCapturer
from monolith_py.snapshot.smp import SMPClient, SMPServer
from monolith_py.snapshot.store import SMPConfig
from monolith_py.table import TableConfig
from monolith_py.wire import encode_arrays


def _part() -> bytes:
    shard = PSShard(0, 1, [TableConfig("t", dim=8)])
    shard.pull("t", np.arange(20_000), train=True)
    return bytes(ShardCapturer(shard).capture(1, 1, None, extra_meta={"participant": "ps/0"})
                 .frame())


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


def _rejected() -> float:
    return REGISTRY.get_sample_value("monolith_smp_rejected_total",
                                     {"host": "0", "what": "bulk"}) or 0.0


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
        out, sink = _collect(len(data))
        assert client.stream_part(key, sink, size_hint=len(data)) == len(data)
        assert bytes(out) == data
        assert client._bulk == ("127.0.0.1", smp.bulk.port)  # the data port carried it
        out, sink = _collect(len(data))
        assert client.stream_block((*key, 0), sink) == len(data)  # k=1: block 0 is the part
        assert bytes(out) == data
        assert client.stream_part(("ps/0", 99, "full"), sink) is None
        assert client.stream_block((*key, 3), sink) is None
        # the gRPC stream gives the same bytes (SMPs without a data port)
        client._bulk = False
        out, sink = _collect(len(data))
        assert client.stream_part(key, sink) == len(data) and bytes(out) == data
    finally:
        client.close()


def test_client_asks_again_when_the_data_port_moved(smp: SMPServer) -> None:
    data = _part()
    client = SMPClient(smp.address)
    try:
        key = client.put_part("ps/0", data)
        out, sink = _collect(len(data))
        client.stream_part(key, sink)
        old = smp.bulk
        smp.bulk = BulkServer(smp._open_bulk, "127.0.0.1").start()
        old.stop()
        out, sink = _collect(len(data))
        assert client.stream_part(key, sink) == len(data) and bytes(out) == data
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
    out, sink = _collect(len(data))
    assert client.stream_part(key, sink) == len(data) and bytes(out) == data
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
