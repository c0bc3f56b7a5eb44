"""Striped loads: the pure part planner (property tests) and the striped driver on the fake fabric.

The fabric is real sources, registry and target on the public fake RDMA
network (which really copies bytes); the real-process versions of these
scenarios live in ``test_nixl_striping.py``.
"""

from __future__ import annotations

import io
import itertools
import re
from typing import Any

import anyio
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mx_orchestrator import ModelIdentity, Policy, SourceState
from mx_orchestrator.outcomes import Corrupt, LayoutMismatch, SourceFailed, Superseded, TimedOut
from mx_orchestrator.parts import Part, PartPlanner
from mx_orchestrator.progress import ProgressDisplay
from mx_orchestrator.target import Target
from tests.fabric import fabric as shared_fabric

IDENTITY = ModelIdentity("acme/striped")
TENSORS = 24


def weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return {f"layer.{i}.weight": torch.randn(256 + 64 * (i % 5), 16, generator=g) for i in range(TENSORS)}


def fabric(*specs: tuple[str, str], **faults: dict[str, Any]) -> Any:
    return shared_fabric(IDENTITY, weights, *specs, **faults)


def assert_equal_weights(target: Target) -> None:
    for name, tensor in weights().items():
        assert torch.equal(target.tensors()[name], tensor), name


def assert_parts_cover_once(report: Any, total: int) -> None:
    """Loaded parts never overlap and add up to the model exactly once."""
    ranges = report.landed_ranges()
    assert sum(end - start for start, end in ranges) == total
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(ranges))


# -- the driver on the fake fabric ------------------------------------------------------


async def test_three_sources_share_a_striped_load_and_the_parts_cover_the_model_once() -> None:
    async with fabric(("a", "arena"), ("b", "arena"), ("c", "arena"), b={"read_delay": 0.01}) as f:
        target = Target("arena")
        report = await f.load(target, stripe=3, min_part_bytes=4096)
    assert report.loaded, report.reason
    assert_equal_weights(target)
    assert_parts_cover_once(report, target.nbytes)
    data = report.to_dict()
    assert data["bytes"] == target.nbytes and data["stripe"] == 3 and data["verified"]
    assert len(data["sources"]) >= 2, data["bytes_by_source"]
    assert target.bytes_written == target.nbytes  # nothing was read twice
    assert all(a["part"] is not None and a["range"] is not None for a in data["attempts"])


async def test_a_source_dying_mid_part_costs_only_its_part() -> None:
    async with fabric(("a", "arena"), ("b", "arena"), a={"die_mid_read": True}) as f:
        target = Target("arena")
        report = await f.load(target, stripe=2, min_part_bytes=4096)
        state = (await f.registry.get("a")).state  # type: ignore[union-attr]
    assert report.loaded
    assert_equal_weights(target)
    failed = [a for a in report.attempts if isinstance(a.outcome, SourceFailed)]
    assert len(failed) == 1 and failed[0].marked_stale and failed[0].outcome.source_id == "a"
    assert state is SourceState.STALE
    assert_parts_cover_once(report, target.nbytes)
    # the dead source got exactly one part, and no part of it landed from "a"
    assert {a.outcome.source_id for a in report.loaded_parts()} == {"b"}


async def test_a_frozen_source_times_out_at_its_part_deadline_and_others_take_its_bytes() -> None:
    policy = Policy(stall_floor=0.3, stall_rate=1e9)
    async with fabric(("frozen", "arena"), ("b", "arena"), ("c", "arena"), frozen={"frozen": True}) as f:
        target = Target("arena")
        orchestrator = f.orchestrator(stripe=3, min_part_bytes=4096, hedge=False, policy=policy)
        report = await orchestrator.load(IDENTITY, target)
    assert report.loaded
    assert_equal_weights(target)
    timed_out = [a for a in report.attempts if isinstance(a.outcome, TimedOut)]
    assert len(timed_out) == 1 and timed_out[0].marked_stale
    assert 0.3 <= timed_out[0].outcome.seconds < 2.0
    assert target.bytes_written == target.nbytes
    assert_parts_cover_once(report, target.nbytes)


