"""The load pipeline: discover -> evaluate (concurrently) -> attempt -> report.

This is the only module that drives I/O on the orchestrator's behalf; every
decision it carries out comes from pure code (:class:`~mx_orchestrator.plan.Planner`,
:class:`~mx_orchestrator.policy.Policy`, the selection key). It runs on anyio,
so under asyncio and trio alike.

Evaluation runs in the background for the whole load: the first attempt starts
as soon as one candidate is known, while slower probes continue (the
happy-eyeballs shape). Each attempt runs under its own deadline, enforced here
by cancellation, so a wedged strategy ends as ``TimedOut``. When the caller
cancels, every task the load started is cancelled and awaited before the
cancellation propagates.
"""

from __future__ import annotations

import contextlib
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import structlog
from anyio.streams.memory import MemoryObjectSendStream

from .errors import ConfigError, ManifestError, RegistryError
from .models import Candidate, ModelIdentity, SourceState
from .outcomes import Cancelled, LocalFailure, Outcome, TimedOut
from .plan import EXHAUSTED, Attempt, Done, Planner, StrategySlot, Wait
from .policy import DEFAULT_POLICY, Action, DecisionState, Policy
from .registry.base import SourceRegistry
from .report import AttemptRecord, LoadReport, ProbeRecord
from .selection import SelectionPolicy, rendezvous
from .strategy import AttemptContext, ProbeFailure, Prober, ProgressCallback, RegistryProber, Strategy

__all__ = ["LoadObserver", "Orchestrator"]

_log = structlog.get_logger("mx_orchestrator")

# How long carrying out an action against the registry may take; a registry
# outage must not stall (or crash) a load that already has its candidates.
_REGISTRY_CALL_TIMEOUT = 2.0


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


@dataclass
class _Evaluation:
    probes: list[ProbeRecord]
    finished_at: float | None = None


