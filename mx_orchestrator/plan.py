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

Termination: every recorded action either finishes, marks a new
(strategy, source) pair as tried, advances the strategy, or is a retry; retries
and everything else are capped by ``max_attempts``; refusals for capacity are
not counted there but each round has finitely many candidates, and rounds are
capped by ``capacity_waits``. The property tests drive this class with
arbitrary outcomes to pin that.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from .models import Candidate
from .policy import Action, ActionKind, DecisionState
from .selection import RankKey

__all__ = [
    "EXHAUSTED",
    "TRANSITIONS",
    "Attempt",
    "Done",
    "Planner",
    "Requeue",
    "StrategySlot",
    "Wait",
    "attempt_budget",
]

#: The reason a plan ends when nothing is left to try.
EXHAUSTED = "every strategy and candidate was tried"


@dataclass(frozen=True, slots=True)
class StrategySlot:
    name: str
    uses_peers: bool = True


@dataclass(frozen=True, slots=True)
class Attempt:
    strategy: str
    strategy_index: int
    candidate: Candidate | None
    attempt_number: int = 1
    delay: float = 0.0

    @property
    def source_id(self) -> str | None:
        return self.candidate.source_id if self.candidate is not None else None


@dataclass(frozen=True, slots=True)
class Wait:
    """No candidate is ready for the current strategy, but evaluation is still running."""


@dataclass(frozen=True, slots=True)
class Requeue:
    """Every usable candidate is at its reader cap: wait ``delay`` seconds, list the sources again
    (feeding them through :meth:`Planner.add_candidate`), then call :meth:`Planner.requeue` first."""

    delay: float
    #: how many capacity waits this load has made, this one included
    wait_number: int


@dataclass(frozen=True, slots=True)
class Done:
    loaded: bool
    reason: str


Step = Attempt | Wait | Requeue | Done


