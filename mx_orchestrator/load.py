"""The load driver: the one loop that carries out what the pure core decides, for every load.

Theory of operation. A load is a set of *parts* (runs of whole tensors, see
:mod:`~mx_orchestrator.parts`). ``stripe`` workers (one more with hedging) take
(strategy, source) *sessions* from the pure :class:`~mx_orchestrator.plan.Planner`:

1. a part-capable strategy (:class:`~mx_orchestrator.peer.PartCapable`) is
   checked (pure, 0 bytes), leased (a refusal is ``SourceBusy``: capacity, never
   a fault), connected, and only then is the target allocated, once per load,
   for the first source that answered (or the pinned content); a source of
   other content is a ``ManifestMismatch`` (:mod:`~mx_orchestrator.partreads`).
   The session then reads part after part until the model is in or the source
   is out of the load;
2. a strategy that reads the whole model (the Hub, ``cuda_ipc``, a third
   party's) is one attempt, run alone (the planner sees to it).

``--stripe 1`` is one worker: the model still arrives in parts (large ones
first), so a source lost at 90 % costs only the part in flight. Each part has
its own deadline (:class:`~mx_orchestrator.parts.PartTimes`, never over its even
share of what is left of the load's). An idle session hedges a part in flight
for twice its expected time; the extra worker joins, on another source, only
once a part in flight is a stall by the policy's evidence.

Every outcome goes through :meth:`LoadRun.settle`, the one place that asks the
policy, carries out its registry action and builds the attempt record, once.
Time is anyio's clock throughout (``VirtualClockLoop`` tests run the driver on
virtual time). When the caller cancels, every task is cancelled and awaited,
and every lease, connection and registration released.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import replace
from typing import Any

import anyio
import structlog

from .evaluation import Evaluator
from .holdings import Holdings
from .models import Candidate, ModelIdentity
from .outcomes import Corrupt, Loaded, LocalFailure, Outcome, Superseded, out_of_time
from .partreads import PartReads
from .parts import Part
from .peer import PartCapable, PartConnection
from .plan import Attempt, Done, Planner, Relist, Requeue, StrategySlot, Wait, attempt_budget
from .policy import Action, ActionKind, DecisionState
from .pullplan import PullPlan
from .report import AttemptRecord, LoadReport, attempt_started
from .settings import LoadSettings
from .sourcing import SourceAccounting
from .strategy import AttemptContext, Phases, ProgressCallback, Strategy, attempt_safely
from .target import Target

__all__ = ["LoadRun"]

_log = structlog.get_logger("mx_orchestrator")


class LoadRun:
    """One load of ``identity`` into ``target``; :meth:`run` returns its report."""

    def __init__(
        self,
        config: LoadSettings,
        identity: ModelIdentity,
        target: Any,
        progress: ProgressCallback | None,
        holdings: Holdings | None = None,
    ) -> None:
        self.config = config
        self.policy = config.policy
        self.identity = identity
        self.target = target
        self.progress = progress
        self.run_id = uuid.uuid4().hex[:12]
        self.log = _log.bind(run_id=self.run_id, model=identity.key)
        self.started = anyio.current_time()
        self.deadline = self.started + config.load_timeout if config.load_timeout is not None else math.inf
        self.evaluator = Evaluator(config, identity, self.log, holdings.served_as if holdings else None)
        slots = [StrategySlot(s.name, s.uses_peers, isinstance(s, PartCapable)) for s in config.strategies]
        self.planner = Planner.of(slots, config.selection(config.target_id), config.policy, config.stripe)
        self.attempts: list[AttemptRecord] = []
        self.done: Done | None = None
        self.changed = anyio.Event()
        #: sessions in progress; attempts toward the policy's bound (not landed parts nor refusals)
        self.sessions = self.counted = 0
        #: the hops of the source a whole-model attempt loaded from
        self.whole_hops: int | None = None
        self.empty_before = isinstance(target, Target) and target.buffers is None
        self.reads = PartReads(target, config, progress, holdings) if isinstance(target, Target) else None
        self.registry: SourceAccounting
        self.workers: anyio.abc.TaskGroup
        self.tasks: anyio.abc.TaskGroup

    def remaining(self) -> float:
        return max(0.0, self.deadline - anyio.current_time())

    def notify(self) -> None:
        self.changed.set()
        self.changed = anyio.Event()

    async def wait_for_change(self, until: float = math.inf) -> None:
        event = self.changed
        with anyio.move_on_after(max(0.0, min(until, self.deadline) - anyio.current_time())):
            await event.wait()

    def conclude(self, done: Done) -> None:
        """The load is decided: stop every worker (their sessions' leases go back together)."""
        if self.done is None:
            self.done = done
            self.registry.ending = True
            self.workers.cancel_scope.cancel()

    # -- the load ---------------------------------------------------------------------

    async def run(self) -> LoadReport:
        config = self.config
        self.log.info("load.start", strategies=[s.name for s in config.strategies], stripe=config.stripe)
        try:
            async with anyio.create_task_group() as tg:
                self.tasks = tg
                self.registry = SourceAccounting(config, f"{config.target_id}/{self.run_id}", self.log, tg)
                if config.uses_peers:
                    tg.start_soon(self.evaluate)
                else:
                    self.planner.evaluation_finished()
                    self.evaluator.evaluation.finished_at = self.started
                try:
                    await self.drive()
                finally:
                    tg.cancel_scope.cancel()
                    with anyio.CancelScope(shield=True):
                        await self.registry.give_back_together()
        finally:
            if self.reads is not None:
                self.reads.close()
            if self.empty_before and not (self.done and self.done.loaded):
                self.target.release()  # the next load shapes it anew
        assert self.done is not None
        return self.report(self.done)

    async def evaluate(self) -> None:
        """One evaluation round; its candidates go to the planner as they are found."""
        await self.evaluator.round(self.found)
        self.planner.evaluation_finished()
        self.notify()

    def found(self, candidate: Candidate) -> None:
        self.planner.add_candidate(candidate)
        self.notify()

    async def drive(self) -> None:
        planner = self.planner
        # the rank window: once one candidate is known, the other probes get ``rank_window``
        # seconds, so ranking, not probe speed, picks the first source (happy eyeballs)
        while not planner.candidates_known and planner.evaluating and self.remaining() > 0:
            await self.wait_for_change()
        if planner.candidates_known and planner.evaluating:
            with anyio.move_on_after(min(self.config.rank_window, self.remaining())):
                while planner.evaluating:
                    await self.wait_for_change()
        async with anyio.create_task_group() as tg:
            self.workers = tg
            for _ in range(self.config.stripe + (1 if self.config.hedge else 0)):
                tg.start_soon(self.worker)

    async def worker(self) -> None:
        """Take steps from the planner until the load is decided; ``stripe`` sessions at a time,
        one more only to take over a stalled part (see the module docstring)."""
        while self.done is None:
            now = anyio.current_time()
            if self.remaining() <= 0:
                if self.sessions:  # they end at the deadline too, each with its own outcome
                    await self.changed.wait()
                    continue
                waiting = "load deadline passed while waiting for candidates"
                self.conclude(Done(False, "the load's overall deadline passed" if self.attempts else waiting))
                return
            if self.sessions >= self.config.stripe:
                due = self.reads.stall_due() if self.reads is not None else math.inf
                if due > now:
                    await self.wait_for_change(due)
                    continue
            step = self.planner.next_step(now)
            if isinstance(step, Done):
                self.conclude(step)
            elif isinstance(step, Requeue):
                await self.capacity_wait(step)
            elif isinstance(step, Relist):
                self.tasks.start_soon(self.evaluate)
            elif isinstance(step, Wait):
                await self.wait_for_change(step.until)
            else:
                await self.session(step)

    async def capacity_wait(self, step: Requeue) -> None:
        """Every usable source was full: wait, then list and probe again (finds new sources too)."""
        self.log.info("load.capacity_wait", seconds=round(step.delay, 4), wait=step.wait_number)
        await anyio.sleep(min(step.delay, self.remaining()))
        self.planner.requeue()
        self.tasks.start_soon(self.evaluate)

    # -- sessions -------------------------------------------------------------------------

    def context(self, attempt: Attempt, deadline: float, phases: Phases, *, whole: bool) -> AttemptContext:
        return AttemptContext(
            self.identity,
            self.target,
            attempt.candidate,
            min(deadline, self.deadline),
            attempt.attempt_number,
            self.run_id,
            self.config.registry,
            self.progress if whole else None,
            phases,
            self.config.expect,
        )

    def budget(self) -> float:
        """Seconds for the next attempt: its timeout, or its even share of the load's deadline."""
        return attempt_budget(self.remaining(), self.planner.attempts_left(), self.config.attempt_timeout)

    async def session(self, attempt: Attempt) -> None:
        strategy = self.config.strategies[attempt.strategy_index]
        if attempt.delay > 0:
            await anyio.sleep(min(attempt.delay, self.remaining()))
        self.sessions += 1
        try:
            if isinstance(strategy, PartCapable) and self.reads is not None:
                await self.read_from(attempt, strategy, self.reads)
            else:
                await self.whole(attempt, strategy)
        finally:
            self.sessions -= 1
            self.notify()

    async def whole(self, attempt: Attempt, strategy: Strategy) -> None:
        """One attempt that reads the whole model (the Hub, ``cuda_ipc``, a third party's strategy)."""
        target = self.target
        if self.reads is not None and self.reads.planner is not None and not strategy.uses_peers:
            self.reads.forget(release=self.empty_before)  # the Hub shapes the target itself
        began = anyio.current_time()
        budget = self.budget()
        phases = Phases()
        ctx = self.context(attempt, began + budget, phases, whole=True)
        empty_before = isinstance(target, Target) and target.buffers is None
        attempt_started(self.log, self.config.observers, strategy.name, attempt.source_id)
        outcome: Outcome | None = None
        try:
            async with self.registry.lease(attempt) as leased:
                if leased is False:
                    outcome = self.registry.refusal(strategy.name, attempt)
                else:
                    with anyio.move_on_after(ctx.deadline - began):
                        outcome = await attempt_safely(strategy, ctx, self.log)
        finally:
            if empty_before and not isinstance(outcome, Loaded):
                target.release()
        wall, over = anyio.current_time() - began, anyio.current_time() >= self.deadline
        outcome = outcome or out_of_time(
            strategy.name, attempt.source_id, wall, budget, phases.planned_bytes, over=over
        )
        part = None
        if isinstance(outcome, Loaded):  # the whole model as one part
            part = Part(0, 0, 0, 0, target.nbytes if isinstance(target, Target) else outcome.bytes_moved)
            self.whole_hops = attempt.candidate.record.hops if attempt.candidate is not None else None
        landed = ((0, part.end),) if part is not None else ()
        await self.settle(attempt, outcome, phases, wall, part, landed, ends_session=True)

    async def read_from(self, attempt: Attempt, strategy: PartCapable, reads: PartReads) -> None:
        """A session on one source; an outcome before its parts (a refusal, a failed connect) ends it."""
        began, phases = anyio.current_time(), Phases()
        ctx = self.context(attempt, began + self.budget(), phases, whole=False)
        try:
            outcome = await self.open_and_read(attempt, strategy, reads, ctx)
        except Exception as exc:  # a buggy part-capable strategy must not take the load down
            self.log.exception("attempt.strategy_raised", strategy=strategy.name)
            outcome = LocalFailure(
                strategy=strategy.name, source_id=attempt.source_id, detail=f"raised {exc!r}"
            )
        if outcome is not None:
            await self.settle(attempt, outcome, phases, anyio.current_time() - began, ends_session=True)

    async def open_and_read(
        self, attempt: Attempt, strategy: PartCapable, reads: PartReads, ctx: AttemptContext
    ) -> Outcome | None:
        """Check, lease, connect, then (once per load) allocate, then read parts."""
        plan = reads.check(strategy, ctx)
        if not isinstance(plan, PullPlan):
            return plan
        began = anyio.current_time()
        opened: PartConnection | Outcome | None = None
        with anyio.move_on_after(ctx.deadline - began):  # local and cheap: before any registry write
            opened = await strategy.open(plan, ctx, reads.registrations)
        if not isinstance(opened, PartConnection):
            wall = anyio.current_time() - began
            return opened or out_of_time(strategy.name, attempt.source_id, wall, wall, 0, over=False)
        try:
            async with self.registry.lease(attempt) as leased:
                if leased is False:
                    return self.registry.refusal(strategy.name, attempt)
                self.planner.admitted(attempt)
                self.notify()  # the next session may start (one lease is asked at a time)
                ready = await reads.allocate_for(plan, strategy, ctx)
                if not isinstance(ready, PullPlan):
                    return ready
                await self.read_parts(attempt, strategy, ready, opened, reads)
                return None
        finally:
            reads.unsee(attempt.source_id)
            opened.close()

    async def read_parts(
        self,
        attempt: Attempt,
        strategy: PartCapable,
        plan: PullPlan,
        connection: PartConnection,
        reads: PartReads,
    ) -> None:
        """Part after part from one source, until the model is in or the source is out of the load."""
        parts = reads.planner
        assert parts is not None and attempt.candidate is not None
        sid, number, hedging = attempt.candidate.source_id, attempt.attempt_number, self.config.hedge
        while self.done is None:
            if parts.done:
                reads.teach(self.config.learned)
                self.conclude(Done(True, "loaded"))
                return
            agreed = reads.agrees(plan, strategy.name, sid)  # the load's content may have changed
            if not isinstance(agreed, PullPlan):
                await self.settle(attempt, agreed, Phases(), 0.0, ends_session=True)
                return
            reads.adopt(plan)
            if parts.stuck:
                self.conclude(Done(False, f"part attempt limit {parts.max_attempts} reached"))
                return
            ask = self.context(attempt, self.deadline, Phases(), whole=False)
            step = await reads.next_part(connection, plan, ask, strategy.name, hedging, self.notify)
            if not isinstance(step, (Part, float)):  # no answer, or a partial source without our parts
                await self.settle(attempt, step, Phases(), 0.0, ends_session=True)
                return
            if not isinstance(step, Part):
                await self.wait_for_change(step)
                continue
            now, part, times = anyio.current_time(), step, reads.times()
            self.notify()  # a part in flight: the others' hedge times start now
            numbered = replace(attempt, attempt_number=number)
            budget = times.budget(part, self.budget())
            phases = Phases()
            ctx = self.context(numbered, now + budget, phases, whole=False)
            attempt_started(self.log, self.config.observers, strategy.name, sid)
            hops = attempt.candidate.record.hops
            outcome = await reads.read(part, ctx, budget, strategy.name, plan, connection, hops, now)
            if isinstance(outcome, Corrupt):  # the content this load reads may be a liar's
                self.planner.reconsider(reads.discredit(plan.source))
            wall = anyio.current_time() - now
            landed = reads.landed(part, outcome, plan)
            action = await self.settle(numbered, outcome, phases, wall, part, landed, ends_session=None)
            if action.kind is ActionKind.FINISH:
                number = 1
            elif action.kind is ActionKind.RETRY:
                number += 1
                await anyio.sleep(min(action.delay, self.remaining()))
            else:
                return

    # -- outcomes -------------------------------------------------------------------------

    async def settle(
        self,
        attempt: Attempt,
        outcome: Outcome,
        phases: Phases,
        wall: float,
        part: Part | None = None,
        landed: tuple[tuple[int, int], ...] = (),
        *,
        ends_session: bool | None,
    ) -> Action:
        """The one place an outcome is decided: the policy's action, its registry side effect, the
        attempt record (built complete, once), the log, the observers, and the planner when the
        outcome ends the session (``None``: unless the action is to read on, FINISH or RETRY)."""
        state = DecisionState(
            attempt_number=attempt.attempt_number,
            attempts_total=self.counted + 1,
            elapsed=self.planner.decision_state(anyio.current_time(), attempt).elapsed,
        )
        action = self.policy.decide(outcome, state)
        progress = isinstance(outcome, Loaded) or (part is not None and isinstance(outcome, Superseded))
        if action.counted and not progress:
            self.counted += 1
        marked = await self.registry.carry_out(action, attempt, outcome)
        record = AttemptRecord.of_part(
            outcome, action, marked, attempt.attempt_number, wall, phases, part, landed
        )
        self.attempts.append(record)
        self.log.info("attempt.done", **record.log_fields())
        for observer in self.config.observers:
            observer.attempt_done(record)
        if ends_session is None:
            ends_session = action.kind not in (ActionKind.FINISH, ActionKind.RETRY)
        if ends_session:
            self.planner.record(action, attempt)
            if self.planner.done is not None:
                self.conclude(self.planner.done)
        self.notify()
        return action

    # -- the report -----------------------------------------------------------------------

    def report(self, done: Done) -> LoadReport:
        finished = anyio.current_time()
        evaluation = self.evaluator.evaluation
        reason = evaluation.explain(done.reason, tried=bool(self.attempts), key=self.identity.key)
        spread, hops = self.reads.delivery() if self.reads is not None else (None, None)
        if done.loaded and spread is None:  # a whole-model attempt delivered it
            spread = next(a.wall_seconds for a in reversed(self.attempts) if isinstance(a.outcome, Loaded))
            hops = self.whole_hops
        report = LoadReport(
            run_id=self.run_id,
            identity=self.identity,
            loaded=done.loaded,
            seconds=finished - self.started,
            evaluation_seconds=(evaluation.finished_at or finished) - self.started,
            attempts=self.attempts,
            probes=list(evaluation.probes.values()),
            reason=reason,
            registry_error=str(evaluation.registry_error) if evaluation.registry_error is not None else None,
            manifest_disagreement=dict(evaluation.manifests) if len(evaluation.manifests) > 1 else {},
            source_hops=hops if done.loaded else None,
            stripe=self.config.stripe,
            stripe_seconds=(spread or 0.0) if done.loaded else 0.0,
            capacity_waits=self.planner.capacity_waits_made,
            reports={"written": self.registry.reports_written, "skipped": self.registry.reports_skipped},
        )
        if report.manifest_disagreement:
            # not evidence of who is right (anyone who can write the registry can publish many
            # records): only a pin, the Hub or verified bytes decide; the operator should know
            self.log.warning("evaluate.manifests_disagree", manifests=report.manifest_disagreement)
        self.log.info("load.done", outcome=report.outcome, reason=reason, seconds=round(report.seconds, 4))
        for observer in self.config.observers:
            observer.load_done(report)
        return report
