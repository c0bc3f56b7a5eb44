"""Manifests by content: each distinct stored manifest is fetched and parsed once per process.

A source record names its manifest by key (``mxm1-`` + SHA-256 of its canonical
form, :attr:`~mx_orchestrator.models.Manifest.stored`), and
:meth:`~mx_orchestrator.models.Manifest.from_stored` refuses bytes that do not
hash to the key. So a parsed manifest is a fact about its key, whoever
published it: every candidate that names the same key shares one parse, and
so does every later load in the process (a fleet of twenty sources of a
90,000-tensor MoE costs one fetch and one parse, not twenty; a second load
fetches none). Concurrent probes of one key wait for a single fetch (single
flight); a flight that fails hands its error to the probes waiting on it and
caches nothing. The cache is bounded by the tensors it holds (LRU).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import anyio

from .models import Manifest

__all__ = ["PROCESS_MANIFESTS", "ManifestCache"]

# Blobs past this size are parsed in a worker thread, so a 90,000-tensor manifest (about a
# second of validation) does not stall the event loop of a serving process.
_PARSE_INLINE_BYTES = 256 << 10


@dataclass
class _Flight:
    done: anyio.Event = field(default_factory=anyio.Event)
    result: Manifest | None = None
    error: Exception | None = None
    cancelled: bool = False


class ManifestCache:
    """Parsed manifests by key, bounded by ``max_tensors`` in all; counts what it fetched."""

    def __init__(self, *, max_tensors: int = 2_000_000) -> None:
        self.max_tensors = max_tensors
        self._entries: OrderedDict[str, Manifest] = OrderedDict()
        self._tensors = 0
        self._flights: dict[str, _Flight] = {}
        #: blobs fetched from a registry (each distinct key once while it stays cached)
        self.fetches = 0

    def peek(self, key: str) -> Manifest | None:
        """The parsed manifest ``key`` names if it is cached (no fetch)."""
        manifest = self._entries.get(key)
        if manifest is not None:
            self._entries.move_to_end(key)
        return manifest

    async def get(self, key: str, fetch: Callable[[], Awaitable[bytes | None]]) -> Manifest | None:
        """The manifest ``key`` names: cached, or ``fetch()``-ed, checked against the key and parsed.

        ``None`` when the registry has no such blob. Raises what fetching or
        parsing raised (:class:`~mx_orchestrator.errors.ManifestError` for a blob
        that is not the manifest its key names).
        """
        while (flight := self._flights.get(key)) is not None:
            await flight.done.wait()
            if flight.error is not None:
                raise flight.error
            if not flight.cancelled:
                return flight.result
            # the fetcher was cancelled (its load ended): fetch ourselves
        cached = self.peek(key)
        if cached is not None:
            return cached
        flight = self._flights[key] = _Flight()
        try:
            blob = await fetch()
            self.fetches += 1
            if blob is not None:
                if len(blob) > _PARSE_INLINE_BYTES:
                    flight.result = await anyio.to_thread.run_sync(Manifest.from_stored, key, blob)
                else:
                    flight.result = Manifest.from_stored(key, blob)
                self._keep(key, flight.result)
            return flight.result
        except anyio.get_cancelled_exc_class():
            flight.cancelled = True
            raise
        except Exception as exc:  # the probes waiting on this flight get its error; nothing is cached
            flight.error = exc
            raise
        finally:
            del self._flights[key]
            flight.done.set()

    def _keep(self, key: str, manifest: Manifest) -> None:
        size = max(1, len(manifest.tensors))
        if size > self.max_tensors:
            return
        self._entries[key] = manifest
        self._tensors += size
        while self._tensors > self.max_tensors:
            _, evicted = self._entries.popitem(last=False)
            self._tensors -= max(1, len(evicted.tensors))


#: The process-wide cache every :class:`~mx_orchestrator.strategy.RegistryProber` uses by default.
PROCESS_MANIFESTS = ManifestCache()
