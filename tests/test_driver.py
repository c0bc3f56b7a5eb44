"""The one load driver on the fake fabric, on virtual time: exact timelines for hedges, failover and
capacity waits, and the rules every mode keeps (``stripe`` 1 and 3 alike).

The fabric is real sources, registry and target on the public fake RDMA network
(which really copies bytes). The loop is :class:`~mx_orchestrator.testing.clock.VirtualClockLoop`
with worker threads accounted: allocation and verification take no virtual
time, so every figure asserted below is the driver's own decision, exactly.
"""

from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Any

import pytest
import tenacity
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mx_orchestrator import ModelIdentity, Policy, SourceState
from mx_orchestrator.outcomes import Loaded, ManifestMismatch, SourceFailed, SourceUnreachable, TimedOut
from mx_orchestrator.parts import HEDGE_FACTOR, HEDGE_FLOOR
from mx_orchestrator.report import LoadReport
from mx_orchestrator.target import Target
from mx_orchestrator.testing import publish_junk
from mx_orchestrator.testing.clock import run_on_virtual_time, virtual_wall_clock
from tests.fabric import fabric as shared_fabric

IDENTITY = ModelIdentity("acme/driven")
TENSORS = 24
STRIPES = [1, 3]


def weights(seed: int = 11) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"layer.{i}.weight": torch.randn(256 + 64 * (i % 5), 16, generator=g) for i in range(TENSORS)}


def fabric(*specs: Any, **faults: Any) -> Any:
    return shared_fabric(IDENTITY, weights, *specs, clock=virtual_wall_clock, **faults)


def ranked_first(prefix: str) -> Any:
    """A selection policy ranking the sources whose id starts with ``prefix`` first, by id."""
    return lambda _target: lambda c: (0.0 if c.source_id.startswith(prefix) else 1.0, c.source_id)


def assert_equal_weights(target: Target, seed: int = 11) -> None:
    for name, tensor in weights(seed).items():
        assert torch.equal(target.tensors()[name], tensor), name


def assert_parts_cover_once(report: LoadReport, total: int) -> None:
    ranges = report.landed_ranges()
    assert sum(end - start for start, end in ranges) == total
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(ranges))


@pytest.mark.parametrize("stripe", STRIPES)
def test_a_stalled_part_is_hedged_at_the_stall_with_stripe_1_and_at_twice_its_expected_time_when_striped(
    stripe: int,
) -> None:
    """One part (the whole model) from a frozen source. With one reader, another source joins only
    once the read is a stall (the policy's evidence, 1 s); striped, an idle reader hedges it at
    twice its expected time (the floor, 0.2 s). Either way the hedge lands at once, the frozen
    read is cancelled then, and nothing else takes time."""
    policy = Policy(stall_floor=1.0, stall_rate=1e12)  # a part is expected to take ~0 s

    async def main() -> tuple[LoadReport, Target, SourceState | None]:
        async with fabric(("frozen", "arena"), ("b", "arena"), frozen={"frozen": True}) as f:
            target = Target("arena")
            report = await f.load(target, stripe=stripe, min_part_bytes=1 << 30, rank_window=0, policy=policy)
            return report, target, f.registry.state_of("frozen")

    report, target, state = run_on_virtual_time(main)
    assert report.loaded
    assert_equal_weights(target)
    when = 1.0 if stripe == 1 else max(HEDGE_FLOOR, HEDGE_FACTOR * 0.0)
    assert report.seconds == pytest.approx(when, abs=1e-9)
    lost = [a for a in report.attempts if a.outcome.source_id == "frozen"]
    assert len(lost) == 1 and isinstance(lost[0].outcome, TimedOut) and lost[0].outcome.slow
    assert lost[0].wall_seconds == pytest.approx(when, abs=1e-9)
    won = report.loaded_parts()
    assert [a.outcome.source_id for a in won] == ["b"] and won[0].byte_range == lost[0].byte_range
    # a second in flight for the policy's whole stall evidence: stale; 0.2 s of it: only reported slow
    assert lost[0].marked_stale == (stripe == 1) and (state is SourceState.STALE) == (stripe == 1)
    assert target.bytes_written == target.nbytes
    assert_parts_cover_once(report, target.nbytes)


