"""Pipelined fan-out: a target that serves what it has landed while it loads, then all of it.

:func:`load_and_serve` runs one load with :class:`~mx_orchestrator.holdings.Holdings`
and, from the moment the target's memory exists, a
:class:`~mx_orchestrator.source.WeightSource` over that memory as a *partial
source* (published once, ``partial: true``; readers learn what it holds from
the source itself, see :mod:`~mx_orchestrator.holdings`). When every tensor has
landed verified, the source publishes itself whole. A load that ends another
way (the Hub shaped the memory anew, or the content it verified against was
discredited) is served whole from what it finally holds; a load that fails
stops serving. Either way it serves until cancelled: a serving process
embeds it in its own task group (or opens an ``Orchestrator(republish=True)``,
which runs it in the orchestrator's), ``mxo pull --republish`` until a signal.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any, Protocol

import anyio
import anyio.abc

from .buffers import Buffers
from .holdings import Holdings
from .models import ModelIdentity
from .registry.base import SourceRegistry
from .report import LoadReport
from .source import WeightSource, source_id_or_default
from .strategy import ProgressCallback
from .target import Target

__all__ = ["Loads", "load_and_serve"]


class Loads(Protocol):
    """What :func:`load_and_serve` needs of an :class:`~mx_orchestrator.pipeline.Orchestrator`."""

    async def load(
        self,
        identity: ModelIdentity,
        target: Any = None,
        *,
        progress: ProgressCallback | None = None,
        holdings: Holdings | None = None,
    ) -> LoadReport: ...


async def load_and_serve(
    orchestrator: Loads,
    identity: ModelIdentity,
    target: Target,
    registry: SourceRegistry,
    *,
    on_report: Callable[[LoadReport], None] | None = None,
    on_serving: Callable[[WeightSource], None] | None = None,
    progress: ProgressCallback | None = None,
    **source_options: Any,
) -> LoadReport:
    """Load ``identity`` into ``target``, serving it to peers from its first landed part; after the
    load, serve it whole until cancelled. Returns (without serving) only when the load failed.

    ``on_report``: called with the load's report as soon as it ends (serving goes on);
    ``on_serving``: called with each :class:`WeightSource` as it is published;
    ``progress``: the load's progress callback;
    ``source_options``: for :class:`WeightSource` (``source_id``, ``ttl``, ``max_readers``, ...).
    """
    source_id = source_id_or_default(source_options.pop("source_id", None))
    holdings = Holdings(served_as=source_id)  # the load never reads from its own source

    async def serve(weights: Buffers, hops: int, partial: Holdings | None) -> None:
        source = WeightSource(
            registry, weights, source_id=source_id, hops=hops, holdings=partial, **source_options
        )
        async with anyio.create_task_group() as tg:
            await tg.start(source.run)
            if on_serving is not None:
                on_serving(source)

    async with anyio.create_task_group() as tg:
        partial_scope = anyio.CancelScope()
        served: list[Buffers] = []

        async def serve_partial() -> None:
            with partial_scope:
                await holdings.ready.wait()
                buffers = target.buffers
                assert buffers is not None and holdings.manifest is not None
                served.append(buffers)
                await serve(replace(buffers, manifest=holdings.manifest), holdings.hops, holdings)

        tg.start_soon(serve_partial)
        report = await orchestrator.load(identity, target, progress=progress, holdings=holdings)
        if on_report is not None:
            on_report(report)
        if not report.loaded:
            tg.cancel_scope.cancel()
            return report
        whole = holdings.complete.is_set() and not holdings.withdrawn
        if served and whole and target.buffers is served[0]:
            await anyio.sleep_forever()  # the partial source publishes itself whole
        partial_scope.cancel()  # unpublished; the memory it offered may be gone
        hops = 0 if report.source_hops is None else report.source_hops + 1
        tg.start_soon(serve, Buffers.from_target(target), hops, None)
    return report  # pragma: no cover - serving ends only by cancellation
