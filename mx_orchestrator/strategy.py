"""The strategy and prober contracts, and the context an attempt runs in.

A strategy turns one (candidate, target) pair into exactly one
:class:`~mx_orchestrator.outcomes.Outcome`. It must be cancellation-safe: the
pipeline enforces each attempt's deadline by cancelling it, and everything the
strategy acquired (handles, remote agents, registrations, threads) must be
released in ``finally`` blocks.

A prober is what evaluation runs against each registry record: fetch what the
source publishes (its manifest) so strategies can decide before moving bytes.

Strategies are found by name through the ``mx_orchestrator.strategies``
entry-point group (:func:`load_strategy`): the built-in ones and third-party
ones alike. An entry point names a factory; when it has a ``from_options``
classmethod, that is called with the caller's :class:`StrategyOptions`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import anyio

from .errors import ConfigError
from .manifests import PROCESS_MANIFESTS, ManifestCache
from .models import Candidate, ModelIdentity, SourceRecord
from .outcomes import LocalFailure, Outcome
from .registry.base import SourceRegistry

__all__ = [
    "ENTRY_POINT_GROUP",
    "PHASES",
    "AttemptContext",
    "Phases",
    "ProbeFailure",
    "Prober",
    "ProgressCallback",
    "RegistryProber",
    "Strategy",
    "StrategyOptions",
    "attempt_safely",
    "available_strategies",
    "load_strategy",
]

ENTRY_POINT_GROUP = "mx_orchestrator.strategies"

#: Called with (bytes_done, bytes_total) as a transfer progresses.
ProgressCallback = Callable[[int, int], None]


#: The phases an attempt reports, in the order they happen (0 where one did not happen).
PHASES = ("agent", "connect", "allocate", "register", "transfer", "verify")


class Phases:
    """Where an attempt's time went: a strategy times each phase (``with ctx.phases.timed("verify")``)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        #: ``(phase, began, ended)`` on anyio's clock for every timed phase: which overlapped which
        self.spans: list[tuple[str, float, float]] = []
        #: bytes the attempt set out to move, once it knows (a stall is judged against them)
        self.planned_bytes = 0

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds

    @contextlib.contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        """Time a phase on anyio's clock (the load path's one clock): call it on the event loop."""
        began = anyio.current_time()
        try:
            yield
        finally:
            ended = anyio.current_time()
            self.add(phase, ended - began)
            self.spans.append((phase, began, ended))

    def as_dict(self) -> dict[str, float]:
        """Every phase of :data:`PHASES` (0 when it did not happen), then any a strategy added."""
        return {
            p: round(self.seconds.get(p, 0.0), 6) for p in (*PHASES, *sorted(set(self.seconds) - set(PHASES)))
        }


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
    phases: Phases = field(default_factory=Phases)
    #: the content fingerprint the caller pinned (``mxo pull --expect``): only that content may load
    expect: str | None = None

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


async def attempt_safely(strategy: Strategy, ctx: AttemptContext, log: Any) -> Outcome:
    """``strategy.attempt(ctx)``; a strategy that raises is a bug, logged with its traceback, and a
    ``LocalFailure`` (never the source's fault): a buggy plugin must not take a load down."""
    began = anyio.current_time()
    try:
        return await strategy.attempt(ctx)
    except Exception as exc:
        log.exception("attempt.strategy_raised", strategy=strategy.name)
        return LocalFailure(
            strategy=strategy.name,
            source_id=ctx.source_id,
            seconds=anyio.current_time() - began,
            detail=f"strategy raised {type(exc).__name__}: {exc}",
        )


@dataclass(frozen=True)
class ProbeFailure:
    source_id: str
    detail: str


@runtime_checkable
class Prober(Protocol):
    async def probe(self, record: SourceRecord) -> Candidate | ProbeFailure: ...


class RegistryProber:
    """Default prober: the manifest the record names, through a :class:`ManifestCache` (by
    default the process's), so each distinct manifest is fetched and parsed once."""

    def __init__(self, registry: SourceRegistry, cache: ManifestCache | None = None) -> None:
        self._registry = registry
        self._cache = cache if cache is not None else PROCESS_MANIFESTS

    def probe_known(self, record: SourceRecord) -> Candidate | None:
        """The candidate at once when its manifest is parsed already (no I/O, no task); else ``None``.

        A fleet target re-listing hundreds of sources during capacity waits probes
        each one this way: they all name manifests it has seen.
        """
        manifest = self._cache.peek(record.manifest_key) if record.manifest_key else None
        return Candidate(record, manifest) if manifest is not None else None

    async def probe(self, record: SourceRecord) -> Candidate | ProbeFailure:
        key = record.manifest_key
        if not key:
            return ProbeFailure(record.source_id, "the source published no manifest")
        manifest = await self._cache.get(key, lambda: self._registry.get_manifest_blob(key))
        if manifest is None:
            return ProbeFailure(record.source_id, f"the registry holds no manifest {key[:17]}...")
        return Candidate(record, manifest)


@dataclass(frozen=True)
class StrategyOptions:
    """What a caller (the CLI, an embedding) may tell every strategy; each uses what concerns it."""

    repo_id: str | None = None
    revision: str | None = None
    hub_endpoint: str | None = None
    hub_cache_dir: Path | None = None


def available_strategies() -> dict[str, str]:
    """Strategy name -> ``module:attribute`` of every registered strategy factory."""
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def load_strategy(name: str, options: StrategyOptions | None = None, **arguments: Any) -> Strategy:
    """Instantiate the strategy registered as ``name``.

    With ``arguments``, the factory is called with them; otherwise its
    ``from_options`` (when it has one) gets ``options``, else it is called bare.
    """
    matches = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    if not matches:
        known = ", ".join(sorted(available_strategies())) or "none"
        raise ConfigError(f"unknown strategy {name!r} (registered: {known})")
    try:
        factory = matches[0].load()
    except ImportError as exc:
        raise ConfigError(f"strategy {name!r} cannot be imported: {exc}") from exc
    from_options = getattr(factory, "from_options", None)
    if arguments or from_options is None:
        strategy = factory(**arguments)
    else:
        strategy = from_options(options or StrategyOptions())
    if not isinstance(strategy, Strategy):
        raise ConfigError(f"entry point {name!r} did not produce a Strategy")
    return strategy