@pytest.mark.parametrize("stripe", STRIPES)
def test_a_source_killed_after_half_the_model_costs_the_load_only_the_rest(stripe: int) -> None:
    """Failover per part in every mode: the source dies inside the read that crosses half the
    model; what landed before stays, the rest comes from the other source, and the target's own
    accounting shows at most one part read twice."""
    total = sum(t.numel() * 4 for t in weights().values())
    # one reader reads half the model first; three share it, so the dying one has less to serve
    kill_at = total // 2 if stripe == 1 else total // 8

    async def main() -> tuple[LoadReport, Target, SourceState | None]:
        async with fabric(("dies", "arena"), ("b", "arena"), dies={"die_after_bytes": kill_at}) as f:
            target = Target("arena")
            report = await f.load(target, stripe=stripe, min_part_bytes=4096, rank_window=0)
            return report, target, f.registry.state_of("dies")

    report, target, state = run_on_virtual_time(main)
    assert report.loaded
    assert_equal_weights(target)
    assert state is SourceState.STALE
    failed = [a for a in report.attempts if isinstance(a.outcome, SourceFailed)]
    assert len(failed) == 1 and failed[0].marked_stale and failed[0].byte_range is not None
    landed_from_dead = sum(
        e - s for a in report.loaded_parts() if a.outcome.source_id == "dies" for s, e in a.landed
    )
    if stripe == 1:
        assert landed_from_dead >= total // 4  # the first (largest) part landed before the death
    biggest = max(e - s for a in report.attempts if a.byte_range for s, e in [a.byte_range])
    assert target.bytes_written <= target.nbytes + biggest
    assert_parts_cover_once(report, target.nbytes)
    assert all(a.byte_range is not None for a in report.attempts)  # every attempt here read a part


@pytest.mark.parametrize("stripe", STRIPES)
def test_a_full_source_is_waited_for_exactly_as_the_policy_says_and_then_loads(stripe: int) -> None:
    """The only source admits one reader and another holds it for 4 s: the load waits for capacity
    (0.5 s a wait, listing again each time), never falls back nor blames, and loads at the first
    listing after the slot freed."""
    policy = Policy(capacity_backoff=tenacity.wait_fixed(0.5), capacity_patience=0.0)

    async def main() -> tuple[LoadReport, Target, SourceState | None]:
        async with fabric(("only", "arena", {"max_readers": 1})) as f:
            record = await f.registry.get("only")
            assert record is not None
            assert await f.registry.lease_reader("only", record.generation, "someone-else", 4.0)
            target = Target("arena")
            report = await f.load(target, stripe=stripe, min_part_bytes=4096, rank_window=0, policy=policy)
            return report, target, f.registry.state_of("only")

    report, target, state = run_on_virtual_time(main)
    assert report.loaded and state is SourceState.READY
    assert_equal_weights(target)
    assert report.capacity_waits in (8, 9)  # the lease ends at 4.0 s: the listing at 4.0 or 4.5 s
    assert report.seconds == pytest.approx(0.5 * report.capacity_waits, abs=1e-9)
    assert all(isinstance(a.outcome, Loaded) for a in report.attempts)  # listed full: no attempt


@pytest.mark.parametrize("stripe", STRIPES)
def test_junk_records_that_outnumber_the_honest_source_never_shape_the_target(stripe: int) -> None:
    """Five records publishing the honest manifest relabelled (F32 -> I32) with garbage connection
    metadata, all ranked first: each costs one refused connect, none allocates, the honest source
    loads the model; no count of records decides what the target holds."""

    async def main() -> tuple[LoadReport, Target]:
        async with fabric(("honest", "arena")) as f:
            honest = await f.registry.get("honest")
            manifest = await f.registry.get_manifest("honest", honest.generation)  # type: ignore[union-attr]
            assert honest is not None and manifest is not None
            relabelled = replace(manifest, tensors=tuple(replace(t, dtype="I32") for t in manifest.tensors))
            await publish_junk(f.registry, "honest", 5, manifest=relabelled)
            orchestrator = f.orchestrator(stripe=stripe, min_part_bytes=4096, rank_window=0.01)
            orchestrator.selection = ranked_first("junk")
            target = Target("arena")
            return await orchestrator.load(IDENTITY, target), target

    report, target = run_on_virtual_time(main)
    assert report.loaded, report.reason
    assert_equal_weights(target)
    assert target.allocations == [target.nbytes]  # allocated once, for the honest manifest
    junk = [a for a in report.attempts if (a.outcome.source_id or "").startswith("junk")]
    assert junk and all(isinstance(a.outcome, SourceUnreachable) and a.outcome.bytes_moved == 0 for a in junk)
    assert {a.outcome.source_id for a in report.loaded_parts()} == {"honest"}


