"""Redis registry for clusters (redis-py's asyncio client).

Layout, under a key prefix (default ``mxo:``):

* ``src:{source_id}``: the record as JSON, expiring ``ttl`` seconds after the
  last heartbeat, so a crashed source disappears on its own;
* ``manifest:{source_id}:{generation}``: its manifest, expiring with it;
* ``idx:{identity_key}`` and ``all``: sets of source ids, so listing is one
  SMEMBERS plus one MGET, never a KEYS scan; ids whose record expired are
  pruned lazily.

State changes are read-modify-write under WATCH/MULTI, retried on conflict,
and use the same pure transitions as every backend (:mod:`.base`). Connection
problems surface as :class:`~mx_orchestrator.errors.RegistryUnavailable`.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from ..errors import ConfigError, RegistryUnavailable
from ..models import Manifest, SourceRecord, SourceState
from .base import (
    Change,
    EjectionPolicy,
    RecordTransitions,
    apply_publish,
    decode_record,
    encode_record,
    is_listed,
)

__all__ = ["RedisRegistry"]

T = TypeVar("T")


def _expiry(record: SourceRecord, now: float) -> int:
    """Seconds a record key lives: its TTL, or its ejection if that lasts longer."""
    return max(1, math.ceil(max(record.ttl, record.ejected_until - now)) + 1)


class RedisRegistry(RecordTransitions):
    def __init__(
        self,
        client: Any,
        *,
        prefix: str = "mxo:",
        ejection: EjectionPolicy | None = None,
        clock: Callable[[], float] = time.time,
        url: str = "",
    ) -> None:
        self._r = client
        self._p = prefix
        self._ejection = ejection or EjectionPolicy()
        self._clock = clock
        self._url = url

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> RedisRegistry:
        try:
            import redis.asyncio as aioredis
        except ImportError as exc:
            raise ConfigError("the redis registry needs: pip install 'mx-orchestrator[redis]'") from exc
        client = aioredis.from_url(url, decode_responses=True, socket_timeout=2.0, socket_connect_timeout=2.0)
        return cls(client, url=url, **kwargs)

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

    async def _change(self, source_id: str, change: Change) -> SourceRecord | None:
        """Apply ``change`` to the stored record atomically (WATCH/MULTI, retried on conflict)."""
        from redis.exceptions import WatchError

        key = self._k("src", source_id)

        async def run() -> SourceRecord | None:
            async with self._r.pipeline(transaction=True) as pipe:
                while True:
                    try:
                        await pipe.watch(key)
                        current = decode_record(await pipe.get(key))
                        updated = change(current)
                        if updated is None:
                            await pipe.unwatch()
                            return None
                        now = self._clock()
                        expiry = _expiry(updated, now)
                        pipe.multi()
                        pipe.set(key, encode_record(updated), ex=expiry)
                        pipe.expire(self._k("manifest", source_id, updated.generation), expiry)
                        pipe.sadd(self._k("idx", updated.identity_key), source_id)
                        pipe.sadd(self._k("all"), source_id)
                        await pipe.execute()
                        return updated
                    except WatchError:
                        continue

        return await self._call(run)

    # -- contract -------------------------------------------------------------

    async def publish(self, record: SourceRecord, manifest: Manifest | None = None) -> None:
        now = self._clock()
        previous = await self.get(record.source_id)
        if previous is not None and previous.generation != record.generation:
            # the old process generation's manifest goes with it
            old = self._k("manifest", record.source_id, previous.generation)
            await self._call(lambda: self._r.delete(old))
        if manifest is not None:
            text = manifest.to_json()
            await self._call(
                lambda: self._r.set(
                    self._k("manifest", record.source_id, record.generation), text, ex=_expiry(record, now)
                )
            )

        def change(previous: SourceRecord | None) -> SourceRecord:
            return apply_publish(previous, record, now)

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
                r
                for r in records
                if r is not None
                and (identity_key is None or r.identity_key == identity_key)
                and is_listed(r, now, state)
            ]

        return await self._call(run)

    async def get(self, source_id: str) -> SourceRecord | None:
        text = await self._call(lambda: self._r.get(self._k("src", source_id)))
        return decode_record(text)

    async def get_manifest(self, source_id: str, generation: str) -> Manifest | None:
        text = await self._call(lambda: self._r.get(self._k("manifest", source_id, generation)))
        return Manifest.from_json(text) if text is not None else None

    async def remove(self, source_id: str, generation: str | None = None) -> bool:
        record = await self.get(source_id)
        if record is None or (generation is not None and record.generation != generation):
            return False

        async def run() -> None:
            async with self._r.pipeline(transaction=True) as pipe:
                pipe.delete(self._k("src", source_id), self._k("manifest", source_id, record.generation))
                pipe.srem(self._k("idx", record.identity_key), source_id)
                pipe.srem(self._k("all"), source_id)
                await pipe.execute()

        await self._call(run)
        return True

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):  # closing a client whose server is gone must not raise
            await self._r.aclose()
