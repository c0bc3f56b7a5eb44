"""The pipeline, driven through the public fakes: scripted scenarios, deadlines, cancellation, concurrency.

Every test runs under both asyncio and trio (the ``backend`` fixture), except
those that wait on time: they run on trio's virtual clock (``virtual_clock``),
so a 10 s probe or a 0.3 s deadline costs no real time and timing assertions
read the virtual clock.
"""

from __future__ import annotations

import json

import anyio
import pytest

from mx_orchestrator import (
    DEFAULT_POLICY,
    LayoutMismatch,
    LoadObserver,
    LoadReport,
    ModelIdentity,
    Orchestrator,
    SourceFailed,
    SourceState,
    SourceUnreachable,
    TimedOut,
    least_loaded,
)
from mx_orchestrator.outcomes import LocalFailure, ManifestMismatch, NotApplicable
from mx_orchestrator.testing import (
    FakeProber,
    FakeRegistry,
    FakeStrategy,
    fail,
    make_manifest,
    make_record,
    scenario,
    succeed,
    wedge,
)
from tests.conftest import Runner


def test_mismatch_then_failure_then_success(identity: ModelIdentity, backend: Runner) -> None:
    """A: LayoutMismatch (stays READY), B: SourceFailed (STALE), C: Loaded (wins)."""

    async def main() -> None:
        registry, prober = await scenario(identity, ["a", "b", "c"])
        strategy = FakeStrategy(
            "rdma_region",
            {"a": [fail(LayoutMismatch)], "b": [fail(SourceFailed, nbytes=100)], "c": [succeed(nbytes=4096)]},
        )
        # force the order a, b, c so the scenario is the one described
        order = {"a": 0.0, "b": 1.0, "c": 2.0}
        orchestrator = Orchestrator(
            registry, [strategy], prober=prober, selection=lambda _t: lambda c: (order[c.source_id],)
        )
        report = await orchestrator.load(identity)

        assert report.loaded
        data = json.loads(report.to_json())
        assert [a["source"] for a in data["attempts"]] == ["a", "b", "c"]
        assert [a["outcome"] for a in data["attempts"]] == ["LayoutMismatch", "SourceFailed", "Loaded"]
        assert [a["marked_stale"] for a in data["attempts"]] == [False, True, False]
        assert data["attempts"][0]["bytes"] == 0
        assert (data["outcome"], data["source"], data["bytes"], data["verified"]) == (
            "loaded",
            "c",
            4096,
            True,
        )
        assert registry.state_of("a") is SourceState.READY
        assert registry.state_of("b") is SourceState.STALE
        assert registry.state_of("c") is SourceState.READY
        for key in ("model", "strategy", "seconds", "gbps", "evaluation_seconds"):
            assert key in data
        for key in ("strategy", "source", "outcome", "bytes", "seconds", "action", "marked_stale", "detail"):
            assert key in data["attempts"][0]

    backend(main)


def test_layout_mismatch_falls_through_to_the_next_strategy_on_the_same_source(
    identity: ModelIdentity,
    backend: Runner,
) -> None:
    async def main() -> None:
        registry, prober = await scenario(identity, ["only"])
        region = FakeStrategy("rdma_region", {"only": [fail(LayoutMismatch)]})
        tensor = FakeStrategy("rdma_tensor", {"only": [succeed()]})
        report = await Orchestrator(registry, [region, tensor], prober=prober).load(identity)
        assert report.loaded and report.final is not None
        assert report.final.strategy == "rdma_tensor"
        assert registry.state_of("only") is SourceState.READY

    backend(main)


