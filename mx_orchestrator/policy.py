"""The policy engine: a pure function from (outcome, state) to the action to take.

Rules are small callables composed like tenacity's ``retry``/``wait``/``stop``
objects; a :class:`Policy` maps each outcome type to one rule and can be
overridden per type. Two guarantees hold whatever rules a user installs:

* outcomes in :data:`NEVER_STALE` never mark their source STALE (the rule from
  ModelExpress PR #246: a layout or manifest mismatch is a property of the
  *pair*, not a fault of the source; target-side failures are ours);
* the number of attempts in one load is bounded by ``Policy.max_attempts``.

Nothing here performs I/O, sleeps or reads a clock.
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

import tenacity
from tenacity.stop import stop_base
from tenacity.wait import wait_base

from .outcomes import (
    Cancelled,
    Corrupt,
    LayoutMismatch,
    Loaded,
    LocalFailure,
    ManifestMismatch,
    NotApplicable,
    Outcome,
    PartNotHeld,
    SourceBusy,
    SourceFailed,
    SourceUnreachable,
    Superseded,
    TimedOut,
)

__all__ = [
    "DEFAULT_POLICY",
    "DEFAULT_RULES",
    "NEVER_STALE",
    "Action",
    "ActionKind",
    "DecisionState",
    "Policy",
    "Rule",
    "abort",
    "finish",
    "next_candidate",
    "next_strategy",
    "retry",
]


class ActionKind(enum.Enum):
    FINISH = "finish"
    NEXT_CANDIDATE = "next_candidate"
    RETRY = "retry"
    NEXT_STRATEGY = "next_strategy"
    ABORT = "abort"


@dataclass(frozen=True, slots=True)
class Action:
    """What the pipeline must do next.

    ``forget_source`` removes the source from the rest of *this* load (later
    strategies will not try it); ``mark_stale`` also tells the registry, so
    other targets stop trying it. ``full``: the source refused a new reader for
    capacity; it is skipped for the rest of this round, and when every usable
    candidate is full the plan waits for capacity and lists the sources again
    (see :class:`~mx_orchestrator.plan.Requeue`) before it falls back.
    """

    kind: ActionKind
    mark_stale: bool = False
    forget_source: bool = False
    report_unreachable: bool = False
    delay: float = 0.0
    reason: str = ""
    full: bool = False
    #: whether the attempt counts toward ``max_attempts``: not a capacity refusal, nor a connect
    #: refused before any byte moved by a source the load then forgets (each source costs that
    #: once per round, so junk records cannot spend a load's attempt budget)
    counted: bool = True

    @property
    def label(self) -> str:
        """Short form used in reports, e.g. ``next_candidate`` or ``retry(0.10s)``."""
        if self.kind is ActionKind.RETRY:
            return f"retry({self.delay:.2f}s)"
        return str(self.kind.value)


@dataclass(frozen=True, slots=True)
class DecisionState:
    """What a rule may know besides the outcome.

    ``attempt_number`` counts attempts of the current strategy on the current
    source, this one included (1 for a first try); ``attempts_total`` counts
    every attempt of the load so far; ``elapsed`` is seconds since the first
    attempt on this (strategy, source) pair began.
    """

    attempt_number: int = 1
    attempts_total: int = 1
    elapsed: float = 0.0


Rule = Callable[[Outcome, DecisionState], Action]

#: Outcome types that never mark their source STALE, whatever the rule says.
NEVER_STALE: frozenset[type[Outcome]] = frozenset(
    {
        Loaded,
        LayoutMismatch,
        ManifestMismatch,
        LocalFailure,
        NotApplicable,
        Cancelled,
        SourceBusy,
        PartNotHeld,
        Superseded,
    }
)


def finish() -> Rule:
    def rule(outcome: Outcome, state: DecisionState) -> Action:
        return Action(ActionKind.FINISH, reason="loaded")

    return rule


def next_candidate(
    *,
    mark_stale: bool = False,
    forget: bool = False,
    report_unreachable: bool = False,
    full: bool = False,
    counted: bool = True,
) -> Rule:
    """Move on to the next candidate of the same strategy.

    ``report_unreachable`` counts the failure toward ejection in the registry
    (several targets' reports eject; one does not). ``full``: the source is at
    its reader cap; come back to it after a capacity wait (never a fault).
    """

    def rule(outcome: Outcome, state: DecisionState) -> Action:
        is_full = full and not (mark_stale or report_unreachable or forget)
        forgets = forget or mark_stale or report_unreachable
        return Action(
            ActionKind.NEXT_CANDIDATE,
            mark_stale=mark_stale,
            forget_source=forgets,
            report_unreachable=report_unreachable,
            reason=outcome.name,
            full=is_full,
            counted=not is_full and (counted or not forgets or outcome.bytes_moved > 0),
        )

    return rule


def next_strategy() -> Rule:
    def rule(outcome: Outcome, state: DecisionState) -> Action:
        return Action(ActionKind.NEXT_STRATEGY, reason=outcome.name)

    return rule


def next_strategy_or_candidate() -> Rule:
    """``NotApplicable``: the next strategy, or only the next candidate when the outcome says so."""
    strategy, candidate = next_strategy(), next_candidate()

    def rule(outcome: Outcome, state: DecisionState) -> Action:
        if getattr(outcome, "candidate_only", False):
            return candidate(outcome, state)
        return strategy(outcome, state)

    return rule


def abort() -> Rule:
    def rule(outcome: Outcome, state: DecisionState) -> Action:
        return Action(ActionKind.ABORT, reason=outcome.name)

    return rule


def _retry_call_state(state: DecisionState) -> tenacity.RetryCallState:
    # tenacity's wait/stop objects read attempt_number and seconds_since_start;
    # build the state they expect from ours, with no clock involved.
    call_state = tenacity.RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
    call_state.attempt_number = state.attempt_number
    call_state.start_time = 0.0
    call_state.outcome_timestamp = state.elapsed
    return call_state


def retry(
    *,
    wait: wait_base | None = None,
    stop: stop_base | None = None,
    otherwise: Rule | None = None,
) -> Rule:
    """Retry the same source with tenacity's ``wait`` between tries until ``stop`` says no.

    Defaults: exponential backoff from 50 ms capped at 2 s, two attempts in all,
    then ``otherwise`` (by default: next candidate, marking the source STALE).
    """
    wait_obj: wait_base = wait if wait is not None else tenacity.wait_exponential(multiplier=0.05, max=2.0)
    stop_obj: stop_base = stop if stop is not None else tenacity.stop_after_attempt(2)
    fallback = otherwise if otherwise is not None else next_candidate(mark_stale=True)

    def rule(outcome: Outcome, state: DecisionState) -> Action:
        call_state = _retry_call_state(state)
        if stop_obj(call_state):
            return fallback(outcome, state)
        return Action(ActionKind.RETRY, delay=float(wait_obj(call_state)), reason=outcome.name)

    return rule


DEFAULT_RULES: Mapping[type[Outcome], Rule] = MappingProxyType(
    {
        Loaded: finish(),
        LayoutMismatch: next_candidate(),
        ManifestMismatch: next_candidate(forget=True),
        NotApplicable: next_strategy_or_candidate(),
        SourceUnreachable: next_candidate(report_unreachable=True, counted=False),
        SourceBusy: next_candidate(full=True),
        PartNotHeld: next_candidate(full=True),
        SourceFailed: next_candidate(mark_stale=True),
        TimedOut: next_candidate(mark_stale=True),
        Corrupt: next_candidate(mark_stale=True),
        LocalFailure: next_strategy(),
        Superseded: next_candidate(),
        Cancelled: abort(),
    }
)


@dataclass(frozen=True)
class Policy:
    """A rule per outcome type plus the global attempt bound.

    >>> strict = DEFAULT_POLICY.with_rules({TimedOut: retry(stop=tenacity.stop_after_attempt(3))})
    """

    rules: Mapping[type[Outcome], Rule] = field(default_factory=lambda: DEFAULT_RULES)
    max_attempts: int = 64
    #: a ``TimedOut`` blames its source only if the attempt had at least this long ...
    stall_floor: float = 5.0
    #: ... and at least as long as its planned bytes take at this rate (bytes/s): anything
    #: shorter is the target's own deadline, not evidence that the source stalled
    stall_rate: float = 50e6
    #: when every usable candidate is at its reader cap: at most this many waits for capacity
    #: (each followed by a fresh listing, which finds sources republished meanwhile) before the
    #: plan moves on to the strategies after the peers (the Hub); the load deadline bounds them too
    capacity_waits: int = 120
    #: a striped load reading from fewer sources than its stripe lists again at most this often
    #: (seconds) while it reads: targets that began serving since join it (pipelined fan-out)
    relist_interval: float = 0.1
    #: how long the n-th capacity wait lasts (tenacity wait over the wait's number): full jitter
    #: spreads a fleet's retries, the cap keeps a freed slot from idling long
    capacity_backoff: wait_base = field(
        default_factory=lambda: tenacity.wait_random_exponential(multiplier=0.05, max=1.0)
    )
    #: ... and after a long wait, a wait may last up to this fraction of the time waited so far
    #: (full jitter): a load queued behind a busy seed for minutes looks every few seconds, not
    #: every second, costing it at most this fraction more time, and the registry far fewer calls
    capacity_patience: float = 0.1

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if not (math.isfinite(self.stall_floor) and self.stall_floor >= 0 and self.stall_rate > 0):
            raise ValueError("stall_floor must be finite and >= 0, stall_rate > 0")
        if self.capacity_waits < 0:
            raise ValueError("capacity_waits must be at least 0")
        if not (math.isfinite(self.capacity_patience) and self.capacity_patience >= 0):
            raise ValueError("capacity_patience must be finite and >= 0")

    def capacity_delay(self, waits_made: int, waited: float = 0.0) -> float:
        """Seconds before the (``waits_made`` + 1)-th listing when every candidate was full, after
        ``waited`` seconds of waiting for capacity so far."""
        delay = float(self.capacity_backoff(_retry_call_state(DecisionState(attempt_number=waits_made + 1))))
        patient = self.capacity_patience * max(0.0, waited) * random.random()
        delay = max(delay, patient) if delay >= 0 else patient  # a NaN from a user's wait object: ours
        return delay if math.isfinite(delay) else 0.0

    def stall_evidence(self, outcome: TimedOut) -> float:
        """The least deadline (seconds) after which a ``TimedOut`` may be blamed on its source."""
        return self.stall_seconds(outcome.planned_bytes)

    def stall_seconds(self, planned_bytes: int) -> float:
        """The least time without completion that is evidence of a stall, for ``planned_bytes``."""
        return max(self.stall_floor, planned_bytes / self.stall_rate)

    def with_rules(self, overrides: Mapping[type[Outcome], Rule]) -> Policy:
        merged = dict(self.rules)
        merged.update(overrides)
        return replace(self, rules=MappingProxyType(merged))

    def decide(self, outcome: Outcome, state: DecisionState) -> Action:
        rule = self.rules.get(type(outcome)) or DEFAULT_RULES[type(outcome)]
        action = rule(outcome, state)
        if (action.mark_stale or action.report_unreachable) and type(outcome) in NEVER_STALE:
            action = replace(
                action,
                mark_stale=False,
                report_unreachable=False,
                reason=f"{action.reason}; STALE suppressed: {outcome.name} is never the source's fault",
            )
        if isinstance(outcome, TimedOut) and (action.mark_stale or action.report_unreachable):
            needed = self.stall_evidence(outcome)
            if not outcome.deadline >= needed:  # NaN counts as no evidence
                # slow, not stalled: never STALE on one load's word, but the report counts toward
                # ejection, so a source slow across loads (and targets) is ejected, Envoy-style
                action = replace(
                    action,
                    mark_stale=False,
                    report_unreachable=outcome.slow,
                    reason=f"{action.reason}; STALE suppressed: the attempt had {outcome.deadline:.3g}s, "
                    f"less than the {needed:.3g}s that would show a stall"
                    + ("; reported as slow" if outcome.slow else ""),
                )
        if not action.delay >= 0:  # also catches NaN from a user's wait object
            action = replace(action, delay=0.0)
        if action.kind is not ActionKind.FINISH and state.attempts_total >= self.max_attempts:
            action = replace(
                action,
                kind=ActionKind.ABORT,
                reason=f"{action.reason}; attempt limit {self.max_attempts} reached",
            )
        return action


DEFAULT_POLICY = Policy()
