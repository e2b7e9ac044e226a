"""Fixtures for the PS integration tests: shard processes on loopback, always stopped."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator, Sequence

import pytest

from monolith_py.ps.launch import ShardProcesses


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def start_shards(tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[Callable[[int, Sequence[str]], ShardProcesses]]:
    """``start_shards(n, args)`` starts ``n`` ``monolith ps`` processes (waits until each
    serves); every one is stopped at teardown (SIGTERM, then SIGKILL)."""
    started: list[ShardProcesses] = []

    def start(n: int, args: Sequence[str]) -> ShardProcesses:
        procs = ShardProcesses(n, args, log_dir=str(tmp_path_factory.mktemp("ps-logs")),
                               start_timeout_s=180)
        started.append(procs)
        return procs.start()

    yield start
    for procs in started:
        procs.stop(grace_s=10)