def test_failed_source_is_not_offered_to_later_strategies(identity: ModelIdentity, backend: Runner) -> None:
    async def main() -> None:
        registry, prober = await scenario(identity, ["bad"])
        region = FakeStrategy("rdma_region", {"bad": [fail(SourceFailed)]})
        tensor = FakeStrategy("rdma_tensor", {"bad": [succeed()]})
        hub = FakeStrategy("hf_download", {None: [succeed()]}, uses_peers=False)
        report = await Orchestrator(registry, [region, tensor, hub], prober=prober).load(identity)
        assert tensor.calls == []
        assert report.final is not None and report.final.strategy == "hf_download"

    backend(main)


def test_falls_back_to_the_hub_when_every_peer_fails(identity: ModelIdentity, backend: Runner) -> None:
    async def main() -> None:
        registry, prober = await scenario(identity, ["p", "q"])
        region = FakeStrategy("rdma_region", default=fail(LayoutMismatch))
        tensor = FakeStrategy("rdma_tensor", default=fail(ManifestMismatch))
        hub = FakeStrategy("hf_download", {None: [succeed()]}, uses_peers=False)
        report = await Orchestrator(registry, [region, tensor, hub], prober=prober).load(identity)
        assert report.loaded
        assert [a.outcome.name for a in report.attempts][-1] == "Loaded"
        assert registry.state_of("p") is SourceState.READY and registry.state_of("q") is SourceState.READY

    backend(main)


def test_wedged_attempt_ends_in_timed_out_at_its_deadline(
    identity: ModelIdentity, virtual_clock: Runner
) -> None:
    async def main() -> None:
        registry, prober = await scenario(identity, ["stuck", "good"])
        strategy = FakeStrategy("rdma_region", {"stuck": [wedge()], "good": [succeed()]})
        order = {"stuck": 0.0, "good": 1.0}
        orchestrator = Orchestrator(
            registry,
            [strategy],
            prober=prober,
            attempt_timeout=8.0,  # longer than the policy's stall floor: a stall is evidence
            selection=lambda _t: lambda c: (order[c.source_id],),
        )
        began = anyio.current_time()
        report = await orchestrator.load(identity)
        elapsed = anyio.current_time() - began
        first = report.attempts[0]
        assert isinstance(first.outcome, TimedOut)
        assert 7.9 <= first.outcome.seconds < 8.5 and first.outcome.deadline == pytest.approx(8.0)
        assert first.marked_stale and registry.state_of("stuck") is SourceState.STALE
        assert report.loaded and elapsed < 9.0
        assert strategy.running == 0 and strategy.cancelled == 1

    virtual_clock(main)


def test_a_short_attempt_deadline_times_out_without_blaming_the_source(
    identity: ModelIdentity, virtual_clock: Runner
) -> None:
    async def main() -> None:
        registry, prober = await scenario(identity, ["slow", "good"])
        strategy = FakeStrategy("rdma_region", {"slow": [succeed(delay=1.0)], "good": [succeed()]})
        order = {"slow": 0.0, "good": 1.0}
        report = await Orchestrator(
            registry,
            [strategy],
            prober=prober,
            attempt_timeout=0.3,  # the target's own choice, shorter than the source needs
            selection=lambda _t: lambda c: (order[c.source_id],),
        ).load(identity)
        first = report.attempts[0]
        assert isinstance(first.outcome, TimedOut) and not first.marked_stale
        assert "STALE suppressed" in first.action.reason
        assert registry.state_of("slow") is SourceState.READY and report.loaded

    virtual_clock(main)


def test_cancelling_a_load_mid_attempt_leaves_nothing_running(
    identity: ModelIdentity, virtual_clock: Runner
) -> None:
    async def main() -> None:
        registry, _ = await scenario(identity, ["a", "b", "c"])
        prober = FakeProber(default_manifest=make_manifest(identity), latency={"a": 0.0, "b": 5.0, "c": 5.0})
        strategy = FakeStrategy("rdma_region", default=wedge())
        orchestrator = Orchestrator(registry, [strategy], prober=prober, attempt_timeout=30)
        with anyio.move_on_after(0.3) as scope:
            await orchestrator.load(identity)
        assert scope.cancelled_caught
        assert strategy.running == 0 and strategy.cancelled == 1
        assert prober.running == 0  # the slow probes were cancelled and awaited too

    virtual_clock(main)


