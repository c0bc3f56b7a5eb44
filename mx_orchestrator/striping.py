"""The striped half of the load driver: several sources read disjoint parts of one model at once.

Decisions come from pure code: which bytes each source reads next, what a
failed part costs and when a part is hedged (:class:`~mx_orchestrator.parts.PartPlanner`),
what each part's outcome means (the load's :class:`~mx_orchestrator.policy.Policy`,
unchanged: a ``LayoutMismatch`` never marks STALE, a failed part's source
gets no more parts in this load). This module carries them out:

1. once candidates are known (the rank window, as for a plain load), the
   target's memory is allocated for the manifest most candidates agree on (the
   pinned one with ``expect``), and registered once per agent;
2. up to ``stripe`` *workers* each take the best-ranked source nobody serves
   yet: the source's strategy is the first part-capable one whose pure check
   accepts it (each refusal is an attempt record that moved 0 bytes), its
   reader lease is taken once for the load, then it reads part after part
   until nothing is left; a worker whose source is out takes the next one;
3. each part runs under its own deadline, from the bytes and the expected rate
   (the best part rate of this load, else of earlier loads, else the policy's
   ``stall_rate``), never below the policy's stall evidence and never beyond
   the load's deadline; an idle worker hedges a part in flight longer than
   twice its expected time; the first copy to land wins, the other is
   cancelled (and released) before the winner is verified, so verified bytes
   are never written again;
4. when every tensor has landed the load is done; when no source is left, the
   strategies that cannot read parts (the Hub, ``cuda_ipc``) get the load as
   usual, from an empty target.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import replace
from typing import Any, Protocol

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from .models import Candidate, Manifest, ModelIdentity
from .outcomes import Corrupt, Loaded, Outcome, SourceBusy, Superseded, TimedOut
from .parts import Part, PartPlanner, expected_seconds
from .peer import PartReader, PeerStrategy, PullPlan, allocate
from .plan import Attempt, Done, Planner, StrategySlot
from .policy import Action, ActionKind, DecisionState, Policy
from .report import AttemptRecord
from .strategy import AttemptContext, Phases, ProgressCallback
from .target import Target


class LoadDriver(Protocol):
    """What the striped half uses of the pipeline's per-load driver (``pipeline._Load``)."""

    config: Any  # the Orchestrator: its options, policy, strategies, observers
    identity: ModelIdentity
    target: Any
    run_id: str
    progress: ProgressCallback | None
    deadline: float
    attempts: list[AttemptRecord]
    planner: Planner
    strategy_map: list[int]
    source_hops: int | None
    stripe_seconds: float
    log: Any

    def remaining(self) -> float: ...
    async def lease_reader(self, step: Attempt, seconds: float | None) -> bool | None: ...
    async def renew_lease(self, step: Attempt) -> None: ...
    async def carry_out(self, action: Action, step: Attempt, outcome: Outcome) -> bool: ...
    async def attempt_loop(self, receive: MemoryObjectReceiveStream[Candidate]) -> Done: ...


__all__ = ["HEDGE_FACTOR", "HEDGE_FLOOR", "PART_DEADLINE_FACTOR", "LoadDriver", "StripedLoad"]

#: a part in flight this many times its expected time is hedged ...
HEDGE_FACTOR = 2.0
#: ... but never sooner than this (seconds): below it a hedge costs more than it saves
HEDGE_FLOOR = 0.2
#: a part's deadline: this many times its expected time (and never under the policy's stall evidence)
PART_DEADLINE_FACTOR = 4.0

_NO_STRATEGY = "no part-capable strategy accepts this source"


class _Lost(Exception):
    """Raised into nothing: marks a part whose twin landed first (see :meth:`StripedLoad.settle`)."""


