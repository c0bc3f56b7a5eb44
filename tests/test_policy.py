"""The policy engine: the default table, overrides, tenacity-based retries, and its invariants."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import tenacity
from hypothesis import given, settings
from hypothesis import strategies as st

from mx_orchestrator import (
    ALL_OUTCOME_TYPES,
    DEFAULT_POLICY,
    ActionKind,
    Candidate,
    DecisionState,
    ModelIdentity,
    Outcome,
    Policy,
    TimedOut,
)
from mx_orchestrator.outcomes import (
    Cancelled,
    Corrupt,
    LayoutMismatch,
    Loaded,
    LocalFailure,
    ManifestMismatch,
    NotApplicable,
    PartNotHeld,
    SourceBusy,
    SourceFailed,
    SourceUnreachable,
    Superseded,
)
from mx_orchestrator.plan import Attempt, Done, Planner, Requeue, StrategySlot, Wait
from mx_orchestrator.policy import NEVER_STALE, Action, next_candidate, retry
from mx_orchestrator.selection import rendezvous
from mx_orchestrator.testing import make_record

EXPECTED = {
    Loaded: (ActionKind.FINISH, False),
    LayoutMismatch: (ActionKind.NEXT_CANDIDATE, False),
    ManifestMismatch: (ActionKind.NEXT_CANDIDATE, False),
    NotApplicable: (ActionKind.NEXT_STRATEGY, False),
    SourceUnreachable: (ActionKind.NEXT_CANDIDATE, False),
    SourceBusy: (ActionKind.NEXT_CANDIDATE, False),
    PartNotHeld: (ActionKind.NEXT_CANDIDATE, False),
    Superseded: (ActionKind.NEXT_CANDIDATE, False),
    SourceFailed: (ActionKind.NEXT_CANDIDATE, True),
    TimedOut: (ActionKind.NEXT_CANDIDATE, True),
    Corrupt: (ActionKind.NEXT_CANDIDATE, True),
    LocalFailure: (ActionKind.NEXT_STRATEGY, False),
    Cancelled: (ActionKind.ABORT, False),
}


def make(outcome_type: type[Outcome], source: str | None = "src") -> Outcome:
    if outcome_type is TimedOut:  # a deadline long enough to be evidence of a stall
        return TimedOut(strategy="s", source_id=source, detail="x", deadline=60.0)
    return outcome_type(strategy="s", source_id=source, detail="x")


def test_the_table_covers_every_outcome_type() -> None:
    assert set(EXPECTED) == set(ALL_OUTCOME_TYPES)


@pytest.mark.parametrize("outcome_type", ALL_OUTCOME_TYPES, ids=lambda t: t.__name__)
def test_default_action_for_each_outcome(outcome_type: type[Outcome]) -> None:
    action = DEFAULT_POLICY.decide(make(outcome_type), DecisionState())
    assert (action.kind, action.mark_stale) == EXPECTED[outcome_type]


def test_unreachable_counts_toward_ejection_without_marking_stale() -> None:
    action = DEFAULT_POLICY.decide(make(SourceUnreachable), DecisionState())
    assert action.report_unreachable and not action.mark_stale and action.forget_source


def test_layout_mismatch_keeps_the_source_for_later_strategies_but_failures_drop_it() -> None:
    assert not DEFAULT_POLICY.decide(make(LayoutMismatch), DecisionState()).forget_source
    assert DEFAULT_POLICY.decide(make(ManifestMismatch), DecisionState()).forget_source
    assert DEFAULT_POLICY.decide(make(SourceFailed), DecisionState()).forget_source


def test_user_override_retries_timeouts_with_tenacity_backoff_then_gives_up() -> None:
    policy = DEFAULT_POLICY.with_rules(
        {TimedOut: retry(wait=tenacity.wait_fixed(0.25), stop=tenacity.stop_after_attempt(3))}
    )
    first = policy.decide(make(TimedOut), DecisionState(attempt_number=1))
    second = policy.decide(make(TimedOut), DecisionState(attempt_number=2))
    third = policy.decide(make(TimedOut), DecisionState(attempt_number=3))
    assert (first.kind, first.delay) == (ActionKind.RETRY, 0.25)
    assert second.kind is ActionKind.RETRY
    assert (third.kind, third.mark_stale) == (ActionKind.NEXT_CANDIDATE, True)
    # the default table is untouched by the override
    assert DEFAULT_POLICY.decide(make(TimedOut), DecisionState()).kind is ActionKind.NEXT_CANDIDATE


def test_exponential_backoff_grows_and_stop_after_delay_uses_elapsed() -> None:
    rule = retry(wait=tenacity.wait_exponential(multiplier=0.1, max=1.0), stop=tenacity.stop_after_delay(5))
    delays = [rule(make(SourceFailed), DecisionState(attempt_number=n)).delay for n in (1, 2, 3, 4, 5)]
    assert delays == sorted(delays) and delays[-1] == 1.0
    late = rule(make(SourceFailed), DecisionState(attempt_number=2, elapsed=6.0))
    assert late.kind is ActionKind.NEXT_CANDIDATE


def test_a_rule_that_marks_a_layout_mismatch_stale_is_overruled() -> None:
    policy = DEFAULT_POLICY.with_rules({LayoutMismatch: next_candidate(mark_stale=True)})
    action = policy.decide(make(LayoutMismatch), DecisionState())
    assert not action.mark_stale
    assert "STALE suppressed" in action.reason


def test_attempt_limit_turns_any_continuation_into_abort() -> None:
    policy = Policy(max_attempts=3)
    assert policy.decide(make(SourceFailed), DecisionState(attempts_total=3)).kind is ActionKind.ABORT
    assert policy.decide(make(Loaded), DecisionState(attempts_total=3)).kind is ActionKind.FINISH


# -- property tests -----------------------------------------------------------

outcome_types = st.sampled_from(ALL_OUTCOME_TYPES)
kinds = st.sampled_from(list(ActionKind))


@st.composite
def arbitrary_rules(draw: st.DrawFn) -> dict[type[Outcome], object]:
    """User rules that return anything at all, STALE marks included."""
    rules: dict[type[Outcome], object] = {}
    for outcome_type in draw(st.lists(outcome_types, unique=True)):
        kind = draw(kinds)
        stale = draw(st.booleans())
        delay = draw(st.floats(min_value=-1, max_value=5, allow_nan=False))

        def rule(
            o: Outcome, s: DecisionState, kind: ActionKind = kind, stale: bool = stale, d: float = delay
        ) -> Action:
            return Action(kind, mark_stale=stale, delay=d)

        rules[outcome_type] = rule
    return rules


@settings(max_examples=300, deadline=None)
@given(
    outcome_type=outcome_types,
    rules=arbitrary_rules(),
    attempt_number=st.integers(1, 100),
    total=st.integers(1, 200),
)
def test_never_stale_outcomes_never_mark_stale_whatever_the_rules(
    outcome_type: type[Outcome], rules: dict[type[Outcome], object], attempt_number: int, total: int
) -> None:
    policy = DEFAULT_POLICY.with_rules(rules)  # type: ignore[arg-type]
    action = policy.decide(make(outcome_type), DecisionState(attempt_number, total))
    if outcome_type in NEVER_STALE:
        assert not action.mark_stale and not action.report_unreachable
    assert action.delay >= 0


@settings(max_examples=300, deadline=None)
@given(
    n_strategies=st.integers(1, 4),
    n_candidates=st.integers(0, 12),
    outcomes=st.lists(outcome_types, min_size=1, max_size=50),
    rules=arbitrary_rules(),
    max_attempts=st.integers(1, 40),
    capacity_waits=st.integers(0, 5),
    listed_full=st.sets(st.integers(0, 11)),
)
def test_every_run_terminates_within_the_attempt_bound(
    n_strategies: int,
    n_candidates: int,
    outcomes: list[type[Outcome]],
    rules: dict[type[Outcome], object],
    max_attempts: int,
    capacity_waits: int,
    listed_full: set[int],
) -> None:
    """Drive the planner with the policy and an arbitrary (cycled) outcome sequence, sources
    listed at their cap and refusals for capacity included: counted attempts stay within
    ``max_attempts``, refusals within one per (strategy, source) a round, rounds within
    ``capacity_waits``."""
    from dataclasses import replace as with_fields

    identity = ModelIdentity("org/m")
    policy = Policy(max_attempts=max_attempts, capacity_waits=capacity_waits).with_rules(rules)  # type: ignore[arg-type]
    slots = [StrategySlot(f"s{i}", uses_peers=i % 2 == 0) for i in range(n_strategies)]
    planner = Planner(
        slots,
        rendezvous("t"),
        max_attempts=max_attempts,
        capacity_waits=capacity_waits,
        capacity_delay=policy.capacity_delay,
    )
    records = [make_record(identity, f"c{i}") for i in range(n_candidates)]
    records = [
        with_fields(r, max_readers=1, load=1) if i in listed_full else r for i, r in enumerate(records)
    ]

    def evaluate() -> None:
        for record in records:
            planner.add_candidate(Candidate(record))
        planner.evaluation_finished()

    evaluate()
    steps = requeues = 0
    while True:
        step = planner.next_step()
        assert not isinstance(step, Wait), "no waiting once evaluation has finished"
        if isinstance(step, Done):
            break
        if isinstance(step, Requeue):
            requeues += 1
            assert step.wait_number == requeues <= capacity_waits and step.delay >= 0
            planner.requeue()
            evaluate()
            continue
        assert isinstance(step, Attempt)
        outcome = outcomes[steps % len(outcomes)](strategy=step.strategy, source_id=step.source_id)
        action = policy.decide(outcome, planner.decision_state(0.0))
        planner.record(action)
        steps += 1
        assert planner.attempts_counted <= max_attempts
        assert planner.refusals <= (requeues + 1) * n_strategies * n_candidates
    assert planner.attempts_total == steps
    assert planner.attempts_counted <= max_attempts


def _busy_round(planner: Planner, step: Attempt) -> None:
    planner.record(DEFAULT_POLICY.decide(make(SourceBusy, step.source_id), planner.decision_state(0.0)))


def test_when_every_source_is_full_the_plan_waits_for_capacity_before_the_hub(
    identity: ModelIdentity,
) -> None:
    """Refused (or listed full) peers are never forgotten: the plan waits, lists again, tries them
    again; the Hub comes only after the capacity waits run out."""
    from dataclasses import replace as with_fields

    policy = Policy(capacity_waits=2)
    planner = Planner(
        [StrategySlot("rdma_region"), StrategySlot("hf_download", uses_peers=False)],
        rendezvous("t"),
        capacity_waits=policy.capacity_waits,
        capacity_delay=policy.capacity_delay,
    )
    planner.add_candidate(Candidate(make_record(identity, "a")))
    planner.add_candidate(Candidate(with_fields(make_record(identity, "full"), max_readers=2, load=2)))
    planner.evaluation_finished()
    step = planner.next_step()
    assert isinstance(step, Attempt) and step.source_id == "a"  # the one listed full gets no attempt
    _busy_round(planner, step)
    wait = planner.next_step()
    assert isinstance(wait, Requeue) and wait.wait_number == 1 and 0 <= wait.delay <= 1.0
    planner.requeue()
    planner.add_candidate(Candidate(make_record(identity, "a")))
    planner.add_candidate(Candidate(make_record(identity, "full")))  # a slot freed meanwhile
    planner.evaluation_finished()
    tried = set()
    for _ in range(2):
        step = planner.next_step()
        assert isinstance(step, Attempt) and step.strategy == "rdma_region"
        tried.add(step.source_id)
        _busy_round(planner, step)
    assert tried == {"a", "full"}
    assert isinstance(planner.next_step(), Requeue)
    planner.requeue()
    planner.add_candidate(Candidate(make_record(identity, "a")))
    planner.evaluation_finished()
    step = planner.next_step()
    assert isinstance(step, Attempt) and step.source_id == "a"
    _busy_round(planner, step)
    hub = planner.next_step()  # the waits are spent: the Hub
    assert isinstance(hub, Attempt) and hub.strategy == "hf_download"
    assert planner.attempts_counted == 0 and planner.refusals == 4


def test_capacity_waits_grow_with_full_jitter_and_stay_under_the_cap() -> None:
    delays = [DEFAULT_POLICY.capacity_delay(n) for n in range(12) for _ in range(20)]
    assert all(0.0 <= d <= 1.0 for d in delays)
    assert len(set(delays)) > 100  # jittered: a fleet's retries do not line up
    # after five minutes in the queue, waits stretch to at most a tenth of the time waited
    patient = [DEFAULT_POLICY.capacity_delay(50, 300.0) for _ in range(200)]
    assert all(0.0 <= d <= 30.0 for d in patient) and max(patient) > 10.0
    broken = Policy(capacity_backoff=lambda state: float("nan"))  # type: ignore[arg-type]
    assert broken.capacity_delay(3) == 0.0
    assert 0.0 <= broken.capacity_delay(3, 100.0) <= 10.0


def test_not_applicable_for_one_candidate_moves_to_the_next_candidate_never_stale() -> None:
    from mx_orchestrator.policy import ActionKind as Kind

    whole = DEFAULT_POLICY.decide(NotApplicable(strategy="cuda_ipc"), DecisionState())
    one = DEFAULT_POLICY.decide(NotApplicable(strategy="cuda_ipc", candidate_only=True), DecisionState())
    assert whole.kind is Kind.NEXT_STRATEGY
    assert one.kind is Kind.NEXT_CANDIDATE and not one.mark_stale and not one.report_unreachable
    assert not one.forget_source  # another strategy may still use that source


@given(
    deadline=st.floats(allow_nan=False, allow_infinity=False, min_value=-1e9, max_value=1e9) | st.just(float("nan")),
    planned=st.integers(min_value=0, max_value=1 << 45),
    rule=st.sampled_from([next_candidate(mark_stale=True), next_candidate(report_unreachable=True),
                          retry(stop=tenacity.stop_after_attempt(1))]),
)  # fmt: skip
def test_a_target_s_own_short_deadline_never_blames_the_source(
    deadline: float, planned: int, rule: Any
) -> None:
    """Whatever the rule: a TimedOut marks STALE only with a deadline that is evidence of a stall."""
    policy = DEFAULT_POLICY.with_rules({TimedOut: rule})
    outcome = TimedOut(strategy="s", source_id="src", deadline=deadline, planned_bytes=planned)
    action = policy.decide(outcome, DecisionState())
    evidence = max(policy.stall_floor, planned / policy.stall_rate)
    if not deadline >= evidence:
        assert not action.mark_stale and not action.report_unreachable
    else:
        assert action.mark_stale or action.report_unreachable or action.kind is ActionKind.RETRY


def test_a_long_transfer_needs_a_longer_deadline_before_it_blames() -> None:
    sixteen_gb = TimedOut(strategy="s", source_id="src", deadline=60.0, planned_bytes=16 << 30)
    assert not DEFAULT_POLICY.decide(sixteen_gb, DecisionState()).mark_stale  # 60 s < 16 GiB at 50 MB/s
    assert DEFAULT_POLICY.decide(replace(sixteen_gb, deadline=400.0), DecisionState()).mark_stale


@given(
    remaining=st.floats(min_value=0.0, max_value=1e6) | st.just(float("inf")),
    left=st.integers(min_value=1, max_value=1000),
    timeout=st.floats(min_value=0.1, max_value=1e4),
)
def test_an_attempt_never_takes_more_than_its_share_of_the_load_deadline(
    remaining: float, left: int, timeout: float
) -> None:
    from mx_orchestrator.plan import attempt_budget

    budget = attempt_budget(remaining, left, timeout)
    assert 0.0 <= budget <= timeout and budget <= remaining
    if remaining != float("inf"):
        # every attempt still has its share (with room for rounding in subnormal floats)
        assert budget * left <= remaining * (1 + 1e-9) + 1e-300


def test_attempts_left_counts_untried_candidates_and_later_peerless_strategies(
    identity: ModelIdentity,
) -> None:
    planner = Planner(
        [StrategySlot("rdma_region"), StrategySlot("hf_download", uses_peers=False)], rendezvous("t")
    )
    for i in range(3):
        planner.add_candidate(Candidate(make_record(identity, f"c{i}")))
    step = planner.next_step()
    assert isinstance(step, Attempt)
    assert planner.attempts_left() == 4  # this attempt, two more candidates, the Hub
    planner.record(next_candidate()(make(SourceFailed, step.source_id), DecisionState()))
    planner.next_step()
    assert planner.attempts_left() == 3


def test_a_full_source_is_never_stale_nor_reported_whatever_the_rule() -> None:
    for rule in (next_candidate(mark_stale=True), next_candidate(report_unreachable=True), retry()):
        action = DEFAULT_POLICY.with_rules({SourceBusy: rule}).decide(make(SourceBusy), DecisionState())
        assert not action.mark_stale and not action.report_unreachable
    default = DEFAULT_POLICY.decide(make(SourceBusy), DecisionState())
    assert default.full and not default.forget_source


@settings(max_examples=200, deadline=None)
@given(rules=arbitrary_rules(), attempt_number=st.integers(1, 50), total=st.integers(1, 500))
def test_a_full_source_is_never_stale_nor_reported_nor_ejected_whatever_the_rules(
    rules: dict[type[Outcome], object], attempt_number: int, total: int
) -> None:
    """Property: whatever rule a user installs for any outcome, a SourceBusy never marks STALE and
    never counts toward ejection (the registry ejects only on reports or STALE marks)."""
    action = DEFAULT_POLICY.with_rules(rules).decide(  # type: ignore[arg-type]
        make(SourceBusy), DecisionState(attempt_number, total)
    )
    assert not action.mark_stale and not action.report_unreachable


def test_sources_reconsidered_after_the_plan_moved_past_every_strategy_are_tried_again(
    identity: ModelIdentity,
) -> None:
    """A source refused for another content is tried again once that content proved false, even
    when the plan had moved past every strategy meanwhile; pairs tried before stay tried."""
    from mx_orchestrator.outcomes import ManifestMismatch

    planner = Planner(
        [StrategySlot("rdma_region", parts=True), StrategySlot("rdma_tensor", parts=True)], rendezvous("t")
    )
    for sid in ("liar", "honest"):
        planner.add_candidate(Candidate(make_record(identity, sid)))
    planner.evaluation_finished()
    first = planner.next_step()
    assert isinstance(first, Attempt)
    planner.admitted(first)
    second = planner.next_step()
    assert isinstance(second, Attempt)
    planner.admitted(second)
    liar, honest = (first, second) if first.source_id == "liar" else (second, first)
    planner.record(DEFAULT_POLICY.decide(make(ManifestMismatch, "honest"), DecisionState()), honest)
    assert isinstance(planner.next_step(), Wait)  # only the liar's session is left, in flight
    planner.reconsider({"honest"})
    planner.record(DEFAULT_POLICY.decide(make(SourceFailed, "liar"), DecisionState()), liar)
    again = planner.next_step()
    assert isinstance(again, Attempt) and again.source_id == "honest"
    assert isinstance(planner.next_step(), Wait)


def test_a_striped_load_refused_while_it_reads_elsewhere_lists_again_before_asking_another_source(
    identity: ModelIdentity,
) -> None:
    """The loads a listing showed go stale fast in a fleet: a load reading from one source that
    was refused by a second lists again (at most every ``relist_interval``) before it asks a
    third, instead of walking a chain of refusals; after the listing it asks again at once. A part
    session is handed out only once the one before it was admitted (sessions asked at once all
    choose from one listing). A load reading from no one (its first refusal) goes on down its list
    as before."""
    from mx_orchestrator.plan import Relist

    planner = Planner.of(
        [StrategySlot("rdma_region", parts=True)], rendezvous("t"), DEFAULT_POLICY, readers=3
    )
    for sid in ("a", "b", "c", "d"):
        planner.add_candidate(Candidate(make_record(identity, sid)))
    planner.evaluation_finished()  # listed at 0
    reading = planner.next_step(0.0)
    assert isinstance(reading, Attempt)
    assert planner.next_step(0.0) == Wait()  # one lease asked at a time
    planner.admitted(reading)
    refused = planner.next_step(0.0)
    assert isinstance(refused, Attempt)
    planner.record(DEFAULT_POLICY.decide(make(SourceBusy, refused.source_id), DecisionState()), refused)
    due = DEFAULT_POLICY.relist_interval
    assert planner.next_step(due / 2) == Wait(until=due)  # not another source from the stale listing
    assert isinstance(planner.next_step(due), Relist)
    assert isinstance(planner.next_step(due), Wait)  # while the listing is in flight
    for sid in ("a", "b", "c", "d"):
        planner.add_candidate(Candidate(make_record(identity, sid)))
    planner.evaluation_finished()
    after = planner.next_step(due)
    assert isinstance(after, Attempt) and after.source_id not in {reading.source_id, refused.source_id}

    alone = Planner.of([StrategySlot("rdma_region", parts=True)], rendezvous("t"), DEFAULT_POLICY, readers=3)
    for sid in ("a", "b"):
        alone.add_candidate(Candidate(make_record(identity, sid)))
    alone.evaluation_finished()
    first = alone.next_step(0.0)
    assert isinstance(first, Attempt)
    alone.record(DEFAULT_POLICY.decide(make(SourceBusy, first.source_id), DecisionState()), first)
    second = alone.next_step(0.0)
    assert isinstance(second, Attempt) and second.source_id != first.source_id


def test_a_load_reading_from_no_one_refused_twice_from_one_listing_waits_for_capacity(
    identity: ModelIdentity,
) -> None:
    """At a fleet's start every target's first listing shows the same few sources, free by the
    listing and full by the time it asks: after ``STALE_AFTER_REFUSALS`` refusals with no session
    of its own, a load waits for capacity (jittered, counted toward the bound) and lists again,
    instead of asking the rest of that listing; after the wait it tries them all again."""
    from mx_orchestrator.plan import STALE_AFTER_REFUSALS

    planner = Planner.of(
        [StrategySlot("rdma_region", parts=True)], rendezvous("t"), DEFAULT_POLICY, readers=3
    )
    names = [f"s{i}" for i in range(6)]
    for sid in names:
        planner.add_candidate(Candidate(make_record(identity, sid)))
    planner.evaluation_finished()
    asked = []
    for _ in range(STALE_AFTER_REFUSALS):
        step = planner.next_step(0.0)
        assert isinstance(step, Attempt)
        asked.append(step.source_id)
        planner.record(DEFAULT_POLICY.decide(make(SourceBusy, step.source_id), DecisionState()), step)
    wait = planner.next_step(0.0)
    assert isinstance(wait, Requeue) and wait.wait_number == 1
    assert planner.refusals == STALE_AFTER_REFUSALS and planner.attempts_counted == 0
    planner.requeue()
    for sid in names:
        planner.add_candidate(Candidate(make_record(identity, sid)))
    planner.evaluation_finished()
    again = planner.next_step(0.0)
    assert isinstance(again, Attempt) and again.source_id in names