async def test_a_stalled_part_is_hedged_and_the_stalled_source_loses_and_is_released() -> None:
    policy = Policy(stall_floor=0.1, stall_rate=1e9)
    async with fabric(("frozen", "arena"), ("b", "arena"), frozen={"frozen": True}) as f:
        target = Target("arena")
        report = await f.load(target, stripe=2, min_part_bytes=4096, policy=policy, attempt_timeout=30)
    assert report.loaded
    assert_equal_weights(target)
    lost = [a for a in report.attempts if a.outcome.source_id == "frozen"]
    assert len(lost) == 1 and isinstance(lost[0].outcome, TimedOut)
    assert "superseded by a hedge" in lost[0].outcome.detail and lost[0].marked_stale
    assert report.seconds < 5  # the hedge, not the 30 s part deadline, ended it
    hedge = [a for a in report.loaded_parts() if a.byte_range == lost[0].byte_range]
    assert len(hedge) == 1 and hedge[0].outcome.source_id == "b"
    assert_parts_cover_once(report, target.nbytes)


async def test_a_hedge_lost_to_a_slow_original_is_superseded_and_never_stale() -> None:
    # the original is slow (1.5 s) but not stalled: the hedge on the other source is slower still
    async with fabric(
        ("slow", "arena"), ("slower", "arena"), slow={"read_delay": 0.6}, slower={"read_delay": 2.0}
    ) as f:
        target = Target("arena")
        report = await f.load(target, stripe=2, min_part_bytes=1 << 30, policy=Policy(stall_rate=1e9))
    assert report.loaded
    superseded = [a for a in report.attempts if isinstance(a.outcome, Superseded)]
    assert all(not a.marked_stale for a in superseded)
    assert all(not a.marked_stale for a in report.attempts)
    assert_parts_cover_once(report, target.nbytes)


async def test_a_corrupt_tensor_under_stripe_2_re_reads_only_that_tensor_from_the_other_source() -> None:
    async with fabric(("liar", "arena"), ("honest", "arena")) as f:
        _, served = f.sources["liar"]
        victim = next(iter(served.tensors))
        served.tensors[victim].view(torch.uint8)[0] ^= 0xFF  # served bytes differ from the manifest
        target = Target("arena")
        report = await f.load(target, stripe=2, min_part_bytes=4096)
        state = (await f.registry.get("liar")).state  # type: ignore[union-attr]
    assert report.loaded
    assert_equal_weights(target)
    corrupt = [a for a in report.attempts if isinstance(a.outcome, Corrupt)]
    assert len(corrupt) == 1 and corrupt[0].marked_stale and corrupt[0].outcome.bad_tensors == (victim,)
    assert state is SourceState.STALE
    victim_bytes = weights()[victim].numel() * 4
    assert target.bytes_written == target.nbytes + victim_bytes  # only the bad tensor came twice
    reread = [a for a in report.loaded_parts() if a.byte_range[1] - a.byte_range[0] == victim_bytes]
    assert any(a.outcome.source_id == "honest" for a in reread)


async def test_mixed_layouts_stripe_region_and_tensor_parts_and_the_mismatch_moves_nothing() -> None:
    async with fabric(("arena-src", "arena"), ("chunked-src", "chunked:4096")) as f:
        target = Target("arena")
        report = await f.load(target, stripe=2, min_part_bytes=4096)
        state = (await f.registry.get("chunked-src")).state  # type: ignore[union-attr]
    assert report.loaded
    assert_equal_weights(target)
    mismatches = [a for a in report.attempts if isinstance(a.outcome, LayoutMismatch)]
    assert mismatches and all(a.outcome.bytes_moved == 0 and not a.marked_stale for a in mismatches)
    assert {a.outcome.source_id for a in mismatches} == {"chunked-src"}
    by_strategy = {a.outcome.source_id: a.outcome.strategy for a in report.loaded_parts()}
    assert by_strategy.get("arena-src") == "rdma_region"
    assert by_strategy.get("chunked-src") == "rdma_tensor"
    assert state is SourceState.READY
    assert_parts_cover_once(report, target.nbytes)


