"""Remote agents kept across attempts and loads: the connection pool of each RDMA agent.

Connecting to a source (loading its metadata into our agent) is I/O at the
edge; a second pull from the same source should not pay it again. Entries are
keyed by the source's id, process generation and metadata, so a source that
restarts or re-publishes is a new key. Time is the caller's (anyio's clock on
the load path): the pool reads no clock of its own.
"""

from __future__ import annotations

import hashlib
import weakref
from collections import OrderedDict
from typing import Any

from .rdma import RdmaAgent

__all__ = ["ConnectionPool", "PoolKey", "pool_for", "release_connections"]

#: ``(source id, generation, SHA-256 of the metadata)``
PoolKey = tuple[str, str, bytes]


class ConnectionPool:
    """Remote agents kept across attempts and loads, so a second pull from a source skips the connect.

    An entry is dropped when an attempt through it fails (the caller says so),
    when it sat unused for ``idle_seconds`` (the source may have expired), when
    the same source shows up with another generation or metadata, and the least
    recently used one goes when more than ``limit`` are held. :meth:`close`
    drops them all.
    """

    def __init__(self, agent: RdmaAgent, *, limit: int = 64, idle_seconds: float = 120.0) -> None:
        self.agent = agent
        self.limit = limit
        self.idle_seconds = idle_seconds
        self._entries: OrderedDict[PoolKey, tuple[str, float]] = OrderedDict()
        self._in_use: dict[PoolKey, int] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def acquire(self, source_id: str, generation: str, metadata: bytes, now: float) -> tuple[PoolKey, str]:
        """The remote agent's name for this source, connecting only when none is held (EdgeFailure)."""
        key = (source_id, generation, hashlib.sha256(metadata).digest())
        for other in [k for k in self._entries if k[0] == source_id and k != key]:
            self._disconnect(other)  # an older generation, or metadata that changed
        for other, (_, used) in list(self._entries.items()):
            if now - used > self.idle_seconds and not self._in_use.get(other):
                self._disconnect(other)
        if key in self._entries:
            name, _ = self._entries.pop(key)
        else:
            name = self.agent.connect(metadata)
        self._entries[key] = (name, now)
        self._in_use[key] = self._in_use.get(key, 0) + 1
        while len(self._entries) > self.limit:
            oldest = next((k for k in self._entries if not self._in_use.get(k)), None)
            if oldest is None:
                break
            self._disconnect(oldest)
        return key, name

    def release(self, key: PoolKey, *, failed: bool) -> None:
        """Done with ``key``; ``failed`` drops the connection (the source failed or lied)."""
        count = self._in_use.get(key, 0) - 1
        if count <= 0:
            self._in_use.pop(key, None)
        else:
            self._in_use[key] = count
        if failed:
            self._disconnect(key)

    def _disconnect(self, key: PoolKey) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.agent.disconnect(entry[0])

    def close(self) -> None:
        for key in list(self._entries):
            self._disconnect(key)


_pools: weakref.WeakKeyDictionary[Any, ConnectionPool] = weakref.WeakKeyDictionary()


def pool_for(agent: RdmaAgent) -> ConnectionPool:
    """The one connection pool of ``agent`` (shared by every strategy that uses it)."""
    pool = _pools.get(agent)
    if pool is None:
        pool = _pools[agent] = ConnectionPool(agent)
    return pool


def release_connections() -> None:
    """Drop every pooled remote agent of this process (shutdown, tests asserting no leaks)."""
    for pool in list(_pools.values()):
        pool.close()
