"""The load driver: the one loop that carries out what the pure core decides, for every load.

Theory of operation. A load is a set of *parts* (runs of whole tensors; see
:mod:`~mx_orchestrator.parts`). ``stripe`` workers, plus one more when hedging
is on, each take a (strategy, source) pair from the pure
:class:`~mx_orchestrator.plan.Planner` and carry it out as a *session*:

1. a part-capable strategy (:class:`~mx_orchestrator.peer.PartCapable`) is
   checked (pure, 0 bytes), the source's reader lease is taken (a refusal is
   ``SourceBusy``: capacity, never a fault), the source is connected, and only
   then is the target allocated, for the manifest of the first source that
   answered (or the pinned one: ``check`` refuses the rest), never for what a
   count of records says. A source whose content differs from what this load
   allocated is a ``ManifestMismatch`` before any byte moves: two revisions are
   never spliced. The session then reads part after part from the
   :class:`~mx_orchestrator.parts.PartPlanner` until the model is in or the
   source is out of the load;
2. a strategy that reads the whole model at once (the Hub, ``cuda_ipc``, a
   third party's) is one attempt, run alone (the planner sees to it).

``--stripe 1`` is one worker: the model still arrives in parts (large ones
first), so a source lost at 90 % costs only the part in flight. Every part
runs under its own deadline (the expected time from the best observed rate,
never under the policy's stall evidence, never over its even share of what is
left of the load's deadline). An idle session hedges a part in flight for twice
its expected time; the extra worker joins, on another source, only once a part
has been in flight for the policy's stall evidence. The first copy to land
wins; the other is cancelled and released before the winner is verified.

Every outcome goes through :meth:`LoadRun.settle`, the one place that asks the
policy, carries out its registry action and builds the attempt record,
complete, once. Time is anyio's clock throughout (``VirtualClockLoop`` tests
run the driver on virtual time); the registry is called through
:func:`~mx_orchestrator.evaluation.registry_call` only. When the caller
cancels, every task is cancelled and awaited, and every lease, connection and
registration released.
"""

from __future__ import annotations

import contextlib
import math
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any, Protocol

import anyio
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream

from .buffers import Buffers
from .evaluation import EvaluationSettings, Evaluator, registry_call
from .models import Candidate, ModelIdentity, content_difference
from .outcomes import (
    Cancelled,
    Corrupt,
    Loaded,
    LocalFailure,
    ManifestMismatch,
    Outcome,
    SourceBusy,
    Superseded,
    TimedOut,
)
from .parts import Part, PartPlanner, expected_seconds
from .peer import PartCapable, PartConnection, TargetRegistrations, allocate
from .plan import EXHAUSTED, Attempt, Done, Planner, Requeue, StrategySlot, Wait, attempt_budget
from .policy import Action, ActionKind, DecisionState, Policy
from .pullplan import PullPlan
from .report import AttemptRecord, LoadReport
from .selection import SelectionPolicy
from .strategy import AttemptContext, Phases, ProgressCallback, Strategy
from .target import Target

__all__ = ["HEDGE_FACTOR", "HEDGE_FLOOR", "PART_DEADLINE_FACTOR", "Learned", "LoadRun", "LoadSettings"]

_log = structlog.get_logger("mx_orchestrator")

#: a part in flight this many times its expected time is hedged by an idle session ...
HEDGE_FACTOR = 2.0
#: ... but never sooner than this (seconds): below it a hedge costs more than it saves
HEDGE_FLOOR = 0.2
#: a part's deadline: this many times its expected time (and never under the policy's stall evidence)
PART_DEADLINE_FACTOR = 4.0
_READER_ACCOUNTING_TIMEOUT = 0.5


@dataclass
class Learned:
    """What loads measured, for the loads after them (not configuration)."""

    #: the best part rate (bytes/s) a load achieved so far: the next load's expected part time
    part_rate: float | None = None