class Planner:
    def __init__(
        self,
        strategies: Sequence[StrategySlot],
        rank: RankKey,
        *,
        max_attempts: int = 64,
        capacity_waits: int = 0,
        capacity_delay: Callable[[int, float], float] = lambda waits_made, waited: 0.0,
    ) -> None:
        if not strategies:
            raise ValueError("at least one strategy is required")
        self._strategies = tuple(strategies)
        self._rank = rank
        self._max_attempts = max_attempts
        self._capacity_waits = capacity_waits
        self._capacity_delay = capacity_delay
        #: sources full this round (refused us, or listed at their cap), and the first peer
        #: strategy that met one: where a requeued round starts again
        self._full: set[str] = set()
        self._full_from: int | None = None
        self.capacity_waits_made = 0
        self._first_wait_at: float | None = None
        self._now = 0.0
        #: refusals for capacity: attempts in the report, not counted toward ``max_attempts``
        self.refusals = 0
        self._index = 0
        self._known: dict[str, Candidate] = {}
        self._keys: dict[str, tuple[float, ...]] = {}
        # Candidates not yet tried by the current strategy, best first; entries
        # for forgotten or tried sources are dropped lazily when popped.
        self._heap: list[tuple[tuple[float, ...], str]] = []
        self._heap_index = -1
        self._forgotten: set[str] = set()
        self._tried: set[tuple[int, str | None]] = set()
        self._evaluating = True
        self._pending: Attempt | None = None
        self._retry: Attempt | None = None
        self._done: Done | None = None
        self._first_try: dict[tuple[int, str | None], float] = {}
        self.attempts_total = 0

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

    @property
    def evaluating(self) -> bool:
        return self._evaluating

    def attempts_left(self) -> int:
        """How many first attempts the plan could still make, the pending one included.

        The untried, unforgotten candidates of the current peer strategy, plus one
        for every peerless strategy (the Hub) after it: what a load's remaining
        budget is shared among.
        """
        pending = self._pending
        index = pending.strategy_index if pending is not None else self._index
        left = 1 if pending is not None else 0
        if index < len(self._strategies) and self._strategies[index].uses_peers:
            left += sum(
                1
                for sid in self._known
                if sid not in self._forgotten
                and (index, sid) not in self._tried
                and (pending is None or sid != pending.source_id)
            )
        left += sum(1 for slot in self._strategies[index + 1 :] if not slot.uses_peers)
        return max(1, left)

    @property
    def candidates_known(self) -> int:
        return len(self._known)

    def record(self, action: Action) -> None:
        """Apply the policy's action for the attempt last returned by :meth:`next_step`."""
        attempt = self._pending
        if attempt is None:
            raise RuntimeError("record() called without an attempt in progress")
        self._pending = None
        self.attempts_total += 1
        self._tried.add((attempt.strategy_index, attempt.source_id))
        if action.forget_source and attempt.source_id is not None:
            self._forgotten.add(attempt.source_id)
        if action.full and attempt.source_id is not None and action.kind is ActionKind.NEXT_CANDIDATE:
            self.refusals += 1
            self._mark_full(attempt.source_id, attempt.strategy_index)
        TRANSITIONS[action.kind](self, attempt, action)
        if self._done is None and self.attempts_counted >= self._max_attempts:
            self._done = Done(False, f"attempt limit {self._max_attempts} reached")

    @property
    def attempts_counted(self) -> int:
        """Attempts that count toward ``max_attempts``: all but the refusals for capacity."""
        return self.attempts_total - self.refusals

    def requeue(self) -> None:
        """Start a new round after a capacity wait: the full sources may be tried again, and the
        sources listed since (fed through :meth:`add_candidate` before or after this) with them."""
        self._tried = {(i, sid) for i, sid in self._tried if sid not in self._full}
        self._full.clear()
        if self._full_from is not None:
            self._index = min(self._index, self._full_from)
        self._full_from = None
        # records are listed afresh: their loads (and so their ranks) have changed
        self._known.clear()
        self._keys.clear()
        self._heap_index = -1
        self._evaluating = True

    def _mark_full(self, sid: str, strategy_index: int) -> None:
        self._full.add(sid)
        if self._full_from is None or strategy_index < self._full_from:
            self._full_from = strategy_index

    def decision_state(self, now: float) -> DecisionState:
        """What the policy may know about the pending attempt, ``now`` being the caller's clock."""
        attempt = self._pending
        if attempt is None:
            raise RuntimeError("decision_state() called without an attempt in progress")
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
        self._retry = Attempt(
            attempt.strategy,
            attempt.strategy_index,
            attempt.candidate,
            attempt.attempt_number + 1,
            action.delay,
        )

    def _next_strategy(self, attempt: Attempt, action: Action) -> None:
        self._index = max(self._index, attempt.strategy_index + 1)

    def _next_candidate(self, attempt: Attempt, action: Action) -> None:
        """Nothing to change: the pair is marked tried, the next pop skips it."""

    # -- output ---------------------------------------------------------------

    def next_step(self, now: float = 0.0) -> Step:
        """The next step; ``now`` (the caller's clock) starts the elapsed time of a new pair and
        measures how long the load has waited for capacity."""
        self._now = now
        step = self._next_step()
        if isinstance(step, Attempt):
            self._first_try.setdefault((step.strategy_index, step.source_id), now)
        return step

    def _next_step(self) -> Step:
        if self._done is not None:
            return self._done
        if self._pending is not None:
            raise RuntimeError("next_step() called before the previous attempt was recorded")
        if self._retry is not None:
            self._pending, self._retry = self._retry, None
            return self._pending
        while self._index < len(self._strategies):
            slot = self._strategies[self._index]
            if not slot.uses_peers:
                if self._full and self.capacity_waits_made < self._capacity_waits:
                    return self._wait_for_capacity()
                if (self._index, None) not in self._tried:
                    self._pending = Attempt(slot.name, self._index, None)
                    return self._pending
            else:
                best = self._pop_best()
                if best is not None:
                    self._pending = Attempt(slot.name, self._index, best)
                    return self._pending
                if self._evaluating:
                    return Wait()
            self._index += 1
        if self._full and self.capacity_waits_made < self._capacity_waits:
            return self._wait_for_capacity()
        self._done = Done(False, EXHAUSTED)
        return self._done

    def _wait_for_capacity(self) -> Requeue:
        if self._first_wait_at is None:
            self._first_wait_at = self._now
        delay = self._capacity_delay(self.capacity_waits_made, self._now - self._first_wait_at)
        self.capacity_waits_made += 1
        # until requeue(): no step but this one (the driver waits and lists again)
        self._evaluating = True
        return Requeue(delay, self.capacity_waits_made)

    def _pop_best(self) -> Candidate | None:
        if self._heap_index != self._index:
            self._heap = [(self._keys[sid], sid) for sid in self._known]
            heapq.heapify(self._heap)
            self._heap_index = self._index
        while self._heap:
            _, sid = heapq.heappop(self._heap)
            if sid in self._forgotten or sid in self._full or (self._index, sid) in self._tried:
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