@pytest.mark.parametrize("stripe", STRIPES)
def test_two_revisions_of_one_model_are_never_spliced(stripe: int) -> None:
    """Sources of two revisions with the same names, dtypes and shapes: the load reads every byte
    from one content (the first source that answered); the other revision is a ManifestMismatch,
    never STALE, and the bytes equal that one revision exactly."""

    async def main() -> tuple[LoadReport, Target, SourceState | None]:
        other = {"weights": lambda: weights(seed=12)}  # its own values, published with their checksums
        async with fabric(("a", "arena"), ("rev-b", "arena", other), ("b", "arena"), ("c", "arena")) as f:
            target = Target("arena")
            report = await f.load(target, stripe=stripe, min_part_bytes=4096, rank_window=0.01)
            return report, target, f.registry.state_of("rev-b")

    report, target, state = run_on_virtual_time(main)
    assert report.loaded
    assert_equal_weights(target, seed=11)  # exactly revision A, no tensor of B
    assert "rev-b" not in report.bytes_by_source()
    assert sorted(map(sorted, report.manifest_disagreement.values())) == [["a", "b", "c"], ["rev-b"]]
    assert state is SourceState.READY
    refused = [a for a in report.attempts if a.outcome.source_id == "rev-b"]
    if stripe > 1:  # with one reader, A served it all before rev-b's turn
        assert refused and all(
            isinstance(a.outcome, ManifestMismatch) and not a.marked_stale for a in refused
        )


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    revisions=st.lists(st.sampled_from([11, 12]), min_size=2, max_size=4),
    stripe=st.integers(1, 3),
    min_part=st.sampled_from([4096, 32768, 1 << 30]),
)
def test_a_verified_load_is_exactly_one_published_content_whatever_the_sources_serve(
    revisions: list[int], stripe: int, min_part: int
) -> None:
    """Property: sources serving either of two revisions (same names, dtypes, shapes), ranked in
    any order, any stripe: a loaded, verified target holds exactly one revision, never a splice."""
    specs = [
        (f"s{i}", "arena", {"weights": lambda seed=seed: weights(seed)}) for i, seed in enumerate(revisions)
    ]

    async def main() -> tuple[LoadReport, Target]:
        async with fabric(*specs) as f:
            target = Target("arena")
            return await f.load(target, stripe=stripe, min_part_bytes=min_part, rank_window=0.01), target

    report, target = run_on_virtual_time(main)
    assert report.loaded and report.to_dict()["verified"]
    loaded = target.tensors()
    matches = [seed for seed in (11, 12) if all(torch.equal(loaded[n], t) for n, t in weights(seed).items())]
    assert len(matches) == 1, "the bytes are a splice of two revisions"
    served = {f"s{i}": seed for i, seed in enumerate(revisions)}
    assert {served[sid] for sid in report.bytes_by_source()} == set(matches)
    assert all(not a.marked_stale for a in report.attempts)  # another revision is nobody's fault


@pytest.mark.parametrize("stripe", [2, 3])
def test_the_report_blames_the_liar_and_only_the_liar_and_observers_see_every_record(stripe: int) -> None:
    """A liar among honest sources, striped: the liar's Corrupt part carries the STALE mark, no honest
    part does, and every attempt record reached the observers exactly as it is in the report."""
    from mx_orchestrator import LoadObserver
    from mx_orchestrator.outcomes import Corrupt
    from mx_orchestrator.report import AttemptRecord

    class Seen(LoadObserver):
        def __init__(self) -> None:
            self.records: list[AttemptRecord] = []

        def attempt_done(self, record: AttemptRecord) -> None:
            self.records.append(record)

    seen = Seen()

    async def main() -> tuple[LoadReport, Target, SourceState | None]:
        async with fabric(("a", "arena"), ("liar", "arena"), ("c", "arena")) as f:
            _, served = f.sources["liar"]
            for tensor in served.tensors.values():  # every tensor differs from the published checksums
                tensor.view(torch.uint8)[0] ^= 0xFF
            target = Target("arena")
            orchestrator = f.orchestrator(
                stripe=stripe, min_part_bytes=4096, rank_window=0.01, observers=[seen]
            )
            return await orchestrator.load(IDENTITY, target), target, f.registry.state_of("liar")

    report, target, state = run_on_virtual_time(main)
    assert report.loaded
    assert_equal_weights(target)
    assert state is SourceState.STALE
    stale = [a for a in report.attempts if a.marked_stale]
    assert stale and all(a.outcome.source_id == "liar" and isinstance(a.outcome, Corrupt) for a in stale)
    assert all(not a.marked_stale for a in report.attempts if a.outcome.source_id != "liar")
    assert seen.records == report.attempts