class LoadSettings(EvaluationSettings, Protocol):
    """What the driver reads of the orchestrator (:class:`~mx_orchestrator.pipeline.Orchestrator`)."""

    @property
    def strategies(self) -> tuple[Strategy, ...]: ...
    @property
    def policy(self) -> Policy: ...
    @property
    def selection(self) -> SelectionPolicy: ...
    @property
    def target_id(self) -> str: ...
    @property
    def stripe(self) -> int: ...
    @property
    def hedge(self) -> bool: ...
    @property
    def min_part_bytes(self) -> int: ...
    @property
    def attempt_timeout(self) -> float: ...
    @property
    def load_timeout(self) -> float | None: ...
    @property
    def rank_window(self) -> float: ...
    @property
    def reader_lease(self) -> float: ...
    @property
    def expect(self) -> str | None: ...
    @property
    def learned(self) -> Learned: ...
    @property
    def uses_peers(self) -> bool: ...


class LoadRun:
    """One load of ``identity`` into ``target``; :meth:`run` returns its report."""

    def __init__(
        self,
        config: LoadSettings,
        identity: ModelIdentity,
        target: Any,
        progress: ProgressCallback | None,
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
        self.evaluator = Evaluator(config, identity, self.log)
        self.planner = Planner(
            [StrategySlot(s.name, s.uses_peers, isinstance(s, PartCapable)) for s in config.strategies],
            config.selection(config.target_id),
            max_attempts=config.policy.max_attempts,
            capacity_waits=config.policy.capacity_waits,
            capacity_delay=config.policy.capacity_delay,
        )
        self.attempts: list[AttemptRecord] = []
        self.done: Done | None = None
        self.changed = anyio.Event()
        self.sessions = 0
        #: attempts that count toward the policy's bound: all but landed parts and capacity refusals
        self.counted = 0
        # -- the target and its parts (set once a session allocated, or found, the target's memory)
        self.empty_before = isinstance(target, Target) and target.buffers is None
        self.registrations = TargetRegistrations(target) if isinstance(target, Target) else None
        self.allocation = anyio.Lock()
        self.parts: PartPlanner | None = None
        #: the manifest of the source whose content this load reads (every part must agree with it)
        self.content: Any = None
        self.next_part_index = 0
        self.scopes: dict[int, anyio.CancelScope] = {}
        self.finished: dict[int, anyio.Event] = {}
        self.won: set[int] = set()
        self.rates: list[float] = []
        self.hops: list[int] = []
        self.first_part_at: float | None = None
        self.last_landing_at: float | None = None
        self.tasks: anyio.abc.TaskGroup
        self.workers: anyio.abc.TaskGroup

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
        """The load is decided: stop every worker (their sessions release what they hold)."""
        if self.done is None:
            self.done = done
            self.workers.cancel_scope.cancel()

    # -- the load -------------------------------------------------------------------

    async def run(self) -> LoadReport:
        config = self.config
        self.log.info("load.start", strategies=[s.name for s in config.strategies], stripe=config.stripe)
        send, receive = anyio.create_memory_object_stream[Candidate](math.inf)
        try:
            async with anyio.create_task_group() as tg:
                self.tasks = tg
                if config.uses_peers:
                    tg.start_soon(self.evaluator.round, send)
                    tg.start_soon(self.collect, receive)
                else:
                    send.close()
                    receive.close()
                    self.planner.evaluation_finished()
                    self.evaluator.evaluation.finished_at = self.started
                try:
                    await self.drive()
                finally:
                    tg.cancel_scope.cancel()
        finally:
            if self.registrations is not None:
                self.registrations.close()
            loaded = self.done is not None and self.done.loaded
            if self.empty_before and not loaded and isinstance(self.target, Target):
                self.target.release()  # the next load shapes it anew
        assert self.done is not None
        return self.report(self.done)

    async def collect(self, receive: MemoryObjectReceiveStream[Candidate]) -> None:
        """Hand the candidates of one evaluation round to the planner as they are found."""
        with receive:
            async for candidate in receive:
                self.planner.add_candidate(candidate)
                self.notify()
        self.planner.evaluation_finished()
        self.notify()

    async def drive(self) -> None:
        await self.rank_window()
        if self.done is None:
            workers = self.config.stripe + (1 if self.config.hedge else 0)
            async with anyio.create_task_group() as tg:
                self.workers = tg
                for _ in range(workers):
                    tg.start_soon(self.worker)
        if self.done is None:
            self.done = Done(False, "the load's overall deadline passed")

    async def rank_window(self) -> None:
        """Happy eyeballs with a short grace: once one candidate is known, give the other probes
        ``rank_window`` seconds so the first attempt goes to the best-ranked source, not merely the
        fastest probe."""
        planner = self.planner
        while not planner.candidates_known and planner.evaluating and self.remaining() > 0:
            await self.wait_for_change()
        if planner.candidates_known and planner.evaluating:
            with anyio.move_on_after(min(self.config.rank_window, self.remaining())):
                while planner.evaluating:
                    await self.wait_for_change()

    async def worker(self) -> None:
        while self.done is None:
            now = anyio.current_time()
            if self.remaining() <= 0:
                reason = "load deadline passed while waiting for candidates"
                self.conclude(
                    Done(False, reason if not self.attempts else "the load's overall deadline passed")
                )
                return
            if self.sessions >= self.config.stripe:  # the extra worker joins only on a stall
                due = self.parts.next_hedge_time("", self.stall_after) if self.parts is not None else math.inf
                if due > now:
                    await self.wait_for_change(due)
                    continue
            step = self.planner.next_step(now)
            if isinstance(step, Done):
                self.conclude(step)
                return
            if isinstance(step, Requeue):
                await self.capacity_wait(step)
            elif isinstance(step, Wait):
                await self.wait_for_change()
            else:
                await self.session(step)

    async def capacity_wait(self, step: Requeue) -> None:
        """Every usable source was full: wait, then list and probe the sources again (sources
        republished meanwhile are found too)."""
        self.log.info("load.capacity_wait", seconds=round(step.delay, 4), wait=step.wait_number)
        await anyio.sleep(min(step.delay, self.remaining()))
        send, receive = anyio.create_memory_object_stream[Candidate](math.inf)
        self.planner.requeue()
        self.tasks.start_soon(self.evaluator.round, send)
        self.tasks.start_soon(self.collect, receive)

    # -- sessions ---------------------------------------------------------------------

    def context(self, attempt: Attempt, deadline: float, phases: Phases, *, whole: bool) -> AttemptContext:
        return AttemptContext(
            identity=self.identity,
            target=self.target,
            candidate=attempt.candidate,
            deadline=deadline,
            attempt_number=attempt.attempt_number,
            run_id=self.run_id,
            registry=self.config.registry,
            progress=self.progress if whole else None,
            phases=phases,
            expect=self.config.expect,
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
            if isinstance(strategy, PartCapable) and isinstance(self.target, Target):
                await self.read_from(attempt, strategy)
            else:
                await self.whole(attempt, strategy)
        finally:
            self.sessions -= 1
            self.notify()

    async def whole(self, attempt: Attempt, strategy: Strategy) -> None:
        """One attempt that reads the whole model (the Hub, ``cuda_ipc``, a third party's strategy)."""
        if self.parts is not None and not strategy.uses_peers:
            self.forget_parts()  # the Hub reads everything again, into a target it shapes itself
        began = anyio.current_time()
        deadline = min(began + self.budget(), self.deadline)
        phases = Phases()
        ctx = self.context(attempt, deadline, phases, whole=True)
        target = self.target
        empty_before = isinstance(target, Target) and target.buffers is None
        self.observe_start(strategy.name, attempt.source_id)
        outcome: Outcome | None = None
        try:
            async with self.lease(attempt) as leased:
                if leased is False:
                    outcome = self.busy(strategy.name, attempt)
                else:
                    outcome = await self.attempt_within(strategy, ctx, deadline - began, attempt)
        finally:
            if empty_before and not isinstance(outcome, Loaded):
                target.release()
        wall = anyio.current_time() - began
        if outcome is None:
            outcome = self.deadline_outcome(strategy.name, attempt.source_id, wall, deadline - began, phases)
        part: Part | None = None
        if isinstance(outcome, Loaded):
            nbytes = target.nbytes if isinstance(target, Target) else outcome.bytes_moved
            part = Part(self.take_part_index(), 0, 0, 0, nbytes)
            self.first_part_at, self.last_landing_at = began, anyio.current_time()
            if attempt.candidate is not None:
                self.hops.append(attempt.candidate.record.hops)
        landed = ((0, part.end),) if part is not None else ()
        await self.settle(attempt, outcome, phases, wall, part, landed, ends_session=True)

    async def attempt_within(
        self, strategy: Strategy, ctx: AttemptContext, budget: float, attempt: Attempt
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
                    source_id=attempt.source_id,
                    seconds=anyio.current_time() - began,
                    detail=f"strategy raised {type(exc).__name__}: {exc}",
                )
        return outcome

    async def read_from(self, attempt: Attempt, strategy: PartCapable) -> None:
        """A session on one source: check, lease, connect, allocate (once per load), then parts."""
        began = anyio.current_time()
        budget = self.budget()
        phases = Phases()
        ctx = self.context(attempt, min(began + budget, self.deadline), phases, whole=False)
        plan = strategy.check_for(ctx)
        if isinstance(plan, PullPlan):
            plan = self.agrees(plan, strategy.name, ctx)
        if not isinstance(plan, PullPlan):
            await self.settle(attempt, plan, phases, anyio.current_time() - began, ends_session=True)
            return
        async with self.lease(attempt) as leased:
            if leased is False:
                busy = self.busy(strategy.name, attempt)
                await self.settle(attempt, busy, phases, 0.0, ends_session=True)
                return
            opened: PartConnection | Outcome | None = None
            assert self.registrations is not None
            with anyio.move_on_after(max(0.0, ctx.deadline - began)):
                opened = await strategy.open(plan, ctx, self.registrations)
            if not isinstance(opened, PartConnection):
                wall = anyio.current_time() - began
                outcome = opened or self.deadline_outcome(
                    strategy.name, attempt.source_id, wall, budget, phases
                )
                await self.settle(attempt, outcome, phases, wall, ends_session=True)
                return
            try:
                ready = await self.allocate_for(plan, strategy, ctx)
                if not isinstance(ready, PullPlan):
                    await self.settle(attempt, ready, phases, anyio.current_time() - began, ends_session=True)
                    return
                await self.read_parts(attempt, strategy, ready, opened)
            finally:
                opened.close()

    def agrees(self, plan: PullPlan, strategy: str, ctx: AttemptContext) -> PullPlan | Outcome:
        """``plan``, or a ``ManifestMismatch`` when its source's content differs from this load's."""
        if self.content is None:
            return plan
        differs = content_difference(plan.source, self.content)
        if differs is None:
            return plan
        return ManifestMismatch(
            strategy=strategy,
            source_id=ctx.source_id,
            detail=f"other content than this load reads (tensor {differs!r} differs): never mixed in",
        )

    async def allocate_for(
        self, plan: PullPlan, strategy: PartCapable, ctx: AttemptContext
    ) -> PullPlan | Outcome:
        """The plan against the target's real memory, allocating it (once per load) for this
        source, which answered; the first session to get here decides the load's content."""
        target = self.target
        assert isinstance(target, Target)
        async with self.allocation:
            if target.buffers is None:
                allocated = await allocate(plan, target, ctx, strategy.name)
                if not isinstance(allocated, Buffers):
                    return allocated
            elif plan.local_manifest is not target.manifest:
                replanned = strategy.check_for(ctx)  # planned before the memory existed: again, for it
                if not isinstance(replanned, PullPlan):
                    return replanned
                plan = replanned
            agreed = self.agrees(plan, strategy.name, ctx)
            if not isinstance(agreed, PullPlan):
                return agreed
            if self.parts is None:
                self.content = plan.source
                manifest = target.manifest
                assert manifest is not None
                self.parts = PartPlanner(
                    [spec.nbytes for spec in manifest.tensors],
                    self.config.stripe,
                    min_part_bytes=self.config.min_part_bytes,
                    max_attempts=self.policy.max_attempts,
                )
            return plan

    def forget_parts(self) -> None:
        """Drop this load's parts and the memory it allocated for them (a whole-model strategy next)."""
        self.parts, self.content = None, None
        if self.registrations is not None:
            self.registrations.close()
        if self.empty_before and isinstance(self.target, Target):
            self.target.release()

    async def read_parts(
        self, attempt: Attempt, strategy: PartCapable, plan: PullPlan, connection: PartConnection
    ) -> None:
        parts = self.parts
        assert parts is not None and attempt.source_id is not None
        sid = attempt.source_id
        number = attempt.attempt_number
        while self.done is None:
            if parts.done:
                self.finish_parts()
                return
            if parts.stuck:
                self.conclude(Done(False, f"part attempt limit {parts.max_attempts} reached"))
                return
            if self.remaining() <= 0:
                self.conclude(Done(False, "the load's overall deadline passed"))
                return
            now = anyio.current_time()
            part = parts.take(sid, now)
            if part is None and self.config.hedge:
                part = parts.hedge(sid, now, self.hedge_after)
            if part is None:
                until = parts.next_hedge_time(sid, self.hedge_after) if self.config.hedge else math.inf
                await self.wait_for_change(until)
                continue
            numbered = replace(attempt, attempt_number=number)
            outcome, phases, wall = await self.read_part(part, numbered, strategy, plan, connection)
            landed = tuple(parts.byte_runs(self.landed_tensors(part, outcome, plan)))
            action = await self.settle(numbered, outcome, phases, wall, part, landed, ends_session=None)
            if action.kind is ActionKind.FINISH:
                number = 1
            elif action.kind is ActionKind.RETRY:
                number += 1
                await anyio.sleep(min(action.delay, self.remaining()))
            else:
                return

    def landed_tensors(self, part: Part, outcome: Outcome, plan: PullPlan) -> list[int]:
        if isinstance(outcome, Loaded):
            return list(part.tensors)
        if isinstance(outcome, Corrupt):
            bad = set(outcome.bad_tensors)
            return [i for i in part.tensors if plan.local_manifest.tensors[i].name not in bad]
        return []

    def finish_parts(self) -> None:
        if self.first_part_at is not None and self.last_landing_at is not None and self.rates:
            best = max(self.rates)
            self.config.learned.part_rate = max(best, self.config.learned.part_rate or 0.0)
        self.conclude(Done(True, "loaded"))

    async def read_part(
        self, part: Part, attempt: Attempt, strategy: PartCapable, plan: PullPlan, connection: PartConnection
    ) -> tuple[Outcome, Phases, float]:
        """One part attempt: its outcome (a lost hedge race included), phases and wall time."""
        parts = self.parts
        assert parts is not None and attempt.candidate is not None
        began = anyio.current_time()
        if self.first_part_at is None:
            self.first_part_at = began
        budget = self.part_budget(part)
        phases = Phases()
        ctx = self.context(attempt, min(began + budget, self.deadline), phases, whole=False)
        self.observe_start(strategy.name, attempt.source_id)
        scope = anyio.CancelScope()
        self.scopes[part.index] = scope
        self.finished[part.index] = anyio.Event()
        names = [plan.local_manifest.tensors[i].name for i in part.tensors]
        outcome: Outcome | None = None
        try:
            with scope, anyio.move_on_after(budget + 1.0):  # the agent keeps the deadline; a backstop
                outcome = await connection.read(
                    plan.restricted(part.tensors), ctx, names, lambda: self.settle_twin(part)
                )
        finally:
            self.scopes.pop(part.index, None)
            self.finished.pop(part.index).set()
        wall = anyio.current_time() - began
        sid = attempt.source_id
        if outcome is None and scope.cancel_called:
            # its twin landed first: the hedge that lost did nothing wrong; the original that lost
            # was slower than another source with the same bytes (evidence of slowness, not a stall)
            parts.superseded(part)
            if part.hedge_of is not None:
                return (
                    Superseded(
                        strategy=strategy.name,
                        source_id=sid,
                        seconds=wall,
                        detail="the original landed first",
                    ),
                    phases,
                    wall,
                )
            lost = self.deadline_outcome(strategy.name, sid, wall, wall, phases, part.nbytes, slow=True)
            return (
                replace(lost, detail=f"superseded by a hedge after {wall:.3g}s without completing"),
                phases,
                wall,
            )
        if outcome is None:
            outcome = self.deadline_outcome(strategy.name, sid, wall, budget, phases, part.nbytes)
        if isinstance(outcome, TimedOut):  # the part's own deadline, what stall evidence is judged on
            outcome = replace(outcome, deadline=budget, planned_bytes=part.nbytes)
        if isinstance(outcome, Superseded):
            parts.superseded(part)
        elif isinstance(outcome, (Loaded, Corrupt)):
            names_index = {spec.name: i for i, spec in enumerate(plan.local_manifest.tensors)}
            bad = [names_index[n] for n in outcome.bad_tensors] if isinstance(outcome, Corrupt) else []
            parts.landed(part, bad)
            self.last_landing_at = anyio.current_time()
            transfer = phases.seconds.get("transfer", 0.0)
            if isinstance(outcome, Loaded) and transfer > 0:
                self.rates.append(part.nbytes / transfer)
            if isinstance(outcome, Loaded):
                self.hops.append(attempt.candidate.record.hops)
            if self.progress is not None:
                self.progress(parts.landed_bytes, parts.total_bytes)
        else:
            parts.failed(part)
        return outcome, phases, wall

    async def settle_twin(self, part: Part) -> bool:
        """Called when ``part``'s READ completed, before its bytes are verified: True when it won.

        A hedge pair's first copy to get here wins; its twin is cancelled and
        awaited (released, no longer writing) before the winner is verified.
        """
        twin = self.parts.twin_of(part) if self.parts is not None else None
        if twin is None:
            return True
        if twin in self.won:
            return False
        self.won.add(part.index)
        scope, finished = self.scopes.get(twin), self.finished.get(twin)
        if scope is not None and finished is not None:
            scope.cancel()
            await finished.wait()
        return True

    # -- time ---------------------------------------------------------------------------

    def expected(self, part: Part) -> float:
        """The part's expected seconds: the best rate this load (else earlier loads, else the policy's)."""
        rate = max(self.rates) if self.rates else self.config.learned.part_rate or self.policy.stall_rate
        return expected_seconds(part.nbytes, rate, 0.0)

    def hedge_after(self, part: Part) -> float:
        return max(HEDGE_FLOOR, HEDGE_FACTOR * self.expected(part))

    def stall_after(self, part: Part) -> float:
        """When a part in flight is a stall: what brings the extra worker (another source) in."""
        return max(self.hedge_after(part), self.policy.stall_seconds(part.nbytes))

    def part_budget(self, part: Part) -> float:
        """Seconds for one part: long enough to be evidence of a stall, within its share of the load."""
        wanted = max(self.policy.stall_seconds(part.nbytes), PART_DEADLINE_FACTOR * self.expected(part))
        if self.config.hedge:  # room for a hedge to act before the original is given up
            wanted = max(wanted, 2 * self.stall_after(part))
        return max(0.0, min(wanted, self.budget()))

    # -- outcomes ---------------------------------------------------------------------

    def busy(self, strategy: str, attempt: Attempt) -> SourceBusy:
        cap = attempt.candidate.record.max_readers if attempt.candidate is not None else 0
        return SourceBusy(
            strategy=strategy, source_id=attempt.source_id, detail=f"at its cap of {cap} readers"
        )

    def deadline_outcome(
        self,
        strategy: str,
        source_id: str | None,
        wall: float,
        deadline: float,
        phases: Phases,
        planned_bytes: int | None = None,
        *,
        slow: bool = False,
    ) -> TimedOut | Cancelled:
        """What an attempt that ran out of time is: the load's end (``Cancelled``) or its own deadline."""
        if anyio.current_time() >= self.deadline:
            return Cancelled(
                strategy=strategy,
                source_id=source_id,
                seconds=wall,
                detail="the load's overall deadline passed during the attempt",
            )
        return TimedOut(
            strategy=strategy,
            source_id=source_id,
            seconds=wall,
            deadline=deadline,
            planned_bytes=phases.planned_bytes if planned_bytes is None else planned_bytes,
            slow=slow,
            detail=f"no completion within the attempt deadline of {deadline:.3g}s",
        )

    def take_part_index(self) -> int:
        index = self.next_part_index
        self.next_part_index += 1
        return index

    def observe_start(self, strategy: str, source_id: str | None) -> None:
        self.log.debug("attempt.start", strategy=strategy, source=source_id)
        for observer in self.config.observers:
            observer.attempt_start(strategy, source_id)

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
        now = anyio.current_time()
        state = DecisionState(
            attempt_number=attempt.attempt_number,
            attempts_total=self.counted + 1,
            elapsed=self.planner.decision_state(now, attempt).elapsed,
        )
        action = self.policy.decide(outcome, state)
        if not (
            isinstance(outcome, (Loaded, SourceBusy))
            or (part is not None and isinstance(outcome, Superseded))
        ):
            self.counted += 1
        marked = await self.carry_out(action, attempt, outcome)
        record = AttemptRecord(
            outcome,
            action,
            marked,
            attempt.attempt_number,
            wall,
            phases.as_dict(),
            part.index if part is not None else None,
            (part.start, part.end) if part is not None else None,
            landed,
        )
        self.attempts.append(record)
        self.log.info(
            "attempt.done",
            strategy=outcome.strategy,
            source=attempt.source_id,
            part=record.part,
            outcome=outcome.name,
            bytes=outcome.bytes_moved,
            seconds=round(wall, 4),
            action=action.label,
            marked_stale=marked,
            detail=outcome.detail,
        )
        for observer in self.config.observers:
            observer.attempt_done(record)
        if ends_session is None:
            ends_session = action.kind not in (ActionKind.FINISH, ActionKind.RETRY)
            if action.kind is ActionKind.ABORT:
                ends_session = True
        if ends_session:
            self.planner.record(action, attempt)
            if self.planner.done is not None:
                self.conclude(self.planner.done)
        self.notify()
        return action

    async def carry_out(self, action: Action, attempt: Attempt, outcome: Outcome) -> bool:
        """Apply the action's side effects on the registry; True when the source was marked STALE."""
        registry = self.config.registry
        wanted = action.mark_stale or action.report_unreachable
        if not wanted or attempt.candidate is None or registry is None:
            return False
        record = attempt.candidate.record
        reason = f"{outcome.name}: {outcome.detail}"[:500]
        reporter = self.config.target_id
        report = registry.mark_stale if action.mark_stale else registry.report_unreachable
        marked = await registry_call(
            self.log,
            lambda: report(record.source_id, record.generation, reason=reason, reporter=reporter),
            "source.mark_stale_failed",
            source=record.source_id,
        )
        if marked is True:  # marked, or this report was the one that ejected it
            self.log.warning("source.marked_stale", source=record.source_id, reason=reason)
            return True
        return False

    # -- reader leases -----------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lease(self, attempt: Attempt) -> AsyncIterator[bool | None]:
        """This load's reader lease on the attempt's source while the block runs, renewed in the
        background: True held, False refused (the source is at its reader cap), ``None`` no
        registry to ask or it failed (best effort). A target killed mid-read stops renewing and its
        lease runs out within ``reader_lease`` seconds."""
        leased = await self.lease_call(attempt, self.config.reader_lease)
        renewals = anyio.CancelScope()
        if leased:
            self.tasks.start_soon(self.renew, attempt, renewals)
        try:
            yield leased
        finally:
            renewals.cancel()
            if leased is not None and leased is not False:
                with anyio.CancelScope(shield=True):
                    await self.lease_call(attempt, None)

    async def lease_call(self, attempt: Attempt, seconds: float | None) -> bool | None:
        registry = self.config.registry
        if attempt.candidate is None or registry is None:
            return None
        record = attempt.candidate.record
        reader = f"{self.config.target_id}/{self.run_id}"
        result = await registry_call(
            self.log,
            lambda: registry.lease_reader(record.source_id, record.generation, reader, seconds),
            "source.reader_lease_failed",
            within=_READER_ACCOUNTING_TIMEOUT,
            source=record.source_id,
        )
        return None if isinstance(result, Exception) else result

    async def renew(self, attempt: Attempt, scope: anyio.CancelScope) -> None:
        with scope:
            while True:
                await anyio.sleep(self.config.reader_lease / 3)
                await self.lease_call(attempt, self.config.reader_lease)

    # -- the report ---------------------------------------------------------------------

    def report(self, done: Done) -> LoadReport:
        finished = anyio.current_time()
        evaluation = self.evaluator.evaluation
        if not done.loaded and not self.attempts and done.reason == EXHAUSTED:
            if evaluation.registry_error is not None:
                done = Done(False, f"the registry is unavailable: {evaluation.registry_error}")
            elif not any(p.ok for p in evaluation.probes.values()):
                done = Done(False, f"no READY source of {self.identity.key} was found")
        spread = 0.0
        if done.loaded and self.first_part_at is not None and self.last_landing_at is not None:
            spread = self.last_landing_at - self.first_part_at
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
            source_hops=max(self.hops) if done.loaded and self.hops else None,
            stripe=self.config.stripe,
            stripe_seconds=spread,
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
