"""The load pipeline: discover -> evaluate (concurrently) -> attempt -> report.

:class:`Orchestrator` is configuration plus :meth:`Orchestrator.load`; each
load is driven by a private :class:`_Load`, which holds everything that lives
for one load (identity, target, run id, deadline, planner, log, attempts,
evaluation). This module (with :mod:`~mx_orchestrator.striping`, its striped
half) is the only one that drives I/O on the orchestrator's behalf; every
decision it carries out comes from pure code
(:class:`~mx_orchestrator.plan.Planner`, :class:`~mx_orchestrator.policy.Policy`,
the selection key). It runs on anyio, so under asyncio and trio alike.

Evaluation runs in the background for the whole load: the first attempt starts
as soon as one candidate is known, while slower probes continue (the
happy-eyeballs shape). Each attempt runs under its own deadline, enforced here
by cancellation, so a wedged strategy ends as ``TimedOut``. When the caller
cancels, every task the load started is cancelled and awaited before the
cancellation propagates. The registry is called through one helper,
:meth:`_Load.registry_call`: bounded in time, its failures logged and returned,
never raised into the load.
"""

from __future__ import annotations

import contextlib
import math
import re
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .config import check_count, check_seconds
from .errors import ConfigError, ManifestError, RegistryError
from .manifests import ManifestCache
from .models import Candidate, ModelIdentity, SourceRecord, SourceState
from .outcomes import Cancelled, Loaded, LocalFailure, Outcome, SourceBusy, TimedOut
from .peer import PeerStrategy
from .plan import EXHAUSTED, Attempt, Done, Planner, Requeue, StrategySlot, Wait, attempt_budget
from .policy import DEFAULT_POLICY, Action, Policy
from .registry.base import SourceRegistry
from .report import AttemptRecord, LoadReport, ProbeRecord
from .selection import SelectionPolicy, rendezvous
from .strategy import AttemptContext, Phases, ProbeFailure, Prober, ProgressCallback, RegistryProber, Strategy
from .target import Target

__all__ = ["LoadObserver", "Orchestrator"]

_log = structlog.get_logger("mx_orchestrator")

T = TypeVar("T")

# How long one registry call may take; a registry outage must not stall (or
# crash) a load that already has its candidates.
_REGISTRY_CALL_TIMEOUT = 2.0
_PIN = re.compile(r"mxc1-[0-9a-f]{64}")
_READER_ACCOUNTING_TIMEOUT = 0.5


