"""The attempt planner: a pure state machine deciding which (strategy, candidate) to try next.

The pipeline feeds it candidates as evaluation finds them and the policy's
action after each attempt; it answers with the next :class:`Attempt`, a
:class:`Wait` (more candidates may still come), a :class:`Requeue` (every
usable source is at its reader cap: wait, list again, try again), or
:class:`Done`, and with the
:class:`~mx_orchestrator.policy.DecisionState` the policy decides the pending
attempt's outcome in (the planner keeps the bookkeeping behind it; the
caller passes the time in, so the planner stays pure). How each kind of
action changes the plan is one table, :data:`TRANSITIONS`. Strategies are
tried in order; within a strategy, candidates in rank order; a strategy that
does not use peers (the Hub) gets one pseudo-candidate, ``None``.

Capacity is not a fault. A source that refused a new reader (``Action.full``)
or was listed at its cap is skipped for the rest of the round; when no usable
candidate is left and some were full, the plan asks for a capacity wait
(:class:`Requeue`) instead of falling back to the Hub: in a fleet, the peers
free up (and republished targets appear) long before a Hub download would end.
After the wait the driver lists the sources again and calls :meth:`Planner.requeue`.
A striped load that waits while reading from fewer sources than its stripe
asks for a :class:`Relist` at most every ``relist_interval`` (targets that began
serving since, a fleet's partial sources, join it). A listing's loads go stale
fast in a fleet, and one listing costs less than a chain of refusals: a load
refused while it reads from others lists again before it asks another source;
one reading from no one waits for capacity after ``STALE_AFTER_REFUSALS``; a part
session is handed out only once the one before it was admitted
(:meth:`Planner.admitted`). The steps are in :mod:`~mx_orchestrator.steps`.

Termination: every recorded action either finishes, marks a new
(strategy, source) pair as tried, advances the strategy, or is a retry; retries
and everything else are capped by ``max_attempts``; refusals for capacity and
connects refused by a source the load then forgets are not counted there (ten
thousand junk records must not spend a load's budget), but each round has
finitely many candidates, each such pair happens once a round, and rounds are
capped by ``capacity_waits``. A relist only adds candidates (each tried at most
once a round) and happens while attempts are in flight, which end. The property tests drive this class with
arbitrary outcomes to pin that.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import replace

from .models import Candidate
from .policy import Action, ActionKind, DecisionState, Policy
from .selection import RankKey
from .steps import Attempt, Done, Relist, Requeue, Step, StrategySlot, Wait

__all__ = [
    "EXHAUSTED",
    "SHARES",
    "TRANSITIONS",
    "Attempt",
    "Done",
    "Planner",
    "Relist",
    "Requeue",
    "StrategySlot",
    "Wait",
    "attempt_budget",
]

#: Refusals with no session in flight after which a listing is stale: wait for capacity, list again.
STALE_AFTER_REFUSALS = 2

#: The reason a plan ends when nothing is left to try.
EXHAUSTED = "every strategy and candidate was tried"
#: At most this many attempts share what is left of a load's deadline (see ``attempts_left``).
SHARES = 8


class Planner:
    def __init__(
        self,
        strategies: Sequence[StrategySlot],
        rank: RankKey,
        *,
        max_attempts: int = 64,
        capacity_waits: int = 0,
        capacity_delay: Callable[[int, float], float] = lambda waits_made, waited: 0.0,
        readers: int = 1,
        relist_interval: float = math.inf,
    ) -> None:
        if not strategies:
            raise ValueError("at least one strategy is required")
        self._strategies = tuple(strategies)
        self._rank = rank
        self._max_attempts = max_attempts
        self._capacity_waits = capacity_waits
        self._capacity_delay = capacity_delay
        #: sessions a striped load runs at once; while fewer run and no known source is left, it
        #: lists again at most every ``relist_interval`` seconds (:class:`Relist`)
        self._readers = readers
        self._relist_interval = relist_interval
        self._listed_at = 0.0
        #: sources that refused us for capacity since the last listing
        self._refused_since_listing = 0
        #: part sessions handed out whose source has not admitted us yet (see :meth:`admitted`)
        self._unadmitted: set[int] = set()
        #: sources full this round (refused us, or listed at their cap), and the first peer
        #: strategy that met one: where a requeued round starts again
        self._full: set[str] = set()
        self._full_from: int | None = None
        self.capacity_waits_made = 0
        self._first_wait_at: float | None = None
        self._requeue_asked = False
        self._now = 0.0
        #: attempts in the report not counted toward ``max_attempts``: capacity refusals, and connects
        #: refused before any byte moved by sources the load then forgets (junk records)
        self.refusals = 0
        self._index = 0
        self._known: dict[str, Candidate] = {}
        self._keys: dict[str, tuple[float, ...]] = {}
        # Candidates not yet tried by the current strategy, best first; entries
        # for forgotten, tried or busy sources are dropped lazily when popped
        # (a busy one is pushed back when its attempt ends, see record()).
        self._heap: list[tuple[tuple[float, ...], str]] = []
        self._heap_index = -1
        self._forgotten: set[str] = set()
        self._tried: set[tuple[int, str | None]] = set()
        self._evaluating = True
        #: attempts handed out and not recorded yet, by ticket
        self._in_flight: dict[int, Attempt] = {}
        self._next_ticket = 1
        self._retries: list[Attempt] = []
        self._done: Done | None = None
        self._first_try: dict[tuple[int, str | None], float] = {}
        self.attempts_total = 0

    @classmethod
    def of(cls, strategies: Sequence[StrategySlot], rank: RankKey, policy: Policy, readers: int) -> Planner:
        """A planner with the policy's bounds, for a load running ``readers`` sessions at once."""
        return cls(
            strategies,
            rank,
            max_attempts=policy.max_attempts,
            capacity_waits=policy.capacity_waits,
            capacity_delay=policy.capacity_delay,
            readers=readers,
            relist_interval=policy.relist_interval,
        )

    # -- inputs ---------------------------------------------------------------

    def add_candidate(self, candidate: Candidate) -> None:
        sid = candidate.source_id
        if sid in self._known:
            return
        if sid in self._forgotten:
            return
        self._known[sid] = candidate
        self._keys[sid] = self._rank(candidate)
        if self._heap_index == self._index:
            heapq.heappush(self._heap, (self._keys[sid], sid))

    def evaluation_finished(self) -> None:
        self._evaluating = False
        self._listed_at = self._now
        self._refused_since_listing = 0

    @property
    def evaluating(self) -> bool:
        return self._evaluating

    @property
    def done(self) -> Done | None:
        """The plan's end once it is decided (``None`` while attempts may still be handed out)."""
        return self._done

    def attempts_left(self, cap: int = SHARES) -> int:
        """How many attempts, one after another, the load could still make, a pending one included,
        counted up to ``cap``: what a load's remaining budget is shared among.

        One for an attempt in flight (attempts in flight at once share no time),
        the untried, unforgotten, idle candidates of the current peer strategy,
        plus one for every peerless strategy (the Hub) after it. The cap keeps a
        registry flooded with records from cutting every attempt to nothing: each
        attempt may take 1/``cap`` of what is left, so a run of hanging sources
        still leaves (1 - 1/cap)^k of the deadline after k of them.
        """
        index = self._index
        left = (1 if self._in_flight else 0) + sum(
            1 for slot in self._strategies[index + 1 :] if not slot.uses_peers
        )
        if index < len(self._strategies) and self._strategies[index].uses_peers:
            busy = self._busy_sources()
            for sid in self._known:
                if left >= cap:
                    break
                if sid not in self._forgotten and (index, sid) not in self._tried and sid not in busy:
                    left += 1
        return max(1, min(left, cap))

    @property
    def candidates_known(self) -> int:
        return len(self._known)

    def _pending(self, attempt: Attempt | None) -> Attempt:
        if attempt is None:
            if len(self._in_flight) != 1:
                raise RuntimeError(f"{len(self._in_flight)} attempts in flight: say which one")
            return next(iter(self._in_flight.values()))
        pending = self._in_flight.get(attempt.ticket)
        if pending is None:
            raise RuntimeError(f"attempt {attempt.ticket} is not in flight")
        return pending

    def record(self, action: Action, attempt: Attempt | None = None) -> None:
        """Apply the policy's action for ``attempt`` (returned by :meth:`next_step`; may be left out
        while it is the only one in flight)."""
        attempt = self._pending(attempt)
        del self._in_flight[attempt.ticket]
        self._unadmitted.discard(attempt.ticket)
        self.attempts_total += 1
        sid = attempt.source_id
        self._tried.add((attempt.strategy_index, sid))
        if action.forget_source and sid is not None:
            self._forgotten.add(sid)
        if not action.counted and sid is not None and action.kind is ActionKind.NEXT_CANDIDATE:
            self.refusals += 1
        if action.full and sid is not None and action.kind is ActionKind.NEXT_CANDIDATE:
            self._mark_full(sid, attempt.strategy_index)
            self._refused_since_listing += 1
        TRANSITIONS[action.kind](self, attempt, action)
        if self._done is None and self.attempts_counted >= self._max_attempts:
            self._done = Done(False, f"attempt limit {self._max_attempts} reached")
        if (  # it was skipped by the current strategy while busy: it may be tried there now
            sid is not None
            and sid in self._known
            and self._heap_index == self._index
            and attempt.strategy_index < self._index
        ):
            heapq.heappush(self._heap, (self._keys[sid], sid))

    def admitted(self, attempt: Attempt) -> None:
        """``attempt``'s source admitted us (its lease was granted, or there is no one to ask): the
        next part session may be handed out. Until then none is: sessions asked at once all choose
        from one listing, and at a fleet's start its few early sources refuse all but one of them."""
        self._unadmitted.discard(attempt.ticket)

    @property
    def attempts_counted(self) -> int:
        """Attempts that count toward ``max_attempts``: all but the refusals for capacity."""
        return self.attempts_total - self.refusals

    def reconsider(self, sources: Collection[str]) -> None:
        """``sources`` were refused for a reason that no longer holds (another content than one
        that has since proved false): they may be tried again, by every strategy."""
        if not sources:
            return
        for sid in sources:
            self._forgotten.discard(sid)
            self._tried = {(i, s) for i, s in self._tried if s != sid}
        # from the first strategy again: every pair tried before stays tried
        self._index = 0
        self._heap_index = -1

    def requeue(self) -> None:
        """Start a new round after a capacity wait: the full sources may be tried again, and the
        sources listed since (fed through :meth:`add_candidate` before or after this) with them."""
        self._requeue_asked = False
        self._tried = {(i, sid) for i, sid in self._tried if sid not in self._full}
        self._full.clear()
        if self._full_from is not None:
            self._index = min(self._index, self._full_from)
        self._full_from = None
        # records are listed afresh: their loads (and so their ranks) have changed
        self._known = {sid: c for sid, c in self._known.items() if sid in self._busy_sources()}
        self._keys = {sid: k for sid, k in self._keys.items() if sid in self._known}
        self._heap_index = -1
        self._evaluating = True

    def _mark_full(self, sid: str, strategy_index: int) -> None:
        self._full.add(sid)
        if self._full_from is None or strategy_index < self._full_from:
            self._full_from = strategy_index

    def decision_state(self, now: float, attempt: Attempt | None = None) -> DecisionState:
        """What the policy may know about ``attempt`` (in flight), ``now`` being the caller's clock."""
        attempt = self._pending(attempt)
        first = self._first_try.get((attempt.strategy_index, attempt.source_id), now)
        return DecisionState(
            attempt_number=attempt.attempt_number,
            attempts_total=self.attempts_counted + 1,
            elapsed=max(0.0, now - first),
        )

    # -- transitions (one per action kind) --------------------------------------

    def _finish(self, attempt: Attempt, action: Action) -> None:
        self._done = Done(True, "loaded")

    def _abort(self, attempt: Attempt, action: Action) -> None:
        self._done = Done(False, action.reason or "aborted")

    def _retry_same(self, attempt: Attempt, action: Action) -> None:
        self._retries.append(
            Attempt(
                attempt.strategy,
                attempt.strategy_index,
                attempt.candidate,
                attempt.attempt_number + 1,
                action.delay,
            )
        )

    def _next_strategy(self, attempt: Attempt, action: Action) -> None:
        self._index = max(self._index, attempt.strategy_index + 1)

    def _next_candidate(self, attempt: Attempt, action: Action) -> None:
        """Nothing to change: the pair is marked tried, the next pop skips it."""

    # -- output ---------------------------------------------------------------

    def next_step(self, now: float = 0.0) -> Step:
        """The next step; ``now`` (the caller's clock) starts the elapsed time of a new pair and
        measures how long the load has waited for capacity. May be called while other attempts
        are in flight (a striped load's workers): each source has one attempt at a time, and an
        attempt of a slot that reads the whole model runs alone."""
        self._now = now
        step = self._next_step()
        if isinstance(step, Attempt):
            step = replace(step, ticket=self._next_ticket)
            self._next_ticket += 1
            self._in_flight[step.ticket] = step
            if self._strategies[step.strategy_index].parts:
                self._unadmitted.add(step.ticket)
            self._first_try.setdefault((step.strategy_index, step.source_id), now)
        return step

    def _alone(self, slot: StrategySlot) -> bool:
        """An attempt of ``slot`` must wait: it reads the whole model, and others are in flight."""
        return not slot.parts and bool(self._in_flight)

    def _next_step(self) -> Step:
        if self._done is not None:
            return self._done
        for i, retry in enumerate(self._retries):
            if not self._alone(self._strategies[retry.strategy_index]):
                return self._retries.pop(i)
        if self._retries:
            return Wait()
        while self._index < len(self._strategies):
            slot = self._strategies[self._index]
            if self._alone(slot):
                return self._waiting()
            if not slot.uses_peers:
                if self._may_wait():
                    return self._wait_for_capacity()
                if (self._index, None) not in self._tried:
                    return Attempt(slot.name, self._index, None)
            else:
                if slot.parts and self._unadmitted:
                    return Wait()  # one lease asked at a time: its answer may make the listing stale
                if slot.parts and self._refused_since_listing and self._in_flight:
                    return Wait() if self._evaluating else self._waiting()
                if slot.parts and self._refused_since_listing >= STALE_AFTER_REFUSALS and self._may_wait():
                    return self._wait_for_capacity()  # a fleet's start: the listing's free slots are gone
                best = self._pop_best()
                if best is not None:
                    return Attempt(slot.name, self._index, best)
                if self._evaluating:
                    return Wait()
            self._index += 1
        if self._in_flight:
            return self._waiting()
        if self._may_wait():
            return self._wait_for_capacity()
        self._done = Done(False, EXHAUSTED)
        return self._done

    def _waiting(self) -> Step:
        """Attempts in flight may change the plan: wait; or, when a striped load reads from fewer
        sources than it may and its last listing is old enough, list again (:class:`Relist`) and
        try what it finds with every part strategy from the first (tried pairs stay tried)."""
        first = next((i for i, slot in enumerate(self._strategies) if slot.parts), None)
        if first is None or len(self._in_flight) >= self._readers:
            return Wait()
        due = self._listed_at + self._relist_interval
        if self._now < due:
            return Wait(until=due)
        self._index = min(self._index, first)
        self._evaluating, self._heap_index = True, -1
        return Relist()

    def _may_wait(self) -> bool:
        return bool(self._full) and self.capacity_waits_made < self._capacity_waits

    def _wait_for_capacity(self) -> Step:
        # the attempts in flight may finish the load, and a wait already asked for lists again
        if self._in_flight or self._requeue_asked:
            return Wait()
        self._requeue_asked = True
        if self._first_wait_at is None:
            self._first_wait_at = self._now
        delay = self._capacity_delay(self.capacity_waits_made, self._now - self._first_wait_at)
        self.capacity_waits_made += 1
        # until requeue(): no step but this one (the driver waits and lists again)
        self._evaluating = True
        return Requeue(delay, self.capacity_waits_made)

    def _busy_sources(self) -> set[str]:
        return {a.source_id for a in self._in_flight.values() if a.source_id is not None}

    def _pop_best(self) -> Candidate | None:
        if self._heap_index != self._index:
            self._heap = [(self._keys[sid], sid) for sid in self._known]
            heapq.heapify(self._heap)
            self._heap_index = self._index
        busy = self._busy_sources()
        while self._heap:
            _, sid = heapq.heappop(self._heap)
            if sid in self._forgotten or sid in self._full or (self._index, sid) in self._tried:
                continue
            if sid in busy:
                continue
            candidate = self._known[sid]
            if candidate.record.listed_full and self.capacity_waits_made < self._capacity_waits:
                # no attempt while we may still wait: it was at its cap when we listed it (it
                # would most likely refuse us too)
                self._mark_full(sid, self._index)
                continue
            return candidate
        return None


#: How each kind of action changes the plan.
TRANSITIONS: Mapping[ActionKind, Callable[[Planner, Attempt, Action], None]] = {
    ActionKind.FINISH: Planner._finish,
    ActionKind.ABORT: Planner._abort,
    ActionKind.RETRY: Planner._retry_same,
    ActionKind.NEXT_STRATEGY: Planner._next_strategy,
    ActionKind.NEXT_CANDIDATE: Planner._next_candidate,
}


def attempt_budget(remaining: float, attempts_left: int, attempt_timeout: float) -> float:
    """Seconds for the next attempt: its timeout, or its share of what is left of the load's deadline.

    A load's deadline is a promise: a source that hangs must leave time for the
    candidates after it, so no attempt takes more than an even share of what
    remains (``inf`` remaining: no load deadline, the attempt timeout alone).
    """
    if attempts_left <= 1 or remaining == float("inf"):
        return min(attempt_timeout, remaining)
    return min(attempt_timeout, remaining / attempts_left)