@pytest.mark.parametrize("stripe", STRIPES)
def test_every_fault_at_once_costs_only_what_it_must_in_every_mode(stripe: int) -> None:
    """A chunked source (layout mismatch: read by tensor instead), a record with a malformed advert
    (unreachable, counted toward ejection), a source that dies mid-read (STALE), one whose bytes fail
    their checksums (Corrupt, STALE) and an honest one: the load completes from what is sound, the
    mismatch is never STALE, and every byte range lands exactly once."""

    async def main() -> tuple[LoadReport, Target, dict[str, SourceState | None]]:
        async with fabric(
            ("chunked", "chunked:4096"), ("dies", "arena"), ("liar", "arena"), ("honest", "arena"),
            dies={"die_mid_read": True},
        ) as f:  # fmt: skip
            _, served = f.sources["liar"]
            for tensor in served.tensors.values():
                tensor.view(torch.uint8)[0] ^= 0xFF
            honest = await f.registry.get("honest")
            assert honest is not None
            broken = replace(honest, source_id="broken", generation="b1", transport={"nixl_regions": "[[1,2"})
            await f.registry.publish(broken, await f.registry.get_manifest("honest", honest.generation))
            orchestrator = f.orchestrator(stripe=stripe, min_part_bytes=4096, rank_window=0.01)
            order = {"broken": 0.0, "dies": 1.0, "liar": 2.0, "chunked": 3.0, "honest": 4.0}
            orchestrator.selection = lambda _t: lambda c: (order.get(c.source_id, 9.0),)
            target = Target("arena")
            report = await orchestrator.load(IDENTITY, target)
            states = {sid: f.registry.state_of(sid) for sid in order}
            return report, target, states

    report, target, states = run_on_virtual_time(main)
    assert report.loaded, report.reason
    assert_equal_weights(target)
    assert_parts_cover_once(report, target.nbytes)
    by_source = {sid: [a for a in report.attempts if a.outcome.source_id == sid] for sid in states}
    assert [a.outcome.name for a in by_source["broken"]] == ["SourceUnreachable"]
    assert by_source["broken"][0].outcome.bytes_moved == 0 and not by_source["broken"][0].marked_stale
    assert states["dies"] is SourceState.STALE and states["liar"] is SourceState.STALE
    assert states["chunked"] is SourceState.READY and states["honest"] is SourceState.READY
    assert all(not a.marked_stale for a in by_source["chunked"] + by_source["honest"])
    assert not any(a.outcome.name == "Loaded" for a in by_source["dies"] + by_source["liar"])


def test_a_source_that_keeps_losing_hedges_is_reported_slow_never_stale_on_one_load_and_ejected_across_loads() -> (
    None
):
    """A slow source (not stalled) loses the hedge race on each load: each loss is a slow report,
    never a STALE mark; the third load's report ejects it (the registry's threshold), Envoy-style."""
    policy = Policy(stall_floor=30.0)  # nothing here is long enough to be a stall

    async def main() -> list[SourceState | None]:
        states = []
        async with fabric(("slow", "arena"), ("fast", "arena"), slow={"read_delay": 5.0}) as f:
            for load in range(3):
                target = Target("arena")
                orchestrator = f.orchestrator(stripe=2, min_part_bytes=1 << 30, rank_window=0, policy=policy)
                orchestrator.target_id = f"target-{load}"
                report = await orchestrator.load(IDENTITY, target)
                assert report.loaded
                lost = [a for a in report.attempts if a.outcome.source_id == "slow"]
                assert len(lost) == 1 and isinstance(lost[0].outcome, TimedOut) and lost[0].outcome.slow
                assert lost[0].action.report_unreachable and not lost[0].action.mark_stale
                assert lost[0].marked_stale == (load == 2)  # the report that ejected it says so
                states.append(f.registry.state_of("slow"))
        return states

    assert run_on_virtual_time(main) == [SourceState.READY, SourceState.READY, SourceState.STALE]