class LoadObserver:
    """Hooks for metrics and progress displays; every method is optional to override."""

    def probe_done(self, record: ProbeRecord) -> None:
        """Called once per evaluated candidate."""

    def attempt_start(self, strategy: str, source_id: str | None) -> None:
        """Called as each attempt begins."""

    def attempt_done(self, record: AttemptRecord) -> None:
        """Called once per finished attempt, after its action was carried out."""

    def load_done(self, report: LoadReport) -> None:
        """Called once per load."""


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
    once, and a failed part moves alone to another source (see
    :mod:`mx_orchestrator.striping`); 1 reads the whole model from one source
    at a time. ``hedge``: in a striped load, a part in flight for longer than
    its expected time is also asked of an idle source; the first to land wins.
    ``min_part_bytes``: the smallest part worth a transfer of its own.
    ``manifest_cache``: where parsed manifests are kept by key (default: the
    process's, so a second load fetches none).
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
        manifest_cache: ManifestCache | None = None,
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
        #: the best part rate (bytes/s) a striped load achieved so far: the next load's expected time
        self.observed_rate: float | None = None
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
        if expect is not None and not _PIN.fullmatch(expect):
            raise ConfigError(f"expect must be a content fingerprint (mxc1-<64 hex>), got {expect!r:.80}")
        self.target_id = target_id or f"target-{uuid.uuid4().hex[:12]}"
        self.observers = tuple(observers)
        self.expect = expect

    @property
    def uses_peers(self) -> bool:
        return any(s.uses_peers for s in self.strategies)

    async def load(
        self,
        identity: ModelIdentity,
        target: Any = None,
        *,
        progress: ProgressCallback | None = None,
    ) -> LoadReport:
        return await _Load(self, identity, target, progress).run()

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
        return self

    async def __aexit__(self, *exc: object) -> None:
        with anyio.CancelScope(shield=True):
            await self.aclose()


@dataclass
class _Evaluation:
    """What evaluation found: a probe record per candidate (its latest, when a capacity wait
    listed the sources again), and a registry outage if there was one."""

    probes: dict[str, ProbeRecord] = field(default_factory=dict)
    registry_error: RegistryError | None = None
    finished_at: float | None = None
    #: manifest fingerprint -> the candidates that published it (more than one key: they disagree)
    manifests: dict[str, list[str]] = field(default_factory=dict)


class _Load:
    """One load: per-load state and the driver that carries out what the pure core decides."""

    def __init__(
        self,
        config: Orchestrator,
        identity: ModelIdentity,
        target: Any,
        progress: ProgressCallback | None,
    ) -> None:
        self.config = config
        self.identity = identity
        self.target = target
        self.progress = progress
        self.run_id = uuid.uuid4().hex[:12]
        self.log = _log.bind(run_id=self.run_id, model=identity.key)
        self.started = anyio.current_time()
        self.deadline = self.started + config.load_timeout if config.load_timeout is not None else math.inf
        self.planner = Planner(
            [StrategySlot(s.name, s.uses_peers) for s in config.strategies],
            config.selection(config.target_id),
            max_attempts=config.policy.max_attempts,
            capacity_waits=config.policy.capacity_waits,
            capacity_delay=config.policy.capacity_delay,
        )
        self.evaluation = _Evaluation()
        self.attempts: list[AttemptRecord] = []
        self.source_hops: int | None = None
        #: the plan's strategy slot -> the orchestrator's strategy (a striped load hands a subset on)
        self.strategy_map: list[int] = list(range(len(config.strategies)))
        self.stripe_seconds = 0.0
        #: the load's own tasks (evaluation rounds); set by :meth:`run`
        self.tasks: anyio.abc.TaskGroup

    def remaining(self) -> float:
        return max(0.0, self.deadline - anyio.current_time())

    async def run(self) -> LoadReport:
        config = self.config
        self.log.info("load.start", strategies=[s.name for s in config.strategies])
        send, receive = anyio.create_memory_object_stream[Candidate](math.inf)
        done: Done
        async with anyio.create_task_group() as tg:
            self.tasks = tg
            if config.uses_peers:
                tg.start_soon(self.evaluate, send)
            else:
                send.close()
                self.evaluation.finished_at = self.started
            try:
                if config.stripe > 1 and any(isinstance(s, PeerStrategy) for s in config.strategies):
                    from .striping import StripedLoad

                    done = await StripedLoad(self, receive).run()
                else:
                    done = await self.attempt_loop(receive)
            finally:
                tg.cancel_scope.cancel()
                receive.close()
        return self.report(done)

    def report(self, done: Done) -> LoadReport:
        finished = anyio.current_time()
        evaluation = self.evaluation
        if not done.loaded and not self.attempts and done.reason == EXHAUSTED:
            if evaluation.registry_error is not None:
                done = Done(False, f"the registry is unavailable: {evaluation.registry_error}")
            elif not any(p.ok for p in evaluation.probes.values()):
                done = Done(False, f"no READY source of {self.identity.key} was found")
        report = LoadReport(
            run_id=self.run_id,
            identity=self.identity,
            loaded=done.loaded,
            seconds=finished - self.started,
            evaluation_seconds=(evaluation.finished_at or finished) - self.started,
            attempts=self.attempts,
            probes=list(evaluation.probes.values()),
            reason=done.reason,
            registry_error=str(evaluation.registry_error) if evaluation.registry_error is not None else None,
            manifest_disagreement=dict(evaluation.manifests) if len(evaluation.manifests) > 1 else {},
            source_hops=self.source_hops if done.loaded else None,
            stripe=self.config.stripe,
            stripe_seconds=self.stripe_seconds,
            capacity_waits=self.planner.capacity_waits_made,
        )
        if report.manifest_disagreement:
            # not evidence of who is right (anyone who can write the registry can publish many
            # records): only a pin, the Hub or verified bytes decide; the operator should know
            self.log.warning("evaluate.manifests_disagree", manifests=report.manifest_disagreement)
        self.log.info(
            "load.done",
            outcome=report.outcome,
            reason=done.reason,
            seconds=round(report.seconds, 4),
            attempts=len(self.attempts),
        )
        for observer in self.config.observers:
            observer.load_done(report)
        return report

    # -- the registry -----------------------------------------------------------

    async def registry_call(
        self,
        call: Callable[[], Awaitable[T]],
        event: str,
        *,
        within: float = _REGISTRY_CALL_TIMEOUT,
        **fields: Any,
    ) -> T | RegistryError:
        """``await call()`` within ``within`` seconds; a failure is logged as ``event`` and returned."""
        try:
            with anyio.fail_after(within):
                return await call()
        except (RegistryError, OSError, TimeoutError) as exc:
            error = exc if isinstance(exc, RegistryError) else RegistryError(str(exc) or type(exc).__name__)
            self.log.warning(event, error=str(error), **fields)
            return error

    # -- evaluation -------------------------------------------------------------

    async def evaluate(self, send: MemoryObjectSendStream[Candidate]) -> None:
        config = self.config
        registry = config.registry
        async with send:
            began = anyio.current_time()
            records: list[SourceRecord] = []
            if registry is not None:
                listed = await self.registry_call(
                    lambda: registry.list(self.identity.key, SourceState.READY),
                    "evaluate.registry_unavailable",
                )
                if isinstance(listed, RegistryError):
                    self.evaluation.registry_error = listed
                else:
                    records = listed
            limiter = anyio.CapacityLimiter(config.probe_concurrency)
            known = getattr(config.prober, "probe_known", None)
            async with anyio.create_task_group() as tg:
                for record in records:
                    candidate = known(record) if known is not None else None
                    if candidate is not None:  # its manifest is parsed already: no I/O, no task
                        self.probed(record, candidate, 0.0, send)
                    else:
                        tg.start_soon(self.probe_one, record, limiter, send)
            self.evaluation.finished_at = anyio.current_time()
            self.log.info(
                "evaluate.done",
                candidates=len(records),
                usable=sum(p.ok for p in self.evaluation.probes.values()),
                seconds=round(self.evaluation.finished_at - began, 4),
            )

    async def probe_one(
        self, record: SourceRecord, limiter: anyio.CapacityLimiter, send: MemoryObjectSendStream[Candidate]
    ) -> None:
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
            self.probed(record, result, seconds, send)

    def probed(
        self,
        record: SourceRecord,
        result: Candidate | ProbeFailure,
        seconds: float,
        send: MemoryObjectSendStream[Candidate],
    ) -> None:
        """Record one probe's result and hand a candidate to the attempt loop."""
        if isinstance(result, ProbeFailure):
            probe = ProbeRecord(record.source_id, False, seconds, result.detail)
            self.log.info("probe.failed", source=record.source_id, detail=result.detail)
        else:
            probe = ProbeRecord(record.source_id, True, seconds)
        # recorded before the candidate is handed over: the load may end
        # (and cancel the probing task) as soon as the attempt loop sees it
        self.evaluation.probes[record.source_id] = probe
        for observer in self.config.observers:
            observer.probe_done(probe)
        if isinstance(result, Candidate):
            if result.manifest is not None:
                key = result.manifest.manifest_fingerprint
                seen = self.evaluation.manifests.setdefault(key, [])
                if record.source_id not in seen:
                    seen.append(record.source_id)
            with contextlib.suppress(anyio.BrokenResourceError):  # the load already ended
                send.send_nowait(result)

    # -- taking in candidates ---------------------------------------------------

    def take(self, receive: MemoryObjectReceiveStream[Candidate], *, wait: bool) -> Awaitable[None] | None:
        """Hand every candidate found so far to the planner; with ``wait``, also an awaitable for the next."""
        while self.planner.evaluating:
            try:
                self.planner.add_candidate(receive.receive_nowait())
            except anyio.WouldBlock:
                break
            except anyio.EndOfStream:
                self.planner.evaluation_finished()
        return self._receive_one(receive) if wait and self.planner.evaluating else None

    async def _receive_one(self, receive: MemoryObjectReceiveStream[Candidate]) -> None:
        try:
            self.planner.add_candidate(await receive.receive())
        except anyio.EndOfStream:
            self.planner.evaluation_finished()

    async def rank_window(self, receive: MemoryObjectReceiveStream[Candidate]) -> None:
        """Happy eyeballs with a short grace: once one candidate is known, give the other probes
        ``rank_window`` seconds so the first attempt goes to the best-ranked source, not merely the
        fastest probe."""
        with anyio.move_on_after(min(self.config.rank_window, self.remaining())):
            while (next_one := self.take(receive, wait=True)) is not None:
                await next_one

    # -- attempts ---------------------------------------------------------------

    async def attempt_loop(self, receive: MemoryObjectReceiveStream[Candidate]) -> Done:
        window_used = False
        while True:
            self.take(receive, wait=False)
            if not window_used and self.planner.candidates_known and self.planner.evaluating:
                window_used = True
                await self.rank_window(receive)
            step = self.planner.next_step(anyio.current_time())
            if isinstance(step, Done):
                return step
            if isinstance(step, Requeue):
                receive = await self.wait_for_capacity(step, receive)
                continue
            if isinstance(step, Wait):
                next_one = self.take(receive, wait=True)
                if next_one is not None:
                    with anyio.move_on_after(self.remaining()) as scope:
                        await next_one
                    if scope.cancelled_caught:
                        return Done(False, "load deadline passed while waiting for candidates")
                continue
            assert isinstance(step, Attempt)
            if step.delay > 0:
                await anyio.sleep(min(step.delay, self.remaining()))
            began = anyio.current_time()
            phases = Phases()
            outcome = await self.run_attempt(step, phases)
            wall = anyio.current_time() - began
            action = self.config.policy.decide(outcome, self.planner.decision_state(anyio.current_time()))
            marked = await self.carry_out(action, step, outcome)
            self.planner.record(action)
            if isinstance(outcome, Loaded) and step.candidate is not None:
                self.source_hops = step.candidate.record.hops
            record = AttemptRecord(outcome, action, marked, step.attempt_number, wall, phases.as_dict())
            self.attempts.append(record)
            self.log.info(
                "attempt.done",
                strategy=step.strategy,
                source=step.source_id,
                outcome=outcome.name,
                bytes=outcome.bytes_moved,
                seconds=round(outcome.seconds, 4),
                action=action.label,
                marked_stale=marked,
                detail=outcome.detail,
            )
            for observer in self.config.observers:
                observer.attempt_done(record)

    async def wait_for_capacity(
        self, step: Requeue, receive: MemoryObjectReceiveStream[Candidate]
    ) -> MemoryObjectReceiveStream[Candidate]:
        """Every usable source was full: wait, then list and probe the sources again (sources
        republished meanwhile are found too); returns the new round's candidate stream."""
        self.log.info("load.capacity_wait", seconds=round(step.delay, 4), wait=step.wait_number)
        await anyio.sleep(min(step.delay, self.remaining()))
        receive.close()
        send, receive = anyio.create_memory_object_stream[Candidate](math.inf)
        self.planner.requeue()
        self.tasks.start_soon(self.evaluate, send)
        return receive

    async def run_attempt(self, step: Attempt, phases: Phases) -> Outcome:
        config = self.config
        strategy = config.strategies[self.strategy_map[step.strategy_index]]
        began = anyio.current_time()
        # the load's deadline is shared among the attempts it could still make
        budget = attempt_budget(self.deadline - began, self.planner.attempts_left(), config.attempt_timeout)
        deadline = min(began + budget, self.deadline)
        ctx = AttemptContext(
            identity=self.identity,
            target=self.target,
            candidate=step.candidate,
            deadline=deadline,
            attempt_number=step.attempt_number,
            run_id=self.run_id,
            registry=config.registry,
            progress=self.progress,
            phases=phases,
            expect=config.expect,
        )
        self.log.debug("attempt.start", strategy=strategy.name, source=step.source_id)
        for observer in config.observers:
            observer.attempt_start(strategy.name, step.source_id)
        outcome: Outcome | None = None
        # an attempt that fails must not leave its source's manifest shaping the target
        empty_before = isinstance(self.target, Target) and self.target.buffers is None
        leased = await self.lease_reader(step, config.reader_lease)
        if leased is False and step.candidate is not None:  # refused before any byte moved
            cap = step.candidate.record.max_readers
            return SourceBusy(
                strategy=strategy.name, source_id=step.source_id, detail=f"at its cap of {cap} readers"
            )
        try:
            async with anyio.create_task_group() as renewals:
                if leased:
                    renewals.start_soon(self.renew_lease, step)
                outcome = await self.attempt_within(strategy, ctx, deadline - began, step)
                renewals.cancel_scope.cancel()
        finally:
            if empty_before and not isinstance(outcome, Loaded):
                self.target.release()
            if leased is not None:
                with anyio.CancelScope(shield=True):
                    await self.lease_reader(step, None)
        if outcome is not None:
            return outcome
        seconds = anyio.current_time() - began
        if deadline >= self.deadline:
            return Cancelled(
                strategy=strategy.name,
                source_id=step.source_id,
                seconds=seconds,
                detail="the load's overall deadline passed during the attempt",
            )
        return TimedOut(
            strategy=strategy.name,
            source_id=step.source_id,
            seconds=seconds,
            deadline=deadline - began,
            planned_bytes=phases.planned_bytes,
            detail=f"no completion within the attempt deadline of {deadline - began:.3g}s",
        )

    async def lease_reader(self, step: Attempt, seconds: float | None) -> bool | None:
        """Take, renew or (``None``) give back this load's reader lease on the attempt's source.

        True: held; False: refused, the source is at its reader cap; ``None``: no
        registry to ask, or it failed (best effort: the attempt goes ahead). A
        target killed mid-read stops renewing and its lease runs out within
        ``reader_lease`` seconds.
        """
        registry = self.config.registry
        if step.candidate is None or registry is None:
            return None
        record = step.candidate.record
        reader = f"{self.config.target_id}/{self.run_id}"
        result = await self.registry_call(
            lambda: registry.lease_reader(record.source_id, record.generation, reader, seconds),
            "source.reader_lease_failed",
            within=_READER_ACCOUNTING_TIMEOUT,
            source=record.source_id,
        )
        return None if isinstance(result, RegistryError) else result

    async def renew_lease(self, step: Attempt) -> None:
        while True:
            await anyio.sleep(self.config.reader_lease / 3)
            await self.lease_reader(step, self.config.reader_lease)

    async def attempt_within(
        self, strategy: Strategy, ctx: AttemptContext, budget: float, step: Attempt
    ) -> Outcome | None:
        """The strategy's outcome, or ``None`` when ``budget`` ran out first."""
        began = anyio.current_time()
        outcome: Outcome | None = None
        with anyio.move_on_after(budget):
            try:
                outcome = await strategy.attempt(ctx)
            except Exception as exc:  # a buggy strategy must not take the load down
                self.log.exception("attempt.strategy_raised", strategy=strategy.name)
                outcome = LocalFailure(
                    strategy=strategy.name,
                    source_id=step.source_id,
                    seconds=anyio.current_time() - began,
                    detail=f"strategy raised {type(exc).__name__}: {exc}",
                )
        return outcome

    async def carry_out(self, action: Action, step: Attempt, outcome: Outcome) -> bool:
        """Apply the action's side effects on the registry; True when the source was marked STALE."""
        registry = self.config.registry
        wanted = action.mark_stale or action.report_unreachable
        if not wanted or step.candidate is None or registry is None:
            return False
        record = step.candidate.record
        reason = f"{outcome.name}: {outcome.detail}"[:500]
        reporter = self.config.target_id
        report = registry.mark_stale if action.mark_stale else registry.report_unreachable
        marked = await self.registry_call(
            lambda: report(record.source_id, record.generation, reason=reason, reporter=reporter),
            "source.mark_stale_failed",
            source=record.source_id,
        )
        if marked is True:
            self.log.warning("source.marked_stale", source=record.source_id, reason=reason)
            return True
        return False