def test_load_deadline_aborts_with_a_failed_report_not_an_exception(
    identity: ModelIdentity, virtual_clock: Runner
) -> None:
    async def main() -> None:
        registry, prober = await scenario(identity, ["a"])
        strategy = FakeStrategy("rdma_region", default=wedge())
        report = await Orchestrator(
            registry, [strategy], prober=prober, attempt_timeout=10, load_timeout=0.2
        ).load(identity)
        assert not report.loaded
        assert report.attempts[-1].outcome.name == "Cancelled"
        assert not report.attempts[-1].marked_stale
        assert registry.state_of("a") is SourceState.READY

    virtual_clock(main)


def test_hundred_candidates_with_100ms_probes_evaluate_concurrently(
    identity: ModelIdentity, virtual_clock: Runner
) -> None:
    async def main() -> None:
        ids = [f"s{i:03d}" for i in range(100)]
        registry, prober = await scenario(identity, ids, latency=0.1)
        strategy = FakeStrategy("rdma_region", default=fail(LayoutMismatch))
        report = await Orchestrator(registry, [strategy], prober=prober).load(identity)
        assert len(report.probes) == 100
        assert report.evaluation_seconds < 0.9  # serial would be 10 s; bench/evaluate.py has the figure
        # every mismatch moves on, and the policy's attempt bound stops the run
        assert len(strategy.calls) == DEFAULT_POLICY.max_attempts
        assert "attempt limit" in report.reason

    virtual_clock(main)


def test_first_attempt_starts_before_slow_probes_finish(
    identity: ModelIdentity, virtual_clock: Runner
) -> None:
    async def main() -> None:
        registry, _ = await scenario(identity, ["fast", "slow"])
        prober = FakeProber(default_manifest=make_manifest(identity), latency={"fast": 0.0, "slow": 1.0})
        strategy = FakeStrategy("rdma_region", {"fast": [succeed()]})
        began = anyio.current_time()
        report = await Orchestrator(registry, [strategy], prober=prober).load(identity)
        assert report.loaded and report.final is not None and report.final.source_id == "fast"
        assert anyio.current_time() - began < 0.5
        assert prober.running == 0

    virtual_clock(main)


def test_probe_failures_and_timeouts_are_reported_and_skipped(
    identity: ModelIdentity, virtual_clock: Runner
) -> None:
    async def main() -> None:
        registry, _ = await scenario(identity, ["broken", "slow", "ok"])
        prober = FakeProber(
            default_manifest=make_manifest(identity), failures=["broken"], latency={"slow": 10.0}
        )
        strategy = FakeStrategy("rdma_region", {"ok": [succeed(delay=0.5)]})
        report = await Orchestrator(registry, [strategy], prober=prober, probe_timeout=0.1).load(identity)
        assert report.loaded
        probes = {p.source: p for p in report.probes}
        assert not probes["broken"].ok and not probes["slow"].ok and "timed out" in probes["slow"].detail
        assert [c[0] for c in strategy.calls] == ["ok"]

    virtual_clock(main)


def test_registry_down_during_discovery_still_reaches_the_hub(
    identity: ModelIdentity, backend: Runner
) -> None:
    async def main() -> None:
        registry, prober = await scenario(identity, ["a"])
        registry.unavailable = True
        region = FakeStrategy("rdma_region", default=succeed())
        hub = FakeStrategy("hf_download", {None: [succeed()]}, uses_peers=False)
        report = await Orchestrator(registry, [region, hub], prober=prober).load(identity)
        assert report.loaded and report.final is not None and report.final.strategy == "hf_download"
        assert report.probes == [] and "fake registry is down" in (report.registry_error or "")
        assert report.to_dict()["registry_error"] == report.registry_error

    backend(main)