async def test_the_progress_display_shows_the_aggregate_and_each_sources_rate() -> None:
    stream = io.StringIO()
    display = ProgressDisplay(enabled=True, delay=0.0, stream=stream)
    async with fabric(("a", "arena"), ("b", "arena"), a={"read_delay": 0.01}, b={"read_delay": 0.01}) as f:
        target = Target("arena")
        orchestrator = f.orchestrator(stripe=2, min_part_bytes=4096, observers=[display])
        report = await orchestrator.load(IDENTITY, target, progress=display)
    assert report.loaded
    assert re.fullmatch(r"2 sources: a [0-9.]+ GB/s, b [0-9.]+ GB/s", display.label), display.label


async def test_stripe_larger_than_the_sources_uses_the_ones_there_are() -> None:
    async with fabric(("only", "arena")) as f:
        target = Target("arena")
        report = await f.load(target, stripe=8, min_part_bytes=4096)
    assert report.loaded and report.to_dict()["sources"] == ["only"]
    assert_parts_cover_once(report, target.nbytes)


async def test_every_source_failing_leaves_an_empty_target_and_a_failed_load() -> None:
    async with fabric(
        ("a", "arena"), ("b", "arena"), a={"die_mid_read": True}, b={"die_mid_read": True}
    ) as f:
        target = Target("arena")
        report = await f.load(target, stripe=2, min_part_bytes=4096)
    assert not report.loaded and target.buffers is None
    assert {a.outcome.name for a in report.attempts} == {"SourceFailed"}


# -- the pure part planner -----------------------------------------------------------


sizes_strategy = st.lists(st.integers(min_value=0, max_value=5000), min_size=1, max_size=40)
events = st.lists(
    st.tuples(st.sampled_from(["take", "hedge", "land", "fail", "corrupt", "supersede"]), st.integers(0, 99)),
    max_size=200,
)


@settings(max_examples=300, deadline=None)
@given(sizes=sizes_strategy, workers=st.integers(1, 4), script=events, min_part=st.integers(1, 6000))
def test_the_part_planner_never_overlaps_never_re_plans_landed_bytes_and_terminates(
    sizes: list[int], workers: int, script: list[tuple[str, int]], min_part: int
) -> None:
    planner = PartPlanner(sizes, workers, min_part_bytes=min_part, max_attempts=60)
    in_flight: list[Part] = []
    landed_before: set[int] = set()
    now = 0.0
    for kind, pick in script:
        now += 1.0
        if kind == "take":
            part = planner.take(f"s{pick % workers}", now)
            if part is not None:
                assert part.nbytes >= 0 and part.first < part.stop
                assert not set(part.tensors) & landed_before  # never re-plans a landed tensor
                in_flight.append(part)
        elif kind == "hedge":
            part = planner.hedge(f"s{pick % 7}", now, lambda p: 0.0)
            if part is not None:
                assert part.hedge_of in {p.index for p in in_flight}
                in_flight.append(part)
        elif in_flight:
            part = in_flight.pop(pick % len(in_flight))
            if kind == "land":
                twin = planner.landed(part)
                if twin is not None:
                    other = next(p for p in in_flight if p.index == twin)
                    in_flight.remove(other)
                    planner.superseded(other)
            elif kind == "corrupt":
                bad = [i for i in part.tensors if (i + pick) % 3 == 0]
                twin = planner.landed(part, bad)
                if twin is not None:
                    other = next(p for p in in_flight if p.index == twin)
                    in_flight.remove(other)
                    planner.superseded(other)
            elif kind == "supersede" and part.hedge_of is not None:
                in_flight.append(part)  # only a landed twin supersedes; keep it
            else:
                planner.failed(part)
        landed_now = set(planner.landed_tensors())
        assert landed_before <= landed_now  # landed tensors stay landed
        landed_before = landed_now
        assert planner.landed_bytes <= planner.total_bytes
        # no unassigned tensor is also landed or in flight as an original
        pending = {i for first, stop in planner.pending() for i in range(first, stop)}
        assert not pending & landed_now
        assert not pending & {i for p in in_flight for i in p.tensors}
        assert planner.attempts <= 60
    # whatever happened, finishing every part in flight and then taking until nothing is left ends
    for part in list(in_flight):
        in_flight.remove(part)
        if planner.twin_of(part) is None or all(p.index != planner.twin_of(part) for p in in_flight):
            planner.failed(part)
        else:
            planner.superseded(part)
    steps = 0
    while (part := planner.take("s0", now)) is not None:
        planner.landed(part)
        steps += 1
        assert steps <= 60
    assert planner.done or planner.exhausted


