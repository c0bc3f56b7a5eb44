"""Source registries: the contract, the pure record transitions, and the backends.

``open_registry(url)`` turns a registry URL into a backend: ``memory://`` (this
process only), ``sqlite:///path/to/file.db`` (the embedded default, shared by
processes on one machine) and ``redis://host:port/db``.
"""

from __future__ import annotations

from ..errors import ConfigError
from ..models import SourceRecord
from .base import (
    EjectionPolicy,
    SourceRegistry,
    apply_heartbeat,
    apply_mark_stale,
    apply_publish,
    apply_reader,
    is_expired,
    is_listed,
)
from .memory import MemoryRegistry

__all__ = [
    "EjectionPolicy",
    "MemoryRegistry",
    "SourceRegistry",
    "apply_heartbeat",
    "apply_reader",
    "apply_mark_stale",
    "apply_publish",
    "is_expired",
    "is_listed",
    "open_registry",
    "records_of",
]


def open_registry(url: str) -> SourceRegistry:
    """Open the registry a URL names; raises :class:`ConfigError` for an unknown scheme."""
    scheme, sep, _ = url.partition("://")
    if not sep:
        raise ConfigError(f"registry URL {url!r} has no scheme (memory://, sqlite:///, redis://)")
    if scheme == "memory":
        return MemoryRegistry()
    if scheme == "sqlite":
        from .sqlite import SqliteRegistry

        return SqliteRegistry.from_url(url)
    if scheme in ("redis", "rediss"):
        from .redis import RedisRegistry

        return RedisRegistry.from_url(url)
    raise ConfigError(f"unknown registry scheme {scheme!r} in {url!r}")


async def records_of(url: str, model_id: str | None = None) -> list[SourceRecord]:
    """Every record the registry at ``url`` holds, in any state; only ``model_id``'s when given."""
    registry = open_registry(url)
    try:
        records = await registry.list(None, None)
    finally:
        await registry.aclose()
    if model_id:
        records = [r for r in records if r.identity_key.split("@", 1)[0] == model_id]
    return records
