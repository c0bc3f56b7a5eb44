"""Evaluation: list a model's sources and probe them concurrently, handing candidates to the driver.

One round lists the READY records of the model (through :func:`registry_call`:
bounded in time, a failure logged and returned, never raised into the load)
and probes each one at most ``probe_concurrency`` at a time, each within
``probe_timeout``. A record whose manifest this process parsed already is a
candidate at once (no task, no I/O). Candidates are handed to the driver as
they are found, so the first attempt can start while slower probes continue
(happy eyeballs); a capacity wait starts another round. What every round found is kept in one
:class:`Evaluation` for the report.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio

from .errors import ManifestError, RegistryError
from .models import Candidate, ModelIdentity, SourceRecord, SourceState
from .plan import EXHAUSTED
from .report import ProbeRecord
from .settings import EvaluationSettings
from .strategy import ProbeFailure

__all__ = ["REGISTRY_CALL_TIMEOUT", "Evaluation", "Evaluator", "Found", "registry_call"]

T = TypeVar("T")

#: Takes one usable candidate as evaluation finds it.
Found = Callable[[Candidate], None]

#: How long one registry call may take; a registry outage must not stall (or
#: crash) a load that already has its candidates.
REGISTRY_CALL_TIMEOUT = 2.0


async def registry_call(
    log: Any,
    call: Callable[[], Awaitable[T]],
    event: str,
    *,
    within: float = REGISTRY_CALL_TIMEOUT,
    **fields: Any,
) -> T | RegistryError:
    """``await call()`` within ``within`` seconds; a failure is logged as ``event`` and returned."""
    try:
        with anyio.fail_after(within):
            return await call()
    except (RegistryError, OSError, TimeoutError) as exc:
        error = exc if isinstance(exc, RegistryError) else RegistryError(str(exc) or type(exc).__name__)
        log.warning(event, error=str(error), **fields)
        return error


@dataclass
class Evaluation:
    """What evaluation found: a probe record per candidate (its latest, when a capacity wait
    listed the sources again), and a registry outage if there was one."""

    probes: dict[str, ProbeRecord] = field(default_factory=dict)
    registry_error: RegistryError | None = None
    finished_at: float | None = None
    #: content key (names, dtypes, shapes, digests, checksums) -> the candidates that published it
    #: (more than one key: they disagree, another model or another revision)
    manifests: dict[str, list[str]] = field(default_factory=dict)

    def explain(self, reason: str, *, tried: bool, key: str) -> str:
        """A failed load's reason, told from what evaluation found when nothing was tried."""
        if tried or reason != EXHAUSTED:
            return reason
        if self.registry_error is not None:
            return f"the registry is unavailable: {self.registry_error}"
        if not any(p.ok for p in self.probes.values()):
            return f"no READY source of {key} was found"
        return reason


class Evaluator:
    """Runs evaluation rounds for one load of ``identity``, recording into ``evaluation``."""

    def __init__(
        self, config: EvaluationSettings, identity: ModelIdentity, log: Any, serving_as: str | None = None
    ) -> None:
        self.config = config
        self.identity = identity
        self.log = log
        self.evaluation = Evaluation()
        #: the source id the load's own target is served as (a republishing load): never a candidate
        self.serving_as = serving_as

    async def round(self, found: Found) -> None:
        """List the sources and probe them, handing each usable candidate to ``found``."""
        config = self.config
        registry = config.registry
        began = anyio.current_time()
        records: list[SourceRecord] = []
        if registry is not None:
            listed = await registry_call(
                self.log,
                lambda: registry.list(self.identity.key, SourceState.READY),
                "evaluate.registry_unavailable",
            )
            if isinstance(listed, RegistryError):
                self.evaluation.registry_error = listed
            else:
                records = [r for r in listed if r.source_id != self.serving_as]
        limiter = anyio.CapacityLimiter(config.probe_concurrency)
        known = getattr(config.prober, "probe_known", None)
        async with anyio.create_task_group() as tg:
            for record in records:
                candidate = known(record) if known is not None else None
                if candidate is not None:  # its manifest is parsed already: no I/O, no task
                    self.probed(record, candidate, 0.0, found)
                else:
                    tg.start_soon(self.probe_one, record, limiter, found)
        self.evaluation.finished_at = anyio.current_time()
        self.log.info(
            "evaluate.done",
            candidates=len(records),
            usable=sum(p.ok for p in self.evaluation.probes.values()),
            seconds=round(self.evaluation.finished_at - began, 4),
        )

    async def probe_one(self, record: SourceRecord, limiter: anyio.CapacityLimiter, found: Found) -> None:
        prober = self.config.prober
        assert prober is not None  # a peer strategy without a prober is refused at construction
        timeout = self.config.probe_timeout
        async with limiter:
            began = anyio.current_time()
            result: Candidate | ProbeFailure | None = None
            try:
                with anyio.move_on_after(timeout):
                    try:
                        result = await prober.probe(record)
                    except (RegistryError, ManifestError, OSError) as exc:
                        result = ProbeFailure(record.source_id, f"probe failed: {exc}")
            except anyio.get_cancelled_exc_class():
                seconds = anyio.current_time() - began
                self.evaluation.probes[record.source_id] = ProbeRecord(
                    record.source_id, False, seconds, "not finished when the load ended"
                )
                raise
            seconds = anyio.current_time() - began
            if result is None:
                result = ProbeFailure(record.source_id, f"probe timed out after {timeout:.3g}s")
            self.probed(record, result, seconds, found)

    def probed(
        self,
        record: SourceRecord,
        result: Candidate | ProbeFailure,
        seconds: float,
        found: Found,
    ) -> None:
        """Record one probe's result and hand a candidate to the driver."""
        if isinstance(result, ProbeFailure):
            probe = ProbeRecord(record.source_id, False, seconds, result.detail)
            self.log.info("probe.failed", source=record.source_id, detail=result.detail)
        else:
            probe = ProbeRecord(record.source_id, True, seconds)
        # recorded before the candidate is handed over: the load may end
        # (and cancel the probing task) as soon as the driver sees it
        self.evaluation.probes[record.source_id] = probe
        for observer in self.config.observers:
            observer.probe_done(probe)
        if isinstance(result, Candidate):
            if result.manifest is not None:
                key = result.manifest.content_key
                seen = self.evaluation.manifests.setdefault(key, [])
                if record.source_id not in seen:
                    seen.append(record.source_id)
            found(result)