def test_registry_down_when_marking_stale_does_not_crash_the_load(
    identity: ModelIdentity, backend: Runner
) -> None:
    async def main() -> None:
        registry, prober = await scenario(identity, ["a", "b"])
        strategy = FakeStrategy("rdma_region", {"a": [fail(SourceFailed)], "b": [fail(SourceFailed)]})
        hub = FakeStrategy("hf_download", {None: [succeed()]}, uses_peers=False)

        class BreakAfterList(LoadObserver):
            def probe_done(self, record: object) -> None:
                registry.unavailable = True

        report = await Orchestrator(
            registry, [strategy, hub], prober=prober, observers=[BreakAfterList()]
        ).load(identity)
        assert report.loaded
        assert [a.marked_stale for a in report.attempts] == [False, False, False]

    backend(main)


def test_a_strategy_that_raises_becomes_local_failure(identity: ModelIdentity, backend: Runner) -> None:
    async def main() -> None:
        class Broken:
            name = "broken"
            uses_peers = False

            async def attempt(self, ctx: object) -> NotApplicable:
                raise RuntimeError("bug")

        hub = FakeStrategy("hf_download", {None: [succeed()]}, uses_peers=False)
        report = await Orchestrator(None, [Broken(), hub]).load(identity)
        assert isinstance(report.attempts[0].outcome, LocalFailure)
        assert "RuntimeError: bug" in report.attempts[0].outcome.detail
        assert report.loaded

    backend(main)


def test_unreachable_source_is_skipped_without_stale(identity: ModelIdentity, backend: Runner) -> None:
    async def main() -> None:
        registry, prober = await scenario(identity, ["gone", "ok"])
        order = {"gone": 0.0, "ok": 1.0}
        region = FakeStrategy("rdma_region", {"gone": [fail(SourceUnreachable)], "ok": [succeed()]})
        tensor = FakeStrategy("rdma_tensor", default=succeed())
        report = await Orchestrator(
            registry, [region, tensor], prober=prober, selection=lambda _t: lambda c: (order[c.source_id],)
        ).load(identity)
        assert report.final is not None and report.final.source_id == "ok"
        assert registry.state_of("gone") is SourceState.READY

    backend(main)


def test_retry_rule_retries_the_same_source_then_moves_on(
    identity: ModelIdentity, virtual_clock: Runner
) -> None:
    async def main() -> None:
        import tenacity

        from mx_orchestrator.policy import retry

        registry, prober = await scenario(identity, ["flaky"])
        strategy = FakeStrategy("rdma_region", {"flaky": [fail(TimedOut), fail(TimedOut), succeed()]})
        policy = DEFAULT_POLICY.with_rules(
            {TimedOut: retry(wait=tenacity.wait_fixed(0.01), stop=tenacity.stop_after_attempt(3))}
        )
        report = await Orchestrator(registry, [strategy], prober=prober, policy=policy).load(identity)
        assert report.loaded
        assert strategy.calls == [("flaky", 1), ("flaky", 2), ("flaky", 3)]
        assert [a.action.kind.value for a in report.attempts] == ["retry", "retry", "finish"]

    virtual_clock(main)


def test_least_loaded_selection_prefers_idle_sources(identity: ModelIdentity, backend: Runner) -> None:
    async def main() -> None:
        registry = FakeRegistry()
        manifest = make_manifest(identity)
        for sid, load in (("busy", 9), ("idle", 0), ("mid", 3)):
            await registry.publish(make_record(identity, sid, load=load), manifest)
        strategy = FakeStrategy("rdma_region", default=succeed())
        report = await Orchestrator(registry, [strategy], selection=least_loaded).load(identity)
        assert report.final is not None and report.final.source_id == "idle"

    backend(main)