@settings(max_examples=200, deadline=None)
@given(sizes=sizes_strategy, workers=st.integers(1, 4), min_part=st.integers(1, 6000))
def test_parts_handed_out_in_turn_cover_the_model_exactly_once(
    sizes: list[int], workers: int, min_part: int
) -> None:
    planner = PartPlanner(sizes, workers, min_part_bytes=min_part, max_attempts=10_000)
    parts = []
    while (part := planner.take("s", 0.0)) is not None:
        parts.append(part)
        planner.landed(part)
    assert planner.done
    assert [i for p in parts for i in p.tensors] == list(range(len(sizes)))
    assert sum(p.nbytes for p in parts) == sum(sizes)
    assert all(a.end == b.start for a, b in itertools.pairwise(parts))


def test_parts_start_large_and_shrink_so_a_fast_source_ends_up_with_more() -> None:
    planner = PartPlanner([1000] * 100, 2, min_part_bytes=1000)
    sizes = []
    while (part := planner.take("s", 0.0)) is not None:
        sizes.append(part.nbytes)
        planner.landed(part)
    assert sizes[0] == 25_000 and sizes[-1] == 1000 and sizes == sorted(sizes, reverse=True)


def test_a_failed_part_returns_whole_and_a_corrupt_one_only_its_bad_tensors() -> None:
    planner = PartPlanner([10] * 10, 1, min_part_bytes=50)
    first = planner.take("a", 0.0)
    assert first is not None and list(first.tensors) == [0, 1, 2, 3, 4]
    planner.landed(first, bad=[2])
    assert planner.pending() == [(2, 3), (5, 10)]
    second = planner.take("b", 0.0)
    assert second is not None and list(second.tensors) == [2]
    planner.failed(second)
    assert planner.pending() == [(2, 3), (5, 10)]


def test_a_hedge_is_only_offered_when_nothing_is_unassigned_and_never_to_the_owner() -> None:
    planner = PartPlanner([10] * 2, 1, min_part_bytes=1000)
    part = planner.take("a", 0.0)
    assert part is not None and planner.pending() == []
    assert planner.hedge("a", 10.0, lambda p: 1.0) is None
    assert planner.hedge("b", 0.5, lambda p: 1.0) is None
    assert planner.next_hedge_time("b", lambda p: 1.0) == 1.0
    hedge = planner.hedge("b", 1.0, lambda p: 1.0)
    assert hedge is not None and hedge.hedge_of == part.index
    assert planner.hedge("c", 5.0, lambda p: 1.0) is None  # one hedge per part
    assert planner.landed(hedge) == part.index
    planner.superseded(part)
    assert planner.done


@pytest.mark.parametrize("workers", [0, -1])
def test_the_part_planner_refuses_nonsense(workers: int) -> None:
    with pytest.raises(ValueError):
        PartPlanner([1], workers)


