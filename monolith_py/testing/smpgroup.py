"""An in-process group of SMPs (one :class:`SnapshotStore` per "host"), with faults.

The stores talk to each other through direct calls instead of gRPC; a host can be taken
down (its store answers :class:`~monolith_py.errors.UnavailableError`), killed (its memory
is gone), restarted empty, or have a stored block or part flipped. Tests of the snapshot
logic and the recovery policy use it; the multi-process tests use real ``monolith smp``
processes instead.

Example::

    >>> import tempfile
    >>> g = LocalGroup(3, k=2, m=3, root=tempfile.mkdtemp())
    >>> sorted(g.sources())
    [0, 1, 2]
    >>> g.close()
"""

from __future__ import annotations

import os
from typing import Any

from monolith_py.errors import UnavailableError
from monolith_py.snapshot.manifest import PartKey, PartRecord
from monolith_py.snapshot.store import BlockKey, SMPConfig, SnapshotStore

__all__ = ["LocalGroup"]


class _Peers:
    def __init__(self, group: LocalGroup) -> None:
        self.group = group

    def put_block(self, host: int, frame: bytes) -> None:
        self.group.store(host).put_block(frame)

    def put_record(self, host: int, record: PartRecord) -> None:
        self.group.store(host).put_record(record)

    def get_block(self, host: int, key: BlockKey) -> bytes | None:
        return self.group.store(host).get_block(key)


class _Source:
    """A store seen from outside: unavailable while its host is down."""

    def __init__(self, group: LocalGroup, host: int) -> None:
        self.group, self.host = group, host

    def __getattr__(self, name: str) -> Any:
        return getattr(self.group.store(self.host), name)


class LocalGroup:
    """``num_hosts`` in-process SMPs of job ``job`` with segments under ``root``."""

    def __init__(self, num_hosts: int, k: int = 2, m: int = 3, *, root: str,
                 job: str = "test", keep: int = 2, full_every: int = 0,
                 chunk_bytes: int = 1 << 16) -> None:
        self.root = root
        self.configs = [SMPConfig(job=job, host_id=h, num_hosts=num_hosts, k=k, m=m, keep=keep,
                                  full_every=full_every, chunk_bytes=chunk_bytes,
                                  place_timeout_s=1.0,
                                  shm_dir=os.path.join(root, f"h{h}"))
                        for h in range(num_hosts)]
        self.down: set[int] = set()
        self._stores: list[SnapshotStore | None] = [None] * num_hosts
        for h in range(num_hosts):
            self.restart(h)

    @property
    def num_hosts(self) -> int:
        return len(self.configs)

    def store(self, host: int) -> SnapshotStore:
        s = self._stores[host]
        if host in self.down or s is None:
            raise UnavailableError(f"host {host} is down")
        return s

    def source(self, host: int) -> _Source:
        return _Source(self, host)

    def sources(self) -> dict[int, Any]:
        return {h: self.source(h) for h in range(self.num_hosts)}

    # -- faults ----------------------------------------------------------------------------------

    def kill(self, host: int) -> None:
        """The host dies: its SMP's memory is lost."""
        s = self._stores[host]
        self._stores[host] = None
        self.down.add(host)
        if s is not None:
            s.close()

    def restart(self, host: int) -> SnapshotStore:
        """A fresh, empty SMP on ``host``."""
        old = self._stores[host]
        if old is not None:
            old.close()
        self.down.discard(host)
        store = SnapshotStore(self.configs[host], _Peers(self) if self.configs[host].m > 1 else None)
        self._stores[host] = store
        return store

    def flip_block(self, host: int, key: BlockKey, byte: int = 0) -> None:
        """Flip one bit of a block stored on ``host`` (held for another host's part)."""
        blob = self.store(host)._blocks[key]
        blob.seg.view[byte % blob.size] ^= 0x01

    def flip_part(self, host: int, key: PartKey, byte: int = 0) -> None:
        """Flip one bit of a whole part held on its home ``host``."""
        blob = self.store(host)._parts[key]
        blob.seg.view[byte % blob.size] ^= 0x01

    def drain(self) -> None:
        for h, s in enumerate(self._stores):
            if s is not None and h not in self.down:
                s.drain()

    def close(self) -> None:
        for h in range(self.num_hosts):
            s = self._stores[h]
            self._stores[h] = None
            if s is not None:
                s.close()
