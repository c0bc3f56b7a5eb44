"""Redis registry for clusters (redis-py's asyncio client).

Layout, under a key prefix (default ``mxo:``):

* ``src:{source_id}``: the record as JSON, expiring ``ttl`` seconds after the
  last heartbeat, so a crashed source disappears on its own;
* ``mblob:{key}``: a stored manifest (:attr:`Manifest.stored`), once however many
  sources serve it; every write of a record naming it extends its expiry to
  the record's (``EXPIRE ... GT``), so it lives as long as its longest-lived
  source;
* ``idx:{identity_key}`` and ``all``: sets of source ids, so listing is one
  SMEMBERS plus one MGET, never a KEYS scan; ids whose record expired are
  pruned lazily.

State changes are read-modify-write under WATCH/MULTI, retried on conflict,
and use the same pure transitions as every backend (:mod:`.base`). Connection
problems surface as :class:`~mx_orchestrator.errors.RegistryUnavailable`.

Connections: one bounded, blocking pool per registry object (``max_connections``):
a process with a thousand loads in flight queues its calls on a few dozen
sockets instead of opening a thousand; manifests travel on a second pool
that does not decode replies (they are binary).
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import anyio

from ..errors import ConfigError, RegistryUnavailable
from ..models import Manifest, SourceRecord, SourceState
from .base import (
    Change,
    EjectionPolicy,
    RecordTransitions,
    apply_publish,
    as_listed,
    decode_record,
    encode_record,
    is_listed,
)

__all__ = ["RedisRegistry"]

T = TypeVar("T")


def _expiry(record: SourceRecord, now: float, floor: int = 0) -> int:
    """Seconds a record key lives: its TTL, or its ejection if that lasts longer (at least ``floor``)."""
    return max(1, floor, math.ceil(max(record.ttl, record.ejected_until - now)) + 1)


class RedisRegistry(RecordTransitions):
    def __init__(
        self,
        client: Any,
        *,
        prefix: str = "mxo:",
        ejection: EjectionPolicy | None = None,
        clock: Callable[[], float] = time.time,
        url: str = "",
        binary_client: Any = None,
        key_expiry_floor: int = 0,
    ) -> None:
        """``key_expiry_floor``: keys live at least this many of the server's seconds. Listings judge
        a record's life by ``clock``; the server's expiry only collects what nobody renews, in real
        seconds: a registry driven by a virtual clock (the fleet bench) must not lose live records
        to it while virtual time stands still."""
        self._key_expiry_floor = key_expiry_floor
        self._r = client
        #: replies not decoded: stored manifests are zlib bytes
        self._b = binary_client if binary_client is not None else client
        self._p = prefix
        self._ejection = ejection or EjectionPolicy()
        self._clock = clock
        self._url = url

    @classmethod
    def from_url(cls, url: str, *, max_connections: int = 32, **kwargs: Any) -> RedisRegistry:
        try:
            import redis.asyncio as aioredis
        except ImportError as exc:
            raise ConfigError("the redis registry needs: pip install 'mx-orchestrator[redis]'") from exc

        from redis.asyncio.retry import Retry
        from redis.backoff import ExponentialBackoff

        def client(decode: bool) -> Any:
            pool = aioredis.BlockingConnectionPool.from_url(
                url,
                max_connections=max_connections,
                timeout=2.0,  # waiting for a free connection is bounded like a call
                decode_responses=decode,
                socket_timeout=2.0,
                socket_connect_timeout=2.0,
                # a pooled connection the server closed (a restart) is retried on a fresh one
                retry=Retry(ExponentialBackoff(cap=0.2, base=0.01), 2),
            )
            return aioredis.Redis(connection_pool=pool)

        return cls(client(True), url=url, binary_client=client(False), **kwargs)

    def __repr__(self) -> str:
        from ..logs import _scrub

        return f"RedisRegistry({_scrub(self._url)!r})"

    # -- plumbing -------------------------------------------------------------

    def _k(self, *parts: str) -> str:
        return self._p + ":".join(parts)

    async def _call(self, fn: Callable[[], Awaitable[T]]) -> T:
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import RedisError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        try:
            return await fn()
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise RegistryUnavailable(f"redis registry unreachable: {exc}") from exc
        except RedisError as exc:
            raise RegistryUnavailable(f"redis registry error: {exc}") from exc

    async def _change_each(self, changes: Mapping[str, Change]) -> dict[str, SourceRecord | None]:
        """Apply each change to its stored record, all in one transaction (WATCH/MULTI, retried
        on conflict): one round trip of reads and one of writes however many records."""
        from redis.exceptions import WatchError

        ids = list(changes)
        keys = [self._k("src", source_id) for source_id in ids]

        async def run() -> dict[str, SourceRecord | None]:
            async with self._r.pipeline(transaction=True) as pipe:
                conflicts = 0
                while True:
                    try:
                        await pipe.watch(*keys)
                        texts = await pipe.mget(keys)
                        written = {
                            i: changes[i](decode_record(text)) for i, text in zip(ids, texts, strict=True)
                        }
                        if all(updated is None for updated in written.values()):
                            await pipe.unwatch()
                            return written
                        now = self._clock()
                        pipe.multi()
                        for key, updated in zip(keys, written.values(), strict=True):
                            if updated is None:
                                continue
                            expiry = _expiry(updated, now, self._key_expiry_floor)
                            pipe.set(key, encode_record(updated), ex=expiry)
                            if updated.manifest_key:
                                pipe.expire(self._k("mblob", updated.manifest_key), expiry, gt=True)
                            pipe.sadd(self._k("idx", updated.identity_key), updated.source_id)
                            pipe.sadd(self._k("all"), updated.source_id)
                        await pipe.execute()
                        return written
                    except WatchError:
                        # another writer changed a record first: back off a little, with full
                        # jitter, so a hundred targets leasing one seed do not retry in lockstep
                        conflicts += 1
                        await anyio.sleep(random.uniform(0.0, min(0.05, 0.0005 * 2**conflicts)))
                        continue

        return await self._call(run)

    # -- contract -------------------------------------------------------------

    async def publish(self, record: SourceRecord, manifest: Manifest | None = None) -> None:
        now = self._clock()
        stored = manifest.stored if manifest is not None else None
        if stored is not None:
            blob_key = self._k("mblob", stored.key)

            async def store() -> None:
                # once per distinct manifest: a second source serving it sends only its record
                expiry = _expiry(record, now, self._key_expiry_floor)
                if not await self._b.set(blob_key, stored.blob, ex=expiry, nx=True):
                    await self._b.expire(blob_key, expiry, gt=True)

            await self._call(store)

        def change(previous: SourceRecord | None) -> SourceRecord:
            return apply_publish(previous, record, now, stored)

        await self._change(record.source_id, change)

    async def list(
        self, identity_key: str | None = None, state: SourceState | None = SourceState.READY
    ) -> list[SourceRecord]:
        index = self._k("idx", identity_key) if identity_key is not None else self._k("all")

        async def run() -> list[SourceRecord]:
            ids = sorted(await self._r.smembers(index))
            if not ids:
                return []
            texts = await self._r.mget([self._k("src", i) for i in ids])
            gone = [i for i, t in zip(ids, texts, strict=True) if t is None]
            if gone:
                await self._r.srem(index, *gone)
            now = self._clock()
            records = (decode_record(t) for t in texts)
            return [
                as_listed(r, now)
                for r in records
                if r is not None
                and (identity_key is None or r.identity_key == identity_key)
                and is_listed(r, now, state)
            ]

        return await self._call(run)

    async def get(self, source_id: str) -> SourceRecord | None:
        text = await self._call(lambda: self._r.get(self._k("src", source_id)))
        return decode_record(text)

    async def get_manifest_blob(self, key: str) -> bytes | None:
        blob = await self._call(lambda: self._b.get(self._k("mblob", key)))
        return blob if isinstance(blob, bytes) else None

    async def manifests_stored(self) -> int:
        """How many manifests the server holds under this prefix (one per distinct manifest)."""

        async def count() -> int:
            return sum([1 async for _ in self._r.scan_iter(match=self._k("mblob", "*"), count=1000)])

        return await self._call(count)

    async def remove(self, source_id: str, generation: str | None = None) -> bool:
        record = await self.get(source_id)
        if record is None or (generation is not None and record.generation != generation):
            return False

        async def run() -> None:
            async with self._r.pipeline(transaction=True) as pipe:
                # the manifest stays: other sources may serve it; it expires with the last of them
                pipe.delete(self._k("src", source_id))
                pipe.srem(self._k("idx", record.identity_key), source_id)
                pipe.srem(self._k("all"), source_id)
                await pipe.execute()

        await self._call(run)
        return True

    async def aclose(self) -> None:
        for client in {id(self._r): self._r, id(self._b): self._b}.values():
            with contextlib.suppress(Exception):  # closing a client whose server is gone must not raise
                await client.aclose()
                await client.connection_pool.disconnect()