@pytest.mark.parametrize("stripe", STRIPES)
def test_a_flood_of_junk_records_never_spends_the_attempt_budget_nor_floods_the_registry(stripe: int) -> None:
    """300 records publishing the honest manifest with garbage connection metadata, all ranked before
    the honest source, against an attempt limit of 16: each costs one refused connect (not counted
    toward the limit), at most a few registry reports are written, and the honest source loads."""
    from mx_orchestrator.sourcing import REPORTS_PER_LOAD

    async def main() -> tuple[LoadReport, Target, int]:
        async with fabric(("honest", "arena")) as f:
            await publish_junk(f.registry, "honest", 300)
            orchestrator = f.orchestrator(
                stripe=stripe, min_part_bytes=4096, rank_window=0.01, policy=Policy(max_attempts=16)
            )
            orchestrator.selection = ranked_first("junk")
            target = Target("arena")
            before = len(f.registry.calls)
            report = await orchestrator.load(IDENTITY, target)
            reports = sum(1 for op, _ in f.registry.calls[before:] if op == "report_unreachable")
            return report, target, reports

    report, target, reports = run_on_virtual_time(main)
    assert report.loaded, report.reason
    assert_equal_weights(target)
    junk = report.to_dict()["junk"]
    assert junk["refused_connects"] == 300 and junk["reports_written"] == reports <= REPORTS_PER_LOAD
    assert junk["reports_skipped"] == 300 - reports
    assert {a.outcome.source_id for a in report.loaded_parts()} == {"honest"}


def test_a_junk_record_whose_manifest_cannot_land_here_is_its_own_problem_not_the_load_s() -> None:
    """A record publishing 70,000 tensors beside the honest source, into a ``tensor`` target (one
    region per tensor): the limits agree, nothing ends the load as a local failure, the honest
    source loads; a checkpoint that size can be laid out in every layout."""
    from mx_orchestrator.testing import make_manifest

    huge = make_manifest(IDENTITY, [(f"t.{i}", "F32", (1,)) for i in range(70_000)])
    for layout in ("tensor", "chunked:4096", "arena"):
        assert len(Target(layout).plan_for(huge).tensors) == 70_000

    async def main() -> tuple[LoadReport, Target]:
        async with fabric(("honest", "tensor")) as f:
            await publish_junk(f.registry, "honest", 1, manifest=huge, prefix="huge")
            orchestrator = f.orchestrator(min_part_bytes=4096, rank_window=0.05)
            orchestrator.selection = ranked_first("huge")
            target = Target("tensor")
            return await orchestrator.load(IDENTITY, target), target

    report, target = run_on_virtual_time(main)
    assert report.loaded, report.reason
    assert_equal_weights(target)
    assert not any(a.outcome.name == "LocalFailure" for a in report.attempts)


def test_a_striped_load_gives_back_its_sessions_leases_together_in_one_registry_call() -> None:
    """Three sources read at once (stripe 3): each session takes its lease with one call, and when
    the load is decided the three go back in one ``release_readers`` call (a fleet's registry
    sees s + 1 lease calls a load, not 2 s); no source is left with a reader."""

    async def main() -> tuple[LoadReport, list[tuple[str, str]], dict[str, dict[str, float]]]:
        async with fabric(("a", "arena"), ("b", "arena"), ("c", "arena")) as f:
            target = Target("arena")
            report = await f.load(target, stripe=3, min_part_bytes=1, rank_window=0)
            readers = {r.source_id: r.readers for r in await f.registry.list(IDENTITY.key)}
            return report, list(f.registry.calls), readers

    report, calls, readers = run_on_virtual_time(main)
    assert report.loaded and sorted(report.bytes_by_source()) == ["a", "b", "c"]
    leases = [arg for op, arg in calls if op == "lease_reader"]
    given_back = [arg for op, arg in calls if op == "release_readers"]
    assert sorted(leases) == ["a", "b", "c"]
    assert len(given_back) == 1 and sorted(given_back[0].split(",")) == ["a", "b", "c"]
    assert readers == {"a": {}, "b": {}, "c": {}}