class StripedLoad:
    """One striped load; :meth:`run` returns the plan's :class:`~mx_orchestrator.plan.Done`."""

    def __init__(self, load: LoadDriver, receive: MemoryObjectReceiveStream[Candidate]) -> None:
        self.load = load
        self.config = load.config
        self.policy: Policy = load.config.policy
        self.receive = receive
        self.strategies = [
            (i, s) for i, s in enumerate(self.config.strategies) if isinstance(s, PeerStrategy)
        ]
        self.rank = self.config.selection(self.config.target_id)
        self.candidates: dict[str, Candidate] = {}
        self.taken: set[str] = set()
        self.evaluating = True
        self.changed = anyio.Event()
        self.planner: PartPlanner | None = None
        self.scopes: dict[int, anyio.CancelScope] = {}
        self.finished: dict[int, anyio.Event] = {}
        self.won: set[int] = set()
        self.rates: list[float] = []
        self.abort: str | None = None
        self.first_part_at: float | None = None
        self.last_landing_at: float | None = None
        self.hops: list[int] = []
        #: sources this load forgot (a fault, another manifest): the strategies after striping skip them
        self.out: set[str] = set()
        #: part index -> the byte runs of it that landed verified (all of a Loaded part, the good
        #: tensors of a Corrupt one)
        self.landed_runs: dict[int, list[tuple[int, int]]] = {}

    # -- candidates ---------------------------------------------------------------

    def notify(self) -> None:
        self.changed.set()
        self.changed = anyio.Event()

    async def collect(self) -> None:
        """Take in candidates as evaluation finds them (runs for the whole load)."""
        async for candidate in self.receive:
            self.candidates.setdefault(candidate.source_id, candidate)
            self.notify()
        self.evaluating = False
        self.notify()

    def next_candidate(self) -> Candidate | None:
        free = [c for c in self.candidates.values() if c.source_id not in self.taken]
        return min(free, key=lambda c: (self.rank(c), c.source_id), default=None)

    async def wait_for_change(self, until: float = math.inf) -> None:
        event = self.changed
        with anyio.move_on_after(max(0.0, min(until, self.load.deadline) - anyio.current_time())):
            await event.wait()

    # -- the load -----------------------------------------------------------------

    async def run(self) -> Done:
        load = self.load
        target = load.target
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.collect)
            try:
                done = await self.striped(target)
            finally:
                tg.cancel_scope.cancel()
        if done is not None:
            return done
        # no source could finish it: the strategies that do not read parts get the load
        rest = [i for i, s in enumerate(self.config.strategies) if not isinstance(s, PeerStrategy)]
        if not rest:
            return Done(False, self.abort or "no source left to read the remaining parts")
        load.planner = Planner(
            [
                StrategySlot(self.config.strategies[i].name, self.config.strategies[i].uses_peers)
                for i in rest
            ],
            self.rank,
            max_attempts=max(1, self.config.policy.max_attempts - len(load.attempts)),
        )
        load.strategy_map = rest
        for candidate in self.candidates.values():
            if candidate.source_id not in self.out:
                load.planner.add_candidate(candidate)
        load.planner.evaluation_finished()
        return await load.attempt_loop(self.receive)

    async def striped(self, target: object) -> Done | None:
        """The striped phase: ``Done`` when it decided the load, ``None`` to hand over to the rest."""
        load = self.load
        # the rank window: every probe gets its chance before the first source is chosen
        while not self.candidates and self.evaluating and load.remaining() > 0:
            await self.wait_for_change()
        if self.candidates and self.evaluating:
            with anyio.move_on_after(min(self.config.rank_window, load.remaining())):
                while self.evaluating:
                    await self.wait_for_change()
        if not self.candidates:
            return (
                Done(False, "load deadline passed while waiting for candidates")
                if load.remaining() <= 0
                else None
            )
        if not isinstance(target, Target):
            return None
        empty_before = target.buffers is None
        allocated = await self.allocate(target)
        if allocated is None:
            return None
        self.planner = PartPlanner(
            [spec.nbytes for spec in allocated.tensors],
            self.config.stripe,
            min_part_bytes=self.config.min_part_bytes,
            max_attempts=self.config.policy.max_attempts,
        )
        reader = PartReader(target)
        try:
            async with anyio.create_task_group() as workers:
                for _ in range(self.config.stripe):
                    workers.start_soon(self.worker, reader)
        finally:
            reader.close()
            if empty_before and not self.planner.done:
                target.release()
        if self.planner.done:
            if self.first_part_at is not None and self.last_landing_at is not None:
                load.stripe_seconds = self.last_landing_at - self.first_part_at
            if self.rates:
                best = max(self.rates)
                self.config.observed_rate = max(best, self.config.observed_rate or 0.0)
            load.source_hops = max(self.hops) if self.hops else None
            return Done(True, "loaded")
        if self.abort is not None:
            return Done(False, self.abort)
        if load.remaining() <= 0:
            return Done(False, "the load's overall deadline passed")
        return None

    async def allocate(self, target: Target) -> Manifest | None:
        """The target's memory, for the manifest most candidates publish (the pinned one with ``expect``)."""
        expect = self.config.expect
        usable = [
            c
            for c in self.candidates.values()
            if c.manifest is not None and (expect is None or c.manifest.content_fingerprint == expect)
        ]
        if not usable:
            return None
        votes = Counter(c.manifest.manifest_fingerprint for c in usable if c.manifest is not None)
        best = min(usable, key=lambda c: (-votes[c.manifest.manifest_fingerprint], self.rank(c), c.source_id))  # type: ignore[union-attr]
        for index, strategy in self.strategies:
            ctx = self.context(best, math.inf, Phases())
            plan = strategy.check_for(ctx)
            if isinstance(plan, PullPlan):
                allocated = await allocate(plan, target, ctx, strategy.name)
                if isinstance(allocated, Outcome):
                    self.record(Attempt(strategy.name, index, best), allocated, None, ctx.phases, 0.0)
                    return None
                return allocated.manifest
        return target.manifest

    def context(self, candidate: Candidate, deadline: float, phases: Phases) -> AttemptContext:
        load = self.load
        return AttemptContext(
            identity=load.identity,
            target=load.target,
            candidate=candidate,
            deadline=deadline,
            run_id=load.run_id,
            registry=self.config.registry,
            progress=None,
            phases=phases,
            expect=self.config.expect,
        )

    # -- workers ----------------------------------------------------------------

    async def worker(self, reader: PartReader) -> None:
        planner = self.planner
        assert planner is not None
        while not planner.done and self.abort is None and self.load.remaining() > 0:
            candidate = self.next_candidate()
            if candidate is None:
                if not self.evaluating or planner.stuck:
                    return
                await self.wait_for_change()
                continue
            self.taken.add(candidate.source_id)
            await self.serve_from(candidate, reader)
        self.notify()  # wakes the idle workers: the load is done (or over)

    async def serve_from(self, candidate: Candidate, reader: PartReader) -> None:
        """Read parts from ``candidate`` until the model is in, or the source is out of this load."""
        chosen = self.choose_strategy(candidate)
        if chosen is None:
            return
        index, strategy, plan = chosen
        lease = Attempt(strategy.name, index, candidate)
        leased = await self.load.lease_reader(lease, self.config.reader_lease)
        if leased is False:
            busy = SourceBusy(
                strategy=strategy.name,
                source_id=candidate.source_id,
                detail=f"at its cap of {candidate.record.max_readers} readers",
            )
            await self.decide(lease, busy, None, Phases(), 0.0)
            return
        try:
            async with anyio.create_task_group() as renewals:
                if leased:
                    renewals.start_soon(self.load.renew_lease, lease)
                await self.read_parts(lease, strategy, plan, reader)
                renewals.cancel_scope.cancel()
        finally:
            if leased is not None:
                with anyio.CancelScope(shield=True):
                    await self.load.lease_reader(lease, None)

    def choose_strategy(self, candidate: Candidate) -> tuple[int, PeerStrategy, PullPlan] | None:
        """The first part-capable strategy whose pure check accepts ``candidate`` (refusals move 0 bytes)."""
        for index, strategy in self.strategies:
            phases = Phases()
            checked = strategy.check_for(self.context(candidate, self.load.deadline, phases))
            if isinstance(checked, PullPlan):
                return index, strategy, checked
            action = self.record(Attempt(strategy.name, index, candidate), checked, None, phases, 0.0)
            if action.forget_source or action.kind is ActionKind.ABORT:
                self.out.add(candidate.source_id)
                return None
        return None

    async def read_parts(
        self, lease: Attempt, strategy: PeerStrategy, plan: PullPlan, reader: PartReader
    ) -> None:
        planner = self.planner
        assert planner is not None
        sid = lease.source_id or ""
        attempt_number = 1
        while not planner.done and self.abort is None and self.load.remaining() > 0:
            now = anyio.current_time()
            part = planner.take(sid, now)
            if part is None and self.config.hedge:
                part = planner.hedge(sid, now, self.hedge_after)
            if part is None:
                if planner.stuck or planner.exhausted:
                    return
                until = planner.next_hedge_time(sid, self.hedge_after) if self.config.hedge else math.inf
                await self.wait_for_change(until)
                continue
            outcome, phases, wall = await self.read_part(part, lease, strategy, plan, reader)
            action = await self.decide(
                Attempt(strategy.name, lease.strategy_index, lease.candidate, attempt_number),
                outcome,
                part,
                phases,
                wall,
            )
            self.notify()
            if action.kind is ActionKind.ABORT:
                self.abort = action.reason or outcome.name
                return
            if action.forget_source or action.kind is ActionKind.NEXT_STRATEGY:
                if action.forget_source:
                    self.out.add(sid)
                return
            if action.kind is ActionKind.RETRY:
                attempt_number += 1
                await anyio.sleep(min(action.delay, self.load.remaining()))
            else:
                attempt_number = 1

    async def read_part(
        self, part: Part, lease: Attempt, strategy: PeerStrategy, plan: PullPlan, reader: PartReader
    ) -> tuple[Outcome, Phases, float]:
        """One part attempt: its outcome (a lost hedge race included), phases and wall time."""
        planner = self.planner
        assert planner is not None and lease.candidate is not None
        load = self.load
        began = anyio.current_time()
        if self.first_part_at is None:
            self.first_part_at = began
        budget = self.part_budget(part)
        phases = Phases()
        ctx = self.context(lease.candidate, min(began + budget, load.deadline), phases)
        for observer in self.config.observers:
            observer.attempt_start(strategy.name, lease.source_id)
        scope = anyio.CancelScope()
        self.scopes[part.index] = scope
        self.finished[part.index] = anyio.Event()
        outcome: Outcome | None = None
        try:
            with scope:
                with anyio.move_on_after(budget + 1.0):  # the agent keeps the deadline; this is a backstop
                    outcome = await reader.read(strategy, plan, part.tensors, ctx, lambda: self.settle(part))
        finally:
            self.scopes.pop(part.index, None)
            self.finished.pop(part.index).set()
        wall = anyio.current_time() - began
        sid = lease.source_id
        if outcome is None and scope.cancel_called:
            # its twin landed first: the hedge that lost did nothing wrong; the original that lost
            # was in flight for ``wall`` seconds without completing (the policy decides if that
            # is evidence of a stall)
            planner.superseded(part)
            if part.hedge_of is not None:
                outcome = Superseded(
                    strategy=strategy.name, source_id=sid, seconds=wall, detail="the original landed first"
                )
            else:
                outcome = TimedOut(
                    strategy=strategy.name,
                    source_id=sid,
                    seconds=wall,
                    deadline=wall,
                    planned_bytes=part.nbytes,
                    detail=f"superseded by a hedge after {wall:.3g}s without completing",
                )
            return outcome, phases, wall
        if outcome is None:
            outcome = TimedOut(
                strategy=strategy.name,
                source_id=sid,
                seconds=wall,
                deadline=budget,
                planned_bytes=part.nbytes,
                detail=f"no completion within the part deadline of {budget:.3g}s",
            )
        if isinstance(outcome, TimedOut):  # the part's own deadline, what stall evidence is judged on
            outcome = replace(outcome, deadline=budget, planned_bytes=part.nbytes)
        if isinstance(outcome, Superseded):
            planner.superseded(part)
        elif isinstance(outcome, (Loaded, Corrupt)):
            names = {spec.name: i for i, spec in enumerate(plan.local_manifest.tensors)}
            bad = [names[n] for n in outcome.bad_tensors] if isinstance(outcome, Corrupt) else []
            planner.landed(part, bad)
            self.landed_runs[part.index] = planner.byte_runs(i for i in part.tensors if i not in set(bad))
            self.last_landing_at = anyio.current_time()
            transfer = phases.seconds.get("transfer", 0.0)
            if isinstance(outcome, Loaded) and transfer > 0:
                self.rates.append(part.nbytes / transfer)
                self.hops.append(lease.candidate.record.hops)
            if load.progress is not None:
                load.progress(planner.landed_bytes, planner.total_bytes)
        else:
            planner.failed(part)
        return outcome, phases, wall

    async def settle(self, part: Part) -> bool:
        """Called when ``part``'s READ completed, before its bytes are verified: True when it won.

        A hedge pair's first copy to get here wins; its twin is cancelled and
        awaited (released, no longer writing) before the winner is verified.
        """
        twin = self.planner.twin_of(part) if self.planner is not None else None
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

    # -- time ---------------------------------------------------------------------

    def expected(self, part: Part) -> float:
        """The part's expected seconds: the best rate this load (else earlier loads, else the policy's)."""
        rate = max(self.rates) if self.rates else self.config.observed_rate or self.policy.stall_rate
        return expected_seconds(part.nbytes, rate, 0.0)

    def hedge_after(self, part: Part) -> float:
        return max(HEDGE_FLOOR, HEDGE_FACTOR * self.expected(part))

    def part_budget(self, part: Part) -> float:
        """Seconds for one part: long enough to be evidence of a stall, short of the load's deadline."""
        wanted = max(self.policy.stall_seconds(part.nbytes), PART_DEADLINE_FACTOR * self.expected(part))
        if self.config.hedge:  # room for a hedge to act before the original is given up
            wanted = max(wanted, 2 * self.hedge_after(part))
        attempt_timeout: float = self.config.attempt_timeout
        return max(0.0, min(wanted, attempt_timeout, self.load.remaining()))

    # -- outcomes -------------------------------------------------------------------

    async def decide(
        self, attempt: Attempt, outcome: Outcome, part: Part | None, phases: Phases, wall: float
    ) -> Action:
        action = self.record(attempt, outcome, part, phases, wall, pending_mark=True)
        marked = await self.load.carry_out(action, attempt, outcome)
        if marked:
            self.load.attempts[-1] = replace(self.load.attempts[-1], marked_stale=True)
        for observer in self.config.observers:
            observer.attempt_done(self.load.attempts[-1])
        return action

    def record(
        self,
        attempt: Attempt,
        outcome: Outcome,
        part: Part | None,
        phases: Phases,
        wall: float,
        *,
        pending_mark: bool = False,
    ) -> Action:
        """The policy's action for ``outcome``, and its attempt record (:meth:`decide` marks STALE)."""
        load = self.load
        state = DecisionState(attempt_number=attempt.attempt_number, attempts_total=len(load.attempts) + 1)
        action = self.policy.decide(outcome, state)
        load.attempts.append(
            AttemptRecord(
                outcome,
                action,
                False,
                attempt.attempt_number,
                wall,
                phases.as_dict(),
                part.index if part is not None else None,
                (part.start, part.end) if part is not None else None,
                tuple(self.landed_runs.pop(part.index, ())) if part is not None else (),
            )
        )
        load.log.info(
            "attempt.done",
            strategy=attempt.strategy,
            source=attempt.source_id,
            part=part.index if part is not None else None,
            outcome=outcome.name,
            bytes=outcome.bytes_moved,
            action=action.label,
            detail=outcome.detail,
        )
        if not pending_mark:
            for observer in self.config.observers:
                observer.attempt_done(load.attempts[-1])
        return action