def test_rendezvous_ranking_is_stable_per_target_and_spreads_targets(
    identity: ModelIdentity, backend: Runner
) -> None:
    async def main() -> None:
        registry, prober = await scenario(identity, [f"s{i}" for i in range(20)])
        winners = set()
        for target in range(30):
            strategy = FakeStrategy("rdma_region", default=succeed())
            orch = Orchestrator(registry, [strategy], prober=prober, target_id=f"t{target}")
            first = (await orch.load(identity)).final
            again = (
                await Orchestrator(
                    registry,
                    [FakeStrategy("rdma_region", default=succeed())],
                    prober=prober,
                    target_id=f"t{target}",
                ).load(identity)
            ).final
            assert first is not None and again is not None and first.source_id == again.source_id
            winners.add(first.source_id)
        assert len(winners) > 5

    backend(main)


def test_nothing_to_try_gives_a_failed_report(identity: ModelIdentity, backend: Runner) -> None:
    async def main() -> None:
        registry = FakeRegistry()
        report = await Orchestrator(registry, [FakeStrategy("rdma_region")]).load(identity)
        assert isinstance(report, LoadReport) and not report.loaded
        assert report.to_dict()["outcome"] == "failed"

    backend(main)


def test_structured_events_per_phase_and_attempt_carry_run_model_strategy_source(
    identity: ModelIdentity,
    backend: Runner,
) -> None:
    async def main() -> None:
        from structlog.testing import capture_logs

        registry, prober = await scenario(identity, ["a"])
        strategy = FakeStrategy("rdma_region", {"a": [succeed()]})
        with capture_logs() as events:
            report = await Orchestrator(registry, [strategy], prober=prober).load(identity)
        names = [e["event"] for e in events]
        assert names[0] == "load.start" and names[-1] == "load.done"
        assert "evaluate.done" in names or len(report.probes) == 1
        attempt = next(e for e in events if e["event"] == "attempt.done")
        assert attempt["run_id"] == report.run_id and attempt["model"] == identity.key
        assert (attempt["strategy"], attempt["source"], attempt["outcome"]) == ("rdma_region", "a", "Loaded")
        assert all(e["run_id"] == report.run_id for e in events)

    backend(main)


def test_rank_window_lets_the_best_ranked_source_go_first_not_the_fastest_probe(
    identity: ModelIdentity,
    virtual_clock: Runner,
) -> None:
    async def main() -> None:
        registry, _ = await scenario(identity, ["fast", "best"])
        prober = FakeProber(default_manifest=make_manifest(identity), latency={"fast": 0.0, "best": 0.05})
        order = {"best": 0.0, "fast": 1.0}

        async def first_source(window: float) -> str | None:
            strategy = FakeStrategy("rdma_region", default=succeed())
            orch = Orchestrator(
                registry,
                [strategy],
                prober=prober,
                rank_window=window,
                selection=lambda _t: lambda c: (order[c.source_id],),
            )
            final = (await orch.load(identity)).final
            return final.source_id if final else None

        assert await first_source(0.5) == "best"
        assert await first_source(0.0) == "fast"

    virtual_clock(main)


def test_unreachable_reports_from_several_targets_eject_the_source(
    identity: ModelIdentity, backend: Runner
) -> None:
    async def main() -> None:
        registry, prober = await scenario(identity, ["flaky"])
        stale = []
        for target in range(3):
            strategy = FakeStrategy("rdma_region", {"flaky": [fail(SourceUnreachable)]})
            report = await Orchestrator(registry, [strategy], prober=prober, target_id=f"t{target}").load(
                identity
            )
            stale.append(report.attempts[0].marked_stale)
        assert stale == [False, False, True]
        assert registry.state_of("flaky") is SourceState.STALE

    backend(main)


