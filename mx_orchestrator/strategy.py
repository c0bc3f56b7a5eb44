"""The strategy and prober contracts, and the context an attempt runs in.

A strategy turns one (candidate, target) pair into exactly one
:class:`~mx_orchestrator.outcomes.Outcome`. It must be cancellation-safe: the
pipeline enforces each attempt's deadline by cancelling it, and everything the
strategy acquired (handles, remote agents, registrations, threads) must be
released in ``finally`` blocks.

A prober is what evaluation runs against each registry record: fetch what the
source publishes (its manifest) so strategies can decide before moving bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import anyio

from .models import Candidate, ModelIdentity, SourceRecord
from .outcomes import Outcome
from .registry.base import SourceRegistry

__all__ = [
    "AttemptContext",
    "ProbeFailure",
    "Prober",
    "ProgressCallback",
    "RegistryProber",
    "Strategy",
]

#: Called with (bytes_done, bytes_total) as a transfer progresses.
ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class AttemptContext:
    identity: ModelIdentity
    target: Any
    candidate: Candidate | None
    deadline: float
    attempt_number: int = 1
    run_id: str = ""
    registry: SourceRegistry | None = None
    progress: ProgressCallback | None = None

    @property
    def remaining(self) -> float:
        """Seconds left before the attempt's deadline (anyio's clock)."""
        return max(0.0, self.deadline - anyio.current_time())

    @property
    def source_id(self) -> str | None:
        return self.candidate.source_id if self.candidate is not None else None


@runtime_checkable
class Strategy(Protocol):
    #: Name used in reports, CLI flags and entry points.
    name: str
    #: False for strategies that need no peer (the Hub): they get one attempt with no candidate.
    uses_peers: bool

    async def attempt(self, ctx: AttemptContext) -> Outcome: ...


@dataclass(frozen=True)
class ProbeFailure:
    source_id: str
    detail: str


@runtime_checkable
class Prober(Protocol):
    async def probe(self, record: SourceRecord) -> Candidate | ProbeFailure: ...


class RegistryProber:
    """Default prober: reads the manifest the source published next to its record."""

    def __init__(self, registry: SourceRegistry) -> None:
        self._registry = registry

    async def probe(self, record: SourceRecord) -> Candidate | ProbeFailure:
        started = anyio.current_time()
        manifest = await self._registry.get_manifest(record.source_id, record.generation)
        if manifest is None:
            return ProbeFailure(record.source_id, "the source published no manifest")
        return Candidate(record, manifest, anyio.current_time() - started)