@settings(max_examples=300, deadline=None)
@given(
    sizes=sizes_strategy,
    holdings=st.lists(st.frozensets(st.integers(0, 39)), min_size=1, max_size=4),
    rarity_seed=st.lists(st.integers(0, 5), min_size=40, max_size=40),
    max_part=st.integers(1, 9000),
    rotation=st.integers(0, 1000),
)
def test_a_partial_source_is_given_only_what_it_holds_rarest_first_and_nothing_is_read_twice(
    sizes: list[int], holdings: list[frozenset[int]], rarity_seed: list[int], max_part: int, rotation: int
) -> None:
    """Parts for partial sources (issue 24): a part holds only tensors its source holds, starts at
    the rarest unassigned one the source holds, stays under the size cap unless it is one tensor;
    a source holding nothing unassigned gets nothing; whole sources then finish the model, and
    every tensor lands exactly once."""
    planner = PartPlanner(sizes, 2, min_part_bytes=1, max_part_bytes=max_part, rotation=rotation)
    rarity = rarity_seed[: len(sizes)]
    landed: list[int] = []
    for _ in range(3):
        for held in holdings:
            pending = {i for first, stop in planner.pending() for i in range(first, stop)}
            part = planner.take("partial", 0.0, held, rarity)
            if part is None:
                assert not pending & held and not planner.holds_any(held)
                continue
            assert set(part.tensors) <= held
            assert rarity[part.first] == min(rarity[i] for i in pending & held)
            assert part.nbytes <= max_part or part.stop - part.first == 1
            landed.extend(part.tensors)
            planner.landed(part)
    while (part := planner.take("whole", 0.0, None, rarity)) is not None:
        landed.extend(part.tensors)
        planner.landed(part)
    assert planner.done and sorted(landed) == list(range(len(sizes)))


def test_without_holdings_or_rarity_a_load_reads_the_model_in_order() -> None:
    planner = PartPlanner([10] * 20, 1, min_part_bytes=10, max_part_bytes=30, rotation=7)
    firsts = []
    while (part := planner.take("s", 0.0)) is not None:
        firsts.append(part.first)
        planner.landed(part)
    assert firsts == sorted(firsts) and firsts[0] == 0


@pytest.mark.parametrize("checking", [1.9, 2.5])
async def test_a_hedge_of_a_part_whose_bytes_already_arrived_loses_whatever_ends_first(
    checking: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Source a's first part arrives at once but its check takes ``checking`` seconds; b reads the
    other parts (0.6 s each), then, idle, hedges a's part: its copy arrives (about 1.86 s) while
    a's part is still being checked. a's part is the one that lands, b's hedge is superseded, and
    a is not blamed for the time its own reader spent checking (before: a's part, its bytes
    already in, was cancelled as "slow" and b's copy landed). The other ordering, a's check ending
    while a hedge is still in flight mid-load, once landed the bytes twice: the real-process fan-out
    test's byte count pins it."""
    from mx_orchestrator import peer

    real = peer.verify_landed

    checked: list[str] = []

    async def slow_on_a(plan: Any, target: Any, ctx: Any, *args: Any) -> Any:
        if ctx.source_id == "a" and "a" not in checked:
            checked.append("a")
            await anyio.sleep(checking)
        return await real(plan, target, ctx, *args)

    monkeypatch.setattr(peer, "verify_landed", slow_on_a)
    async with fabric(("a", "arena"), ("b", "arena"), b={"read_delay": 0.6}) as f:
        target = Target("arena")
        half = target_bytes() // 2
        report = await f.load(target, stripe=2, min_part_bytes=half, policy=Policy(stall_rate=1e9))
    assert report.loaded
    assert_equal_weights(target)
    assert_parts_cover_once(report, target.nbytes)
    hedges = [a for a in report.attempts if isinstance(a.outcome, Superseded)]
    assert [h.outcome.source_id for h in hedges] == ["b"]
    assert not any(a.marked_stale for a in report.attempts)
    assert sorted(a.outcome.source_id for a in report.loaded_parts()) == ["a", "b", "b"]


def target_bytes() -> int:
    return sum(t.numel() * t.element_size() for t in weights().values())