def test_a_hanging_first_source_leaves_the_rest_of_the_load_deadline_to_the_next(
    identity: ModelIdentity, virtual_clock: Runner
) -> None:
    """The load's deadline is a promise: the wedged source gets its share (20 s / 2), not all of it."""

    async def main() -> None:
        registry, prober = await scenario(identity, ["frozen", "healthy"])
        strategy = FakeStrategy("rdma_region", {"frozen": [wedge()], "healthy": [succeed(delay=1.0)]})
        order = {"frozen": 0.0, "healthy": 1.0}
        began = anyio.current_time()
        report = await Orchestrator(
            registry,
            [strategy],
            prober=prober,
            attempt_timeout=60,
            load_timeout=20,
            selection=lambda _t: lambda c: (order[c.source_id],),
        ).load(identity)
        elapsed = anyio.current_time() - began
        first, second = report.attempts
        assert isinstance(first.outcome, TimedOut) and 9.9 <= first.outcome.deadline <= 10.1
        assert second.outcome.name == "Loaded" and report.loaded and elapsed < 12.0

    virtual_clock(main)


def test_prefer_seeds_ranks_fewer_hops_first_and_the_report_says_how_far_the_source_was(
    identity: ModelIdentity, backend: Runner
) -> None:
    from dataclasses import replace as with_fields

    from mx_orchestrator import prefer_seeds, spare_seeds

    async def main() -> None:
        registry = FakeRegistry()
        manifest = make_manifest(identity)
        for sid, hops in (("copy-2", 2), ("seed", 0), ("copy-1", 1)):
            await registry.publish(with_fields(make_record(identity, sid), hops=hops), manifest)
        strategy = FakeStrategy("rdma_region", default=succeed())
        report = await Orchestrator(registry, [strategy], selection=prefer_seeds()).load(identity)
        assert report.final is not None and report.final.source_id == "seed" and report.source_hops == 0
        spared = await Orchestrator(registry, [strategy], selection=spare_seeds()).load(identity)
        assert spared.final is not None and spared.final.source_id == "copy-2" and spared.source_hops == 2

    backend(main)


def test_a_full_seed_is_waited_for_not_blamed_and_the_hub_is_not_used(
    identity: ModelIdentity, virtual_clock: Runner
) -> None:
    """The only peer is at its reader cap for 3 s: the load waits for capacity (listing again),
    reads from it when a slot frees, never marks it STALE and never reaches the slow Hub."""
    from dataclasses import replace as with_fields

    async def main() -> None:
        registry = FakeRegistry()
        seed = with_fields(make_record(identity, "seed", load=1), max_readers=1)
        await registry.publish(seed, make_manifest(identity))
        peers = FakeStrategy("rdma_region", default=succeed(delay=0.5))
        hub = FakeStrategy("hf_download", {None: [succeed(delay=60.0)]}, uses_peers=False)

        async def free_the_slot() -> None:
            await anyio.sleep(3.0)
            await registry.lease_reader("seed", seed.generation, "reader-0", None)

        async with anyio.create_task_group() as tg:
            tg.start_soon(free_the_slot)
            began = anyio.current_time()
            report = await Orchestrator(registry, [peers, hub]).load(identity)
        assert report.loaded and report.final is not None and report.final.source_id == "seed"
        assert report.capacity_waits >= 3 and report.to_dict()["capacity_waits"] == report.capacity_waits
        assert not hub.calls
        assert 3.0 <= anyio.current_time() - began < 3.0 + 1.0 + 0.5 + 0.1  # at most one wait's cap late
        assert registry.state_of("seed") is SourceState.READY
        assert ("mark_stale", "seed") not in registry.calls
        assert ("report_unreachable", "seed") not in registry.calls

    virtual_clock(main)


