"""The orchestrator: configuration, what loads learned, and :meth:`Orchestrator.load`.

An :class:`Orchestrator` holds what every load of a process shares: the
registry, the strategies in order, the policy, the selection key, timeouts,
striping and pinning options, and (kept apart from configuration) what loads
learned (:class:`Learned`). Each load is carried out by the one driver,
:class:`~mx_orchestrator.load.LoadRun`, over the pure core
(:class:`~mx_orchestrator.plan.Planner`, :class:`~mx_orchestrator.parts.PartPlanner`,
:class:`~mx_orchestrator.policy.Policy`). It runs on anyio, so under asyncio
and trio alike.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import anyio
import anyio.abc

from .config import check_count, check_rate, check_seconds
from .errors import ConfigError
from .holdings import Holdings
from .load import LoadRun
from .manifests import ManifestCache
from .models import ModelIdentity, check_pin
from .policy import DEFAULT_POLICY, Policy
from .registry.base import SourceRegistry
from .report import LoadObserver, LoadReport
from .selection import SelectionPolicy, rendezvous
from .settings import Learned
from .strategy import Prober, ProgressCallback, RegistryProber, Strategy

__all__ = ["Learned", "LoadObserver", "Orchestrator"]


class Orchestrator:
    """Loads one model from the best source available.

    >>> orchestrator = Orchestrator(registry, [RdmaRegion(), RdmaTensor(), HfDownload(...)])
    >>> report = await orchestrator.load(ModelIdentity("org/model"), target)

    ``rank_window``: once the first candidate is known, how long the first
    attempt waits for the remaining probes so that ranking, not probe speed,
    picks the source (0 starts at once). ``expect``: a content fingerprint
    (``mxo fingerprint``); only a source whose manifest commits to it is read,
    and the landed bytes are checked against its digests, not against what a
    source claims.

    ``stripe``: up to this many sources read disjoint parts of the model at
    once (see :mod:`mx_orchestrator.load`); with 1, one source at a time, and
    still in parts, so a failed part moves alone to another source. ``hedge``:
    a part in flight for longer than its expected time is also asked of an idle
    source (with ``stripe`` 1, of another source once the read stalls); the
    first copy to land wins.
    ``min_part_bytes``: the smallest part worth a transfer of its own; ``max_part_bytes``: the
    largest (``None``: no cap; a fleet that fans out wants parts that land, and so are served, soon).
    ``manifest_cache``: where parsed manifests are kept by key (default: the
    process's, so a second load fetches none).

    ``republish``: each load's target is served to peers from its first part
    that landed verified (a partial source), whole once loaded, for as long
    as the orchestrator is open (``async with``); ``serve_options`` go to its
    :class:`~mx_orchestrator.source.WeightSource` (``source_id``, ``ttl``,
    ``max_readers``, ...; the second target served is ``source_id-2``, and so
    on). See :func:`~mx_orchestrator.fanout.load_and_serve`.

    >>> async with Orchestrator(registry, strategies, republish=True, max_part_bytes=64 << 20) as o:
    ...     report = await o.load(ModelIdentity("org/model"), target)
    ...     await serve_requests()  # peers read the weights meanwhile; unpublished on exit
    """

    def __init__(
        self,
        registry: SourceRegistry | None,
        strategies: Sequence[Strategy],
        *,
        policy: Policy = DEFAULT_POLICY,
        selection: SelectionPolicy = rendezvous,
        prober: Prober | None = None,
        probe_concurrency: int = 128,
        probe_timeout: float = 2.0,
        attempt_timeout: float = 60.0,
        load_timeout: float | None = None,
        rank_window: float = 0.02,
        target_id: str | None = None,
        observers: Sequence[LoadObserver] = (),
        expect: str | None = None,
        reader_lease: float = 10.0,
        stripe: int = 1,
        hedge: bool = True,
        min_part_bytes: int = 32 << 20,
        max_part_bytes: int | None = None,
        max_rate: float | None = None,
        manifest_cache: ManifestCache | None = None,
        republish: bool = False,
        serve_options: Mapping[str, Any] | None = None,
    ) -> None:
        if not strategies:
            raise ConfigError("an orchestrator needs at least one strategy")
        names = [s.name for s in strategies]
        if len(set(names)) != len(names):
            raise ConfigError(f"strategy names must be unique, got {names}")
        check_count("probe_concurrency", probe_concurrency)
        check_seconds("probe_timeout", probe_timeout)
        check_seconds("attempt_timeout", attempt_timeout)
        check_seconds("load_timeout", load_timeout, optional=True)
        check_seconds("rank_window", rank_window)
        self.reader_lease = check_seconds("reader_lease", reader_lease)
        self.stripe = check_count("stripe", stripe, maximum=64)
        self.hedge = hedge
        self.min_part_bytes = check_count("min_part_bytes", min_part_bytes, maximum=1 << 50)
        #: bytes/s a striped load reads at most (``None``: as fast as it can): a node that must not
        #: saturate a link it shares; parts start no sooner than the rate allows
        self.max_rate = check_rate("max_rate", max_rate)
        self.max_part_bytes = (
            None if max_part_bytes is None else check_count("max_part_bytes", max_part_bytes, maximum=1 << 50)
        )
        #: what loads learned (not configuration): the next load's expectations start from it
        self.learned = Learned()
        if any(s.uses_peers for s in strategies) and registry is None and prober is None:
            raise ConfigError("peer strategies need a registry to find sources")
        self.registry = registry
        self.strategies = tuple(strategies)
        self.policy = policy
        self.selection = selection
        self.prober: Prober | None = prober or (
            RegistryProber(registry, manifest_cache) if registry else None
        )
        self.probe_concurrency = probe_concurrency
        self.probe_timeout = probe_timeout
        self.attempt_timeout = attempt_timeout
        self.load_timeout = load_timeout
        self.rank_window = rank_window
        if expect is not None:
            check_pin(expect)
        self.target_id = target_id or f"target-{uuid.uuid4().hex[:12]}"
        self.observers = tuple(observers)
        self.expect = expect
        if republish and registry is None:
            raise ConfigError("republish needs a registry to publish the target in")
        if serve_options is not None and not republish:
            raise ConfigError("serve_options are for republish=True")
        self.republish = republish
        self.serve_options = dict(serve_options or {})
        #: the open orchestrator's task group: republished targets serve in it until it closes
        self._serving: anyio.abc.TaskGroup | None = None
        self._exits = contextlib.AsyncExitStack()
        self._targets_served = 0

    @property
    def uses_peers(self) -> bool:
        return any(s.uses_peers for s in self.strategies)

    async def load(
        self,
        identity: ModelIdentity,
        target: Any = None,
        *,
        progress: ProgressCallback | None = None,
        holdings: Holdings | None = None,
    ) -> LoadReport:
        """Load ``identity`` into ``target`` from the best source available; the load's report.

        ``holdings``: the target serves what lands while it loads (a partial source, see
        :mod:`~mx_orchestrator.holdings` and :func:`~mx_orchestrator.fanout.load_and_serve`):
        the load marks there each tensor that landed verified. With ``republish``, the
        orchestrator makes them and serves the target until it closes.
        """
        if self.republish and holdings is None:
            return await self._load_and_serve(identity, target, progress)
        return await LoadRun(self, identity, target, progress, holdings).run()

    async def _load_and_serve(
        self, identity: ModelIdentity, target: Any, progress: ProgressCallback | None
    ) -> LoadReport:
        """The load, its target served from the first landed part in the orchestrator's task group
        (past this call); a cancelled call stops both."""
        from .fanout import load_and_serve
        from .source import source_id_or_default
        from .target import Target

        if not isinstance(target, Target):
            raise ConfigError(f"republish serves a Target's memory, not a {type(target).__name__}")
        if self._serving is None:
            raise ConfigError(
                "republish=True serves the target for as long as the orchestrator is open: "
                "use `async with Orchestrator(...)`"
            )
        registry = self.registry
        assert registry is not None
        options = dict(self.serve_options)
        self._targets_served += 1
        if self._targets_served > 1:  # each target served is a source of its own
            options["source_id"] = f"{source_id_or_default(options.get('source_id'))}-{self._targets_served}"
        ended = anyio.Event()
        reports: list[LoadReport] = []
        errors: list[Exception] = []
        scope = anyio.CancelScope()

        def on_report(report: LoadReport) -> None:
            reports.append(report)
            ended.set()

        async def serve() -> None:
            with scope:
                try:
                    await load_and_serve(
                        self, identity, target, registry,
                        on_report=on_report, progress=progress, **options,
                    )  # fmt: skip
                except Exception as exc:
                    if ended.is_set():
                        raise  # serving failed after the load: the orchestrator's ``async with`` says so
                    errors.append(exc)  # the load itself raised: so does this call
                    ended.set()

        self._serving.start_soon(serve)
        try:
            await ended.wait()
        except BaseException:
            scope.cancel()
            raise
        if errors:
            raise errors[0]
        return reports[0]

    async def prewarm(self) -> None:
        """Make what the strategies need before a first load (the transport's agent) exist now.

        For frameworks that want the cost paid during their own start-up; a load
        never needs it (agent creation starts when a peer strategy is made).
        Cancellation-safe: a cancelled prewarm leaves the creation to finish on
        its own, and nothing half made.
        """
        async with anyio.create_task_group() as tg:
            for strategy in self.strategies:
                prewarm = getattr(strategy, "prewarm", None)
                if prewarm is not None:
                    tg.start_soon(prewarm)

    async def aclose(self) -> None:
        """Release what the strategies keep between loads (pooled connections)."""
        for strategy in self.strategies:
            aclose = getattr(strategy, "aclose", None)
            if aclose is not None:
                await aclose()

    async def __aenter__(self) -> Orchestrator:
        if self.republish:
            self._serving = await self._exits.enter_async_context(anyio.create_task_group())
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            if self._serving is not None:
                self._serving.cancel_scope.cancel()  # republished targets: unpublished, leases given back
                self._serving = None
                await self._exits.aclose()
        finally:
            with anyio.CancelScope(shield=True):
                await self.aclose()
