"""The peer attempt through the public FakeRdmaAgent: every outcome it can produce, in milliseconds, without nixl.

The serving side is the real :class:`WeightSource` (on a fake agent and the
in-memory registry), the target the real :class:`Target`, the strategies the
real ``rdma_region`` / ``rdma_tensor``; only the transport is the fake, which
really copies bytes between the two sides' registered memory. After every
test both agents hold nothing (handles, remote agents, registrations).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch

from mx_orchestrator import ModelIdentity, Orchestrator, Policy, SourceState
from mx_orchestrator._backends.pool import pool_for
from mx_orchestrator.buffers import Buffers
from mx_orchestrator.models import Candidate, Manifest
from mx_orchestrator.outcomes import (
    Corrupt,
    LayoutMismatch,
    Loaded,
    LocalFailure,
    NotApplicable,
    SourceFailed,
    SourceUnreachable,
    TimedOut,
)
from mx_orchestrator.pullplan import PullPlan, check
from mx_orchestrator.source import WeightSource, load_weights
from mx_orchestrator.target import Target
from strategies.rdma_region import RdmaRegion
from strategies.rdma_tensor import RdmaTensor
from tests.fabric import fabric as shared_fabric

IDENTITY = ModelIdentity("acme/fake-peer")


def weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {
        "embed.weight": torch.randn(64, 32, generator=g),
        "layer.0.weight": torch.randn(32, 32, generator=g).to(torch.bfloat16),
        "layer.0.bias": torch.randn(32, generator=g),
        "position_ids": torch.arange(128, dtype=torch.int64),
    }


def fabric(*specs: tuple[str, str], **faults: dict[str, bool]) -> Any:
    """Sources ``(source_id, layout)`` serving :func:`weights`, in rank order; ``faults[sid]`` for their agents."""
    return shared_fabric(IDENTITY, weights, *specs, **faults)


def assert_equal_weights(target: Target) -> None:
    for name, tensor in weights().items():
        assert torch.equal(target.tensors()[name], tensor), name


async def test_region_pull_between_matching_layouts_is_loaded_and_verified() -> None:
    async with fabric(("src", "arena")) as f:
        target = Target("arena")
        report = await f.load(target)
    (attempt,) = report.attempts
    assert isinstance(attempt.outcome, Loaded) and attempt.outcome.verified
    assert attempt.outcome.strategy == "rdma_region" and attempt.outcome.detail.startswith("1 descriptors")
    assert attempt.outcome.bytes_moved == target.nbytes
    assert_equal_weights(target)


async def test_unverified_target_loads_without_checking() -> None:
    async with fabric(("src", "arena")) as f:
        target = Target("arena", verify=False)
        report = await f.load(target)
    assert isinstance(report.final, Loaded) and not report.final.verified
    assert_equal_weights(target)


async def test_layout_mismatch_moves_nothing_and_the_tensor_strategy_then_loads() -> None:
    async with fabric(("chunked", "chunked:4KiB")) as f:
        target = Target("arena")
        report = await f.load(target)
        record = await f.registry.get("chunked")
    first, second = report.attempts
    assert isinstance(first.outcome, LayoutMismatch) and first.outcome.bytes_moved == 0
    assert first.outcome.source_regions > 1 and first.outcome.target_regions == 1
    assert not first.marked_stale and record is not None and record.state is SourceState.READY
    assert isinstance(second.outcome, Loaded) and second.outcome.strategy == "rdma_tensor"
    assert f.agent.bytes_read == target.nbytes  # the mismatch read nothing
    assert_equal_weights(target)


async def test_a_target_of_other_shapes_is_a_manifest_mismatch_before_any_byte() -> None:
    engine = {name: torch.zeros_like(t) for name, t in weights().items()}
    engine["layer.0.bias"] = torch.zeros(33)
    async with fabric(("src", "tensor")) as f:
        report = await f.load(Target.from_tensors(IDENTITY, engine))
    assert {a.outcome.name for a in report.attempts} == {"ManifestMismatch"}
    assert all(not a.marked_stale for a in report.attempts)
    assert f.agent.bytes_read == 0


async def test_preallocated_engine_tensors_are_filled_in_place() -> None:
    engine = {name: torch.zeros_like(t) for name, t in weights().items()}
    pointers = {name: t.data_ptr() for name, t in engine.items()}
    async with fabric(("src", "tensor")) as f:
        report = await f.load(Target.from_tensors(IDENTITY, engine))
    assert report.loaded and {n: t.data_ptr() for n, t in engine.items()} == pointers
    for name, tensor in weights().items():
        assert torch.equal(engine[name], tensor)


async def test_a_dead_source_is_unreachable_and_counted_toward_ejection_not_stale() -> None:
    async with fabric(("dead", "arena"), ("ok", "arena"), dead={"dead": True}) as f:
        report = await f.load(Target("arena"))
        record = await f.registry.get("dead")
    first = report.attempts[0].outcome
    assert isinstance(first, SourceUnreachable) and "connect failed" in first.detail
    assert not report.attempts[0].marked_stale
    assert record is not None and record.state is SourceState.READY and record.unreachable_reports == 1
    assert report.final is not None and report.final.source_id == "ok"


async def test_a_source_dying_mid_read_is_source_failed_and_stale() -> None:
    async with fabric(("dying", "arena"), ("ok", "arena"), dying={"die_mid_read": True}) as f:
        report = await f.load(Target("arena"))
        record = await f.registry.get("dying")
    first = report.attempts[0]
    assert isinstance(first.outcome, SourceFailed) and "mid-read" in first.outcome.detail
    assert first.marked_stale and record is not None and record.state is SourceState.STALE
    assert report.final is not None and report.final.source_id == "ok"


async def test_a_frozen_source_times_out_at_its_deadline_within_the_attempt_timeout_and_releases_everything() -> (
    None
):
    async with fabric(("frozen", "arena"), ("ok", "arena"), frozen={"frozen": True}) as f:
        began = anyio.current_time()
        # a policy that takes 0.2 s without progress as a stall (the default wants 5 s: a short
        # deadline of the target's own never blames a source); the part's deadline is that stall
        # evidence, within the attempt timeout. No hedge: the deadline, not another source, ends it
        report = await f.load(
            Target("arena"), attempt_timeout=0.3, policy=Policy(stall_floor=0.2), hedge=False
        )
        elapsed = anyio.current_time() - began
    first = report.attempts[0]
    assert isinstance(first.outcome, TimedOut) and first.marked_stale
    assert 0.2 <= first.outcome.deadline <= 0.3
    assert first.outcome.deadline <= first.outcome.seconds < 1.0 and elapsed < 2.0
    assert report.final is not None and report.final.source_id == "ok"


async def test_bytes_that_differ_from_the_checksums_are_corrupt_and_stale() -> None:
    async with fabric(("liar", "arena"), ("ok", "arena")) as f:
        _, served = f.sources["liar"]
        served.tensors["layer.0.bias"][3] += 1.0  # after the checksums were published
        target = Target("arena")
        report = await f.load(target)
    first = report.attempts[0]
    assert isinstance(first.outcome, Corrupt) and first.outcome.bad_tensors == ("layer.0.bias",)
    assert first.marked_stale
    assert report.final is not None and report.final.source_id == "ok"
    assert_equal_weights(target)


async def test_a_registration_failure_is_local_and_never_blames_the_source() -> None:
    async with fabric(("src", "arena")) as f:
        f.agent.faults.fail_register = True
        report = await f.load(Target("arena"))
        record = await f.registry.get("src")
    assert report.attempts and all(isinstance(a.outcome, LocalFailure) for a in report.attempts)
    assert not any(a.marked_stale for a in report.attempts)
    assert record is not None and record.state is SourceState.READY


async def test_an_allocation_failure_is_local() -> None:
    class NoMemory(Target):
        def _allocate(self, planned: Manifest) -> Buffers:
            raise MemoryError("simulated")

    async with fabric(("src", "arena")) as f:
        report = await f.load(NoMemory("arena"), RdmaRegion(agent=f.agent))
    (attempt,) = report.attempts
    assert isinstance(attempt.outcome, LocalFailure) and "allocation failed" in attempt.outcome.detail


async def test_a_record_whose_metadata_names_another_agent_is_unreachable() -> None:
    async with fabric(("src", "arena"), ("other", "arena")) as f:
        record = await f.registry.get("src")
        other = await f.registry.get("other")
        assert record is not None and other is not None
        transport = dict(record.transport, nixl_metadata=other.transport["nixl_metadata"])
        manifest = await f.registry.get_manifest("src", record.generation)
        candidate = Candidate(type(record).from_dict({**record.to_dict(), "transport": transport}), manifest)
        outcome = await attempt_once(RdmaRegion(agent=f.agent), candidate, Target("arena"))
    assert isinstance(outcome, SourceUnreachable) and "record says" in outcome.detail


async def attempt_once(strategy: Any, candidate: Candidate, target: Any) -> Any:
    from mx_orchestrator.strategy import AttemptContext

    ctx = AttemptContext(IDENTITY, target, candidate, anyio.current_time() + 5)
    return await strategy.attempt(ctx)


async def test_check_decides_without_io_and_refuses_malformed_adverts() -> None:
    async with fabric(("src", "chunked:4KiB")) as f:
        record = await f.registry.get("src")
        assert record is not None
        manifest = await f.registry.get_manifest("src", record.generation)
        good = Candidate(record, manifest)
        target = Target("arena")
        region = check(good, target, RdmaRegion.plan, strategy="rdma_region", refusal_is_layout=True)
        tensor = check(good, target, RdmaTensor.plan, strategy="rdma_tensor", refusal_is_layout=False)
        assert isinstance(region, LayoutMismatch)
        assert isinstance(tensor, PullPlan) and tensor.nbytes == sum(t.nbytes for t in manifest.tensors)
        assert target.buffers is None  # check allocated nothing
        for broken in ({}, {"nixl_agent": "x"}, dict(record.transport, nixl_regions="[[1, 2]]")):
            bad = Candidate(type(record).from_dict({**record.to_dict(), "transport": broken}), manifest)
            outcome = check(bad, target, RdmaTensor.plan, strategy="rdma_tensor", refusal_is_layout=False)
            assert isinstance(outcome, SourceUnreachable), broken
        assert isinstance(
            check(None, target, RdmaTensor.plan, strategy="rdma_tensor", refusal_is_layout=False),
            SourceUnreachable,
        )
        not_a_target = check(good, object(), RdmaTensor.plan, strategy="rdma_tensor", refusal_is_layout=False)
        assert isinstance(not_a_target, NotApplicable)
    assert isinstance(check(good, target, RdmaTensor.plan, strategy="t", refusal_is_layout=False), PullPlan)


async def test_cancelling_mid_read_releases_the_handle_the_remote_and_the_registration() -> None:
    async with fabric(("frozen", "arena"), frozen={"frozen": True}) as f:
        with anyio.move_on_after(0.2) as scope:
            await f.load(Target("arena"), attempt_timeout=30)
        assert scope.cancelled_caught
        f.assert_nothing_held(after_closing_the_pool=False)  # a cancelled read's connection is dropped


async def test_manifest_mismatch_between_sources_never_marks_stale() -> None:
    async with fabric(("src", "arena")) as f:
        target = Target("arena")
        assert (await f.load(target)).loaded
        other = {**weights(), "extra.weight": torch.ones(4)}
        served = load_weights(IDENTITY, other, "arena")
        agent = f.network.agent("other")
        async with anyio.create_task_group() as tg:
            await tg.start(WeightSource(f.registry, served, source_id="other", agent=agent).run)
            await f.registry.remove("src")
            report = await f.load(target)
            tg.cancel_scope.cancel()
    assert {a.outcome.name for a in report.attempts} == {"ManifestMismatch"}
    assert not any(a.marked_stale for a in report.attempts)


async def test_a_second_load_reuses_the_connection_and_reports_its_phases() -> None:
    async with fabric(("src", "arena")) as f:
        first = await f.load(Target("arena"))
        second = await f.load(Target("arena"))
        assert f.agent.connects == 1 and len(pool_for(f.agent)) == 1
    for report in (first, second):
        (attempt,) = report.attempts
        data = attempt.to_dict()
        assert set(data["phases"]) >= {"agent", "connect", "allocate", "register", "transfer", "verify"}
        assert data["phases"]["transfer"] > 0 and data["phases"]["verify"] > 0
        assert sum(data["phases"].values()) <= data["seconds"] + 1e-3
        assert report.to_dict()["transfer_seconds"] == data["phases"]["transfer"]


async def test_a_restarted_source_is_a_new_connection_and_the_old_one_is_dropped() -> None:
    async with fabric(("src", "arena")) as f:
        assert (await f.load(Target("arena"))).loaded
        _, served = f.sources["src"]
        async with anyio.create_task_group() as tg:
            # the same source id, a new process generation (and a new agent)
            await tg.start(
                WeightSource(f.registry, served, source_id="src", agent=f.network.agent("src-2")).run
            )
            assert (await f.load(Target("arena"))).loaded
            assert f.agent.connects == 2 and len(pool_for(f.agent)) == 1
            assert f.agent.stats.remote_agents == 1
            tg.cancel_scope.cancel()


async def test_a_source_that_dies_after_a_pooled_load_is_dropped_and_the_next_candidate_loads() -> None:
    async with fabric(("a", "arena"), ("b", "arena")) as f:
        assert (await f.load(Target("arena"))).final.source_id == "a"  # type: ignore[union-attr]
        f.sources["a"][0].faults.dead = True
        report = await f.load(Target("arena"))
        assert [a.outcome.name for a in report.attempts] == ["SourceFailed", "Loaded"]
        assert report.final is not None and report.final.source_id == "b"
        assert f.agent.stats.remote_agents == 1  # only b's connection is kept


async def test_cuda_ipc_is_not_applicable_to_a_host_target_and_the_next_strategy_loads() -> None:
    from strategies.cuda_ipc import CudaIpc

    async with fabric(("src", "arena")) as f:
        report = await f.load(Target("arena"), CudaIpc(), RdmaRegion(agent=f.agent))
    first, second = report.attempts
    assert isinstance(first.outcome, NotApplicable) and not first.outcome.candidate_only
    assert second.outcome.name == "Loaded" and second.outcome.strategy == "rdma_region"


async def test_records_with_garbage_connections_and_another_manifest_never_shape_the_target() -> None:
    """Liars rank first; each fails its connect before any allocation; the honest source loads every time."""
    import base64

    from mx_orchestrator.models import SourceRecord, TensorSpec

    async with fabric(("honest", "arena")) as f:
        record = await f.registry.get("honest")
        assert record is not None
        honest = await f.registry.get_manifest("honest", record.generation)
        assert honest is not None
        # same sizes, dtypes relabelled: a target shaped by it would refuse every honest source
        relabelled = Manifest(
            IDENTITY,
            tuple(
                TensorSpec(
                    t.name, "I32" if t.dtype == "F32" else t.dtype, t.shape, t.region, t.offset, t.checksum
                )
                for t in honest.tensors
            ),
            honest.regions,
            honest.checksum_algorithm,
        )
        for i in range(3):
            liar = SourceRecord.from_dict(
                {
                    **record.to_dict(),
                    "source_id": f"liar-{i}",
                    "generation": f"g{i}",
                    "transport": dict(record.transport, nixl_metadata=base64.b64encode(b"garbage").decode()),
                }
            )
            await f.registry.publish(liar, relabelled)
        order = {"liar-0": 0.0, "liar-1": 1.0, "liar-2": 2.0, "honest": 3.0}
        for _ in range(3):
            target = Target("arena")
            report = await Orchestrator(
                f.registry,
                [RdmaRegion(agent=f.agent), RdmaTensor(agent=f.agent)],
                rank_window=0.05,
                selection=lambda _t: lambda c: (order[c.source_id],),
            ).load(IDENTITY, target)
            assert report.loaded and report.final is not None and report.final.source_id == "honest"
            assert [a.outcome.name for a in report.attempts][:3] == ["SourceUnreachable"] * 3
            assert target.allocations == [honest.total_bytes]  # nothing was allocated for the liars
            assert_equal_weights(target)
            assert sorted(map(sorted, report.manifest_disagreement.values())) == [
                ["honest"],
                ["liar-0", "liar-1", "liar-2"],
            ]


def test_the_peer_attempt_runs_without_nixl_imported(tmp_path: Path) -> None:
    """This module again, in a fresh interpreter that fails if anything imported nixl."""
    if os.environ.get("MXO_ASSERT_NO_NIXL"):
        pytest.skip("already inside the nixl-free run")
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(Path(__file__)),
            "-k",
            "not without_nixl",
        ],
        cwd=root,
        env=dict(os.environ, MXO_ASSERT_NO_NIXL=str(tmp_path / "verdict")),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "verdict").exists(), result.stdout[-3000:]
    assert (tmp_path / "verdict").read_text() == "no nixl module was imported"


@pytest.fixture(scope="module", autouse=True)
def _no_nixl_when_asked() -> Any:
    yield
    verdict = os.environ.get("MXO_ASSERT_NO_NIXL")
    if verdict:
        loaded = sorted(m for m in sys.modules if m == "nixl" or m.startswith(("nixl.", "nixl_")))
        Path(verdict).write_text(f"imported: {loaded}" if loaded else "no nixl module was imported")