def test_a_source_republished_during_a_capacity_wait_is_found_by_the_next_listing(
    identity: ModelIdentity, virtual_clock: Runner
) -> None:
    """Fan-out: the seed stays full, a target that loaded republishes (hops 1) after 2 s; the
    waiting target lists again, finds the copy and reads from it."""
    from dataclasses import replace as with_fields

    async def main() -> None:
        registry = FakeRegistry()
        manifest = make_manifest(identity)
        await registry.publish(with_fields(make_record(identity, "seed", load=2), max_readers=2), manifest)
        peers = FakeStrategy("rdma_region", default=succeed())

        async def republish() -> None:
            await anyio.sleep(2.0)
            await registry.publish(with_fields(make_record(identity, "copy"), hops=1), manifest)

        async with anyio.create_task_group() as tg:
            tg.start_soon(republish)
            report = await Orchestrator(registry, [peers], load_timeout=30).load(identity)
        assert report.loaded and report.final is not None and report.final.source_id == "copy"
        assert report.source_hops == 1 and report.capacity_waits >= 2
        assert peers.calls == [("copy", 1)]  # the seed was listed full every time: never asked
        assert {p["source"] for p in report.to_dict()["probes"]} == {"seed", "copy"}

    virtual_clock(main)


def test_capacity_waits_end_at_the_load_deadline_with_a_clear_reason(
    identity: ModelIdentity, virtual_clock: Runner
) -> None:
    from dataclasses import replace as with_fields

    async def main() -> None:
        registry = FakeRegistry()
        await registry.publish(
            with_fields(make_record(identity, "seed", load=1), max_readers=1), make_manifest(identity)
        )
        began = anyio.current_time()
        report = await Orchestrator(
            registry, [FakeStrategy("rdma_region", default=succeed())], load_timeout=5
        ).load(identity)
        assert not report.loaded and report.capacity_waits >= 4
        assert anyio.current_time() - began <= 5.0 + 1e-6
        assert "deadline" in report.reason
        assert registry.state_of("seed") is SourceState.READY

    virtual_clock(main)


def test_twenty_sources_of_one_manifest_cost_one_fetch_and_a_second_load_none(
    identity: ModelIdentity, backend: Runner
) -> None:
    from mx_orchestrator.manifests import ManifestCache

    async def main() -> None:
        registry = FakeRegistry()
        manifest = make_manifest(identity, 50)
        for i in range(20):
            await registry.publish(make_record(identity, f"s{i:02d}"), manifest)
        cache = ManifestCache()
        strategy = FakeStrategy("rdma_region", default=succeed())
        orchestrator = Orchestrator(registry, [strategy], manifest_cache=cache, rank_window=0.05)
        first = await orchestrator.load(identity)
        assert first.loaded and len(first.probes) == 20 and all(p.ok for p in first.probes)
        assert [op for op, _ in registry.calls].count("get_manifest_blob") == 1 and cache.fetches == 1
        registry.calls.clear()
        second = await orchestrator.load(identity)
        assert second.loaded and len(second.probes) == 20
        assert "get_manifest_blob" not in [op for op, _ in registry.calls] and cache.fetches == 1

    backend(main)


def test_a_forged_stored_manifest_fails_every_probe_that_names_it_and_the_load_moves_on(
    identity: ModelIdentity, backend: Runner
) -> None:
    from mx_orchestrator.manifests import ManifestCache

    async def main() -> None:
        registry = FakeRegistry()
        manifest = make_manifest(identity, 4)
        for sid in ("a", "b"):
            await registry.publish(make_record(identity, sid), manifest)
        registry._blobs[manifest.stored.key] = make_manifest(
            identity, 5
        ).stored.blob  # swapped under its name
        hub = FakeStrategy("hf_download", {None: [succeed()]}, uses_peers=False)
        report = await Orchestrator(
            registry, [FakeStrategy("rdma_region", default=succeed()), hub], manifest_cache=ManifestCache()
        ).load(identity)
        assert report.loaded and report.final is not None and report.final.strategy == "hf_download"
        assert [p.ok for p in report.probes] == [False, False]
        assert all("does not hash to its key" in p.detail for p in report.probes)
        assert registry.state_of("a") is SourceState.READY

    backend(main)