class Orchestrator:
    """Loads one model from the best source available.

    >>> orchestrator = Orchestrator(registry, [RdmaRegion(), RdmaTensor(), HfDownload(...)])
    >>> report = await orchestrator.load(ModelIdentity("org/model"), target)

    ``rank_window``: once the first candidate is known, how long the first
    attempt waits for the remaining probes so that ranking, not probe speed,
    picks the source (0 starts at once).
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
    ) -> None:
        if not strategies:
            raise ConfigError("an orchestrator needs at least one strategy")
        names = [s.name for s in strategies]
        if len(set(names)) != len(names):
            raise ConfigError(f"strategy names must be unique, got {names}")
        if probe_concurrency < 1:
            raise ConfigError("probe_concurrency must be at least 1")
        if any(s.uses_peers for s in strategies) and registry is None and prober is None:
            raise ConfigError("peer strategies need a registry to find sources")
        self.registry = registry
        self.strategies = tuple(strategies)
        self.policy = policy
        self.selection = selection
        self.prober: Prober | None = prober or (RegistryProber(registry) if registry else None)
        self.probe_concurrency = probe_concurrency
        self.probe_timeout = probe_timeout
        self.attempt_timeout = attempt_timeout
        self.load_timeout = load_timeout
        self.rank_window = rank_window
        self.target_id = target_id or f"target-{uuid.uuid4().hex[:12]}"
        self.observers = tuple(observers)

    async def load(
        self,
        identity: ModelIdentity,
        target: Any = None,
        *,
        progress: ProgressCallback | None = None,
    ) -> LoadReport:
        run_id = uuid.uuid4().hex[:12]
        log = _log.bind(run_id=run_id, model=identity.key)
        started = anyio.current_time()
        load_deadline = started + self.load_timeout if self.load_timeout is not None else math.inf
        planner = Planner(
            [StrategySlot(s.name, s.uses_peers) for s in self.strategies],
            self.selection(self.target_id),
            max_attempts=self.policy.max_attempts,
        )
        evaluation = _Evaluation(probes=[])
        attempts: list[AttemptRecord] = []
        log.info("load.start", strategies=[s.name for s in self.strategies])

        send, receive = anyio.create_memory_object_stream[Candidate | None](math.inf)
        done: Done
        async with anyio.create_task_group() as tg:
            if any(s.uses_peers for s in self.strategies):
                tg.start_soon(self._evaluate, identity, send, evaluation, log)
            else:
                send.close()
                evaluation.finished_at = started
            try:
                done = await self._attempt_loop(
                    identity, target, planner, receive, attempts, load_deadline, run_id, progress, log
                )
            finally:
                tg.cancel_scope.cancel()
                receive.close()

        finished = anyio.current_time()
        if not done.loaded and not attempts and done.reason == EXHAUSTED:
            outage = next((p for p in evaluation.probes if p.source == "<registry>"), None)
            if outage is not None:
                done = Done(False, f"the registry is unavailable: {outage.detail}")
            elif not any(p.ok for p in evaluation.probes):
                done = Done(False, f"no READY source of {identity.key} was found")
        report = LoadReport(
            run_id=run_id,
            identity=identity,
            loaded=done.loaded,
            seconds=finished - started,
            evaluation_seconds=(evaluation.finished_at or finished) - started,
            attempts=attempts,
            probes=evaluation.probes,
            reason=done.reason,
        )
        log.info(
            "load.done",
            outcome=report.outcome,
            reason=done.reason,
            seconds=round(report.seconds, 4),
            attempts=len(attempts),
        )
        for observer in self.observers:
            observer.load_done(report)
        return report

    # -- evaluation -----------------------------------------------------------

    async def _evaluate(
        self,
        identity: ModelIdentity,
        send: MemoryObjectSendStream[Candidate | None],
        evaluation: _Evaluation,
        log: Any,
    ) -> None:
        assert self.prober is not None
        prober = self.prober
        async with send:
            started = anyio.current_time()
            records = []
            if self.registry is not None:
                try:
                    with anyio.fail_after(_REGISTRY_CALL_TIMEOUT):
                        records = await self.registry.list(identity.key, SourceState.READY)
                except (RegistryError, OSError, TimeoutError) as exc:
                    log.warning("evaluate.registry_unavailable", error=str(exc))
                    evaluation.probes.append(ProbeRecord("<registry>", False, 0.0, str(exc)))
            limiter = anyio.CapacityLimiter(self.probe_concurrency)

            async def probe_one(record: Any) -> None:
                async with limiter:
                    probe_started = anyio.current_time()
                    result: Candidate | ProbeFailure | None = None
                    try:
                        with anyio.move_on_after(self.probe_timeout):
                            try:
                                result = await prober.probe(record)
                            except (RegistryError, ManifestError, OSError) as exc:
                                result = ProbeFailure(record.source_id, f"probe failed: {exc}")
                    except anyio.get_cancelled_exc_class():
                        seconds = anyio.current_time() - probe_started
                        evaluation.probes.append(
                            ProbeRecord(record.source_id, False, seconds, "not finished when the load ended")
                        )
                        raise
                    seconds = anyio.current_time() - probe_started
                    if result is None:
                        result = ProbeFailure(
                            record.source_id, f"probe timed out after {self.probe_timeout:.3g}s"
                        )
                    if isinstance(result, ProbeFailure):
                        probe = ProbeRecord(record.source_id, False, seconds, result.detail)
                        log.info("probe.failed", source=record.source_id, detail=result.detail)
                    else:
                        probe = ProbeRecord(record.source_id, True, seconds)
                    # recorded before the candidate is handed over: the load may end
                    # (and cancel this task) as soon as the attempt loop sees it
                    evaluation.probes.append(probe)
                    for observer in self.observers:
                        observer.probe_done(probe)
                    if isinstance(result, Candidate):
                        with contextlib.suppress(anyio.BrokenResourceError):  # the load already ended
                            send.send_nowait(result)

            async with anyio.create_task_group() as tg:
                for record in records:
                    tg.start_soon(probe_one, record)
            evaluation.finished_at = anyio.current_time()
            log.info(
                "evaluate.done",
                candidates=len(records),
                usable=sum(p.ok for p in evaluation.probes),
                seconds=round(evaluation.finished_at - started, 4),
            )

    # -- attempts -------------------------------------------------------------

    async def _attempt_loop(
        self,
        identity: ModelIdentity,
        target: Any,
        planner: Planner,
        receive: Any,
        attempts: list[AttemptRecord],
        load_deadline: float,
        run_id: str,
        progress: ProgressCallback | None,
        log: Any,
    ) -> Done:
        first_try_at: dict[tuple[str, str | None], float] = {}
        ranked_window_used = False
        while True:
            self._drain(receive, planner)
            if not ranked_window_used and planner.candidates_known and planner.evaluating:
                # Happy eyeballs with a short grace: once one candidate is known,
                # give the other probes rank_window seconds so the first attempt
                # goes to the best-ranked source, not merely the fastest probe.
                ranked_window_used = True
                with anyio.move_on_after(min(self.rank_window, load_deadline - anyio.current_time())):
                    while planner.evaluating:
                        try:
                            candidate = await receive.receive()
                        except anyio.EndOfStream:
                            planner.evaluation_finished()
                        else:
                            if candidate is not None:
                                planner.add_candidate(candidate)
            step = planner.next_step()
            if isinstance(step, Done):
                return step
            if isinstance(step, Wait):
                with anyio.move_on_after(load_deadline - anyio.current_time()):
                    try:
                        candidate = await receive.receive()
                        if candidate is not None:
                            planner.add_candidate(candidate)
                    except anyio.EndOfStream:
                        planner.evaluation_finished()
                    continue
                return Done(False, "load deadline passed while waiting for candidates")
            assert isinstance(step, Attempt)
            if step.delay > 0:
                await anyio.sleep(min(step.delay, max(0.0, load_deadline - anyio.current_time())))
            key = (step.strategy, step.source_id)
            first_try_at.setdefault(key, anyio.current_time())
            outcome = await self._run_attempt(identity, target, step, load_deadline, run_id, progress, log)
            state = DecisionState(
                attempt_number=step.attempt_number,
                attempts_total=planner.attempts_total + 1,
                elapsed=anyio.current_time() - first_try_at[key],
            )
            action = self.policy.decide(outcome, state)
            marked = await self._carry_out(action, step, outcome, log)
            planner.record(action)
            record = AttemptRecord(outcome, action, marked, step.attempt_number)
            attempts.append(record)
            log.info(
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
            for observer in self.observers:
                observer.attempt_done(record)

    @staticmethod
    def _drain(receive: Any, planner: Planner) -> None:
        while planner.evaluating:
            try:
                candidate = receive.receive_nowait()
            except anyio.WouldBlock:
                return
            except anyio.EndOfStream:
                planner.evaluation_finished()
                return
            if candidate is not None:
                planner.add_candidate(candidate)

    async def _run_attempt(
        self,
        identity: ModelIdentity,
        target: Any,
        step: Attempt,
        load_deadline: float,
        run_id: str,
        progress: ProgressCallback | None,
        log: Any,
    ) -> Outcome:
        strategy = self.strategies[step.strategy_index]
        began = anyio.current_time()
        deadline = min(began + self.attempt_timeout, load_deadline)
        ctx = AttemptContext(
            identity=identity,
            target=target,
            candidate=step.candidate,
            deadline=deadline,
            attempt_number=step.attempt_number,
            run_id=run_id,
            registry=self.registry,
            progress=progress,
        )
        log.debug("attempt.start", strategy=strategy.name, source=step.source_id)
        for observer in self.observers:
            observer.attempt_start(strategy.name, step.source_id)
        outcome: Outcome | None = None
        counted = await self._count_reader(step, +1, log)
        try:
            outcome = await self._attempt_within(strategy, ctx, deadline - began, step, log)
        finally:
            if counted:
                with anyio.CancelScope(shield=True):
                    await self._count_reader(step, -1, log)
        if outcome is not None:
            return outcome
        seconds = anyio.current_time() - began
        if deadline >= load_deadline:
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
            deadline=self.attempt_timeout,
            detail=f"no completion within the attempt deadline of {self.attempt_timeout:.3g}s",
        )

    async def _count_reader(self, step: Attempt, delta: int, log: Any) -> bool:
        """Best-effort reader accounting for least-loaded selection; never fails an attempt."""
        if step.candidate is None or self.registry is None:
            return False
        record = step.candidate.record
        try:
            with anyio.fail_after(0.5):
                await self.registry.add_load(record.source_id, record.generation, delta)
        except (RegistryError, OSError, TimeoutError) as exc:
            log.debug("source.load_accounting_failed", source=record.source_id, error=str(exc))
            return False
        return True

    async def _attempt_within(
        self, strategy: Strategy, ctx: AttemptContext, budget: float, step: Attempt, log: Any
    ) -> Outcome | None:
        """The strategy's outcome, or ``None`` when ``budget`` ran out first."""
        began = anyio.current_time()
        outcome: Outcome | None = None
        with anyio.move_on_after(budget):
            try:
                outcome = await strategy.attempt(ctx)
            except Exception as exc:  # a buggy strategy must not take the load down
                log.exception("attempt.strategy_raised", strategy=strategy.name)
                outcome = LocalFailure(
                    strategy=strategy.name,
                    source_id=step.source_id,
                    seconds=anyio.current_time() - began,
                    detail=f"strategy raised {type(exc).__name__}: {exc}",
                )
        return outcome

    async def _carry_out(self, action: Action, step: Attempt, outcome: Outcome, log: Any) -> bool:
        """Apply the action's side effects on the registry; True when the source was marked STALE."""
        wanted = action.mark_stale or action.report_unreachable
        if not wanted or step.candidate is None or self.registry is None:
            return False
        record = step.candidate.record
        reason = f"{outcome.name}: {outcome.detail}"[:500]
        try:
            with anyio.fail_after(_REGISTRY_CALL_TIMEOUT):
                if action.mark_stale:
                    marked = await self.registry.mark_stale(
                        record.source_id, record.generation, reason=reason, reporter=self.target_id
                    )
                else:
                    marked = await self.registry.report_unreachable(
                        record.source_id, record.generation, reason=reason, reporter=self.target_id
                    )
        except (RegistryError, OSError, TimeoutError) as exc:
            log.warning("source.mark_stale_failed", source=record.source_id, error=str(exc))
            return False
        if marked:
            log.warning("source.marked_stale", source=record.source_id, reason=reason)
        return marked
