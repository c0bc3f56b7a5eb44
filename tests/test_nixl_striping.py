"""Striped loads between real processes: NIXL on loopback (CPU memory), a 1 GiB synthetic checkpoint.

Frozen sources are SIGSTOPped, killed ones SIGKILLed; the target's own
accounting (``Target.bytes_written``: bytes of every READ that completed into
it) shows that nothing already landed was read again.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch
from safetensors.torch import load_file

from mx_orchestrator import ModelIdentity, Orchestrator, Policy, SourceState
from mx_orchestrator.checkpoint import save_checkpoint
from mx_orchestrator.registry.sqlite import SqliteRegistry
from mx_orchestrator.report import AttemptRecord, LoadObserver, LoadReport
from mx_orchestrator.target import Target
from mx_orchestrator.testing import publish_junk
from mx_orchestrator.testing.peers import MODEL_ID, Peers, minilm_dir
from strategies.rdma_region import RdmaRegion
from strategies.rdma_tensor import RdmaTensor
from tests.conftest import publish_a_lie

pytestmark = [pytest.mark.nixl, pytest.mark.slow, pytest.mark.usefixtures("no_nixl_leaks")]

SYNTHETIC = "acme/synthetic-1g"
TENSORS = 64
TENSOR_BYTES = 16 << 20  # 64 x 16 MiB = 1 GiB


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1 GiB checkpoint of 64 distinct tensors, written once for the module."""
    directory = tmp_path_factory.mktemp("synthetic-1g")
    base = torch.arange(TENSOR_BYTES // 4, dtype=torch.int32)
    tensors = {f"block.{i:02d}.weight": (base * (2 * i + 1) + i) for i in range(TENSORS)}
    save_checkpoint(tensors, directory / "model.safetensors")
    return directory


def ordered(*ids: str):  # type: ignore[no-untyped-def]
    rank = {sid: float(i) for i, sid in enumerate(ids)}
    return lambda _target: lambda c: (rank.get(c.source_id, 99.0),)


async def striped_load(
    registry_url: str, target: Target, model_id: str = SYNTHETIC, **options: object
) -> tuple[LoadReport, SqliteRegistry]:
    registry = SqliteRegistry(registry_url.removeprefix("sqlite://"))
    options.setdefault("rank_window", 5.0)
    options.setdefault("min_part_bytes", 32 << 20)
    orchestrator = Orchestrator(registry, [RdmaRegion(), RdmaTensor()], **options)  # type: ignore[arg-type]
    return await orchestrator.load(ModelIdentity(model_id), target), registry


def assert_equal_to(target: Target, directory: Path) -> None:
    reference = load_file(str(directory / "model.safetensors"))
    loaded = target.tensors()
    assert loaded.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(loaded[name].view(torch.uint8), tensor.view(torch.uint8)), name


def assert_parts_cover_once(report: LoadReport, total: int) -> None:
    ranges = report.landed_ranges()
    assert sum(end - start for start, end in ranges) == total
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(ranges))


async def test_three_sources_stripe_a_1_gib_model_and_the_bytes_equal_the_checkpoint(
    peers: Peers, registry_url: str, checkpoint: Path
) -> None:
    peers.start(("a", "arena"), ("b", "arena"), ("c", "arena"), weights=checkpoint, model_id=SYNTHETIC)
    target = Target("arena")
    report, registry = await striped_load(registry_url, target, stripe=3)
    assert report.loaded, report.reason
    assert_equal_to(target, checkpoint)
    data = report.to_dict()
    assert data["bytes"] == target.nbytes == TENSORS * TENSOR_BYTES and data["verified"]
    assert len({a.outcome.source_id for a in report.loaded_parts()}) >= 2, data["bytes_by_source"]
    assert_parts_cover_once(report, target.nbytes)
    assert target.bytes_written == target.nbytes
    await registry.aclose()
    # the same through the CLI: mxo pull --stripe 3
    command = [sys.executable, "-m", "mx_orchestrator", "pull", "--model-id", SYNTHETIC,
               "--registry", registry_url, "--stripe", "3", "--json"]  # fmt: skip
    out = await anyio.to_thread.run_sync(
        lambda: subprocess.run(command, capture_output=True, text=True, timeout=120)
    )
    pulled = json.loads(out.stdout)
    assert out.returncode == 0 and pulled["outcome"] == "loaded", out.stderr[-2000:]
    assert pulled["stripe"] == 3 and pulled["bytes"] == TENSORS * TENSOR_BYTES
    loaded = [a for a in pulled["attempts"] if a["outcome"] == "Loaded"]
    assert sum(a["range"][1] - a["range"][0] for a in loaded) == pulled["bytes"]
    assert len({a["source"] for a in loaded}) >= 2


async def test_a_frozen_source_times_out_at_its_part_deadline_and_nothing_landed_is_read_again(
    peers: Peers, registry_url: str, checkpoint: Path
) -> None:
    frozen, _b, _c = peers.start(
        ("frozen", "arena"), ("b", "arena"), ("c", "arena"), weights=checkpoint, model_id=SYNTHETIC, ttl=120.0
    )
    frozen.signal(19)  # SIGSTOP: its READ never completes
    target = Target("arena")
    report, registry = await striped_load(
        registry_url,
        target,
        stripe=3,
        hedge=False,  # the part deadline, not a hedge, must end the frozen part here
        selection=ordered("frozen", "b", "c"),
        policy=Policy(stall_floor=1.0, stall_rate=1e9),
        load_timeout=60,
    )
    frozen.signal(18)
    assert report.loaded, report.reason
    frozen_parts = [a for a in report.attempts if a.outcome.source_id == "frozen"]
    assert (
        len(frozen_parts) == 1 and frozen_parts[0].outcome.name == "TimedOut" and frozen_parts[0].marked_stale
    )
    assert await registry.get("frozen") is not None
    assert (await registry.get("frozen")).state is SourceState.STALE  # type: ignore[union-attr]
    assert report.seconds < 30
    assert_equal_to(target, checkpoint)
    assert_parts_cover_once(report, target.nbytes)
    assert target.bytes_written == target.nbytes  # the frozen part's bytes came once, from the others
    await registry.aclose()


async def test_a_source_killed_mid_load_costs_only_its_part(
    peers: Peers, registry_url: str, checkpoint: Path
) -> None:
    victim, _b, _c = peers.start(
        ("victim", "arena"), ("b", "arena"), ("c", "arena"), weights=checkpoint, model_id=SYNTHETIC, ttl=120.0
    )
    victim.signal(19)  # frozen first, so its part is surely in flight when it dies

    async def kill_soon() -> None:
        # once the target holds its reader lease on the victim (it connects and reads next), plus
        # time for a busy machine to get the read in flight: a kill before the connect would be
        # SourceUnreachable, which is not what this test is about
        watcher = SqliteRegistry(registry_url.removeprefix("sqlite://"))
        try:
            while not ((record := await watcher.get("victim")) and record.readers):  # noqa: ASYNC110
                await anyio.sleep(0.05)  # another process's registry row: nothing to wait on but it
        finally:
            await watcher.aclose()
        await anyio.sleep(1.5)
        victim.kill()

    target = Target("arena")
    async with anyio.create_task_group() as tg:
        tg.start_soon(kill_soon)
        report, registry = await striped_load(
            registry_url,
            target,
            stripe=3,
            hedge=False,
            selection=ordered("victim", "b", "c"),
            attempt_timeout=30,
            load_timeout=60,
        )
    assert report.loaded, report.reason
    killed = [a for a in report.attempts if a.outcome.source_id == "victim"]
    assert len(killed) == 1 and killed[0].outcome.name == "SourceFailed" and killed[0].marked_stale
    assert killed[0].outcome.seconds < 20
    assert_equal_to(target, checkpoint)
    assert_parts_cover_once(report, target.nbytes)
    assert target.bytes_written == target.nbytes
    await registry.aclose()


@pytest.mark.parametrize("stripe", [2, 3])
async def test_a_corrupt_tensor_under_stripe_2_is_read_again_alone_from_the_other_source(
    peers: Peers, registry_url: str, checkpoint: Path, stripe: int
) -> None:
    peers.start(("liar", "arena"), ("honest", "arena"), weights=checkpoint, model_id=SYNTHETIC)
    # the liar's manifest promises other bytes than it serves for its first tensor
    victim = await publish_a_lie(registry_url, "liar", 0)
    target = Target("arena")
    report, registry = await striped_load(
        registry_url, target, stripe=stripe, selection=ordered("liar", "honest")
    )
    assert report.loaded, report.reason
    corrupt = [a for a in report.attempts if a.outcome.name == "Corrupt"]
    assert len(corrupt) == 1 and corrupt[0].marked_stale and corrupt[0].outcome.source_id == "liar"
    assert not any(a.marked_stale for a in report.attempts if a.outcome.source_id == "honest")
    assert corrupt[0].outcome.bad_tensors == (victim,)  # type: ignore[union-attr]
    assert (await registry.get("liar")).state is SourceState.STALE  # type: ignore[union-attr]
    reread = [a for a in report.loaded_parts() if a.byte_range == (0, TENSOR_BYTES)]
    assert len(reread) == 1 and reread[0].outcome.source_id == "honest"
    # the bad tensor's bytes came twice, everything else once
    assert target.bytes_written == target.nbytes + TENSOR_BYTES
    assert_equal_to(target, checkpoint)
    assert_parts_cover_once(report, target.nbytes)
    await registry.aclose()


async def test_mixed_layouts_stripe_region_parts_and_tensor_parts_and_the_chunked_source_stays_ready(
    peers: Peers, registry_url: str
) -> None:
    peers.start(("arena-src", "arena"), ("chunked-src", "chunked:16777216"), model_id=MODEL_ID)
    target = Target("arena")
    report, registry = await striped_load(registry_url, target, MODEL_ID, stripe=2, min_part_bytes=4 << 20)
    assert report.loaded, report.reason
    mismatches = [a for a in report.attempts if a.outcome.name == "LayoutMismatch"]
    assert mismatches and all(a.outcome.bytes_moved == 0 and not a.marked_stale for a in mismatches)
    assert {a.outcome.source_id for a in mismatches} == {"chunked-src"}
    strategies = {(a.outcome.source_id, a.outcome.strategy) for a in report.loaded_parts()}
    assert ("arena-src", "rdma_region") in strategies and ("chunked-src", "rdma_tensor") in strategies
    assert (await registry.get("chunked-src")).state is SourceState.READY  # type: ignore[union-attr]
    reference = load_file(str(minilm_dir() / "model.safetensors"))
    for name, tensor in reference.items():
        assert torch.equal(target.tensors()[name].view(torch.uint8), tensor.view(torch.uint8)), name
    assert_parts_cover_once(report, target.nbytes)
    await registry.aclose()


class _KillAfterHalf(LoadObserver):
    """SIGKILLs the source once parts holding at least half of the model landed from it."""

    def __init__(self, victim: Any, total: int) -> None:
        self.victim, self.total, self.landed = victim, total, 0

    def attempt_done(self, record: AttemptRecord) -> None:
        if record.outcome.source_id == "victim":
            self.landed += sum(end - start for start, end in record.landed)
            if self.landed * 2 >= self.total and self.victim.proc.poll() is None:
                self.victim.kill()


async def test_stripe_1_a_source_killed_after_half_the_model_landed_costs_only_the_rest(
    peers: Peers, registry_url: str, checkpoint: Path
) -> None:
    """One reader, real processes: the model arrives in parts (half first); the source is SIGKILLed
    once half landed, the next part fails, and the other source reads only what had not landed."""
    victim, _b = peers.start(
        ("victim", "arena"), ("b", "arena"), weights=checkpoint, model_id=SYNTHETIC, ttl=120.0
    )
    target = Target("arena")
    killer = _KillAfterHalf(victim, TENSORS * TENSOR_BYTES)
    report, registry = await striped_load(
        registry_url, target, stripe=1, selection=ordered("victim", "b"), observers=[killer], load_timeout=120
    )
    assert report.loaded, report.reason
    assert victim.proc.poll() is not None  # it was killed mid-load
    from_victim = sum(
        e - s for a in report.loaded_parts() if a.outcome.source_id == "victim" for s, e in a.landed
    )
    assert from_victim * 2 >= target.nbytes
    failed = [a for a in report.attempts if a.outcome.name in ("SourceFailed", "SourceUnreachable")]
    assert failed and all(a.outcome.source_id == "victim" for a in failed)
    biggest_part = max(a.byte_range[1] - a.byte_range[0] for a in report.attempts if a.byte_range)
    assert target.bytes_written <= target.nbytes + biggest_part
    assert all(a.byte_range is not None for a in report.attempts if a.outcome.name == "Loaded")
    assert_equal_to(target, checkpoint)
    assert_parts_cover_once(report, target.nbytes)
    await registry.aclose()


async def test_junk_records_outnumbering_the_honest_source_do_not_stop_a_stripe_2_load(
    peers: Peers, registry_url: str
) -> None:
    """Three records that publish the honest manifest relabelled (F32 -> I32) with garbage connection
    metadata, ranked first: the striped load connects before it allocates, so none of them shapes the
    target; the honest process delivers every byte."""
    peers.start(("honest", "arena"), model_id=MODEL_ID)
    registry = SqliteRegistry(registry_url.removeprefix("sqlite://"))
    honest = await registry.get("honest")
    assert honest is not None
    manifest = await registry.get_manifest("honest", honest.generation)
    assert manifest is not None
    relabelled = replace(
        manifest, tensors=tuple(replace(t, dtype="I32") if t.dtype == "F32" else t for t in manifest.tensors)
    )
    junk = await publish_junk(registry, "honest", 3, manifest=relabelled)
    await registry.aclose()
    target = Target("arena")
    report, registry = await striped_load(
        registry_url,
        target,
        MODEL_ID,
        stripe=2,
        min_part_bytes=4 << 20,
        selection=ordered(*junk, "honest"),
    )
    assert report.loaded, report.reason
    assert target.allocations == [target.nbytes]
    assert {a.outcome.source_id for a in report.loaded_parts()} == {"honest"}
    junk_attempts = [a for a in report.attempts if (a.outcome.source_id or "").startswith("junk")]
    assert junk_attempts and all(
        a.outcome.bytes_moved == 0 and a.outcome.name != "Loaded" for a in junk_attempts
    )
    reference = load_file(str(minilm_dir() / "model.safetensors"))
    for name, tensor in reference.items():
        assert torch.equal(target.tensors()[name].view(torch.uint8), tensor.view(torch.uint8)), name
    await registry.aclose()


async def test_a_striped_load_behind_a_full_source_waits_for_capacity_and_loads_from_the_peer(
    peers: Peers, registry_url: str
) -> None:
    """The only source admits one reader, and another holds that slot for 3 s: ``stripe=2`` waits for
    capacity (never falling back, never blaming) and then loads from the peer."""
    peers.start(("only", "arena"), model_id=MODEL_ID, max_readers=1)
    holder = SqliteRegistry(registry_url.removeprefix("sqlite://"))
    record = await holder.get("only")
    assert record is not None and await holder.lease_reader("only", record.generation, "someone-else", 3.0)
    await holder.aclose()
    target = Target("arena")
    report, registry = await striped_load(
        registry_url, target, MODEL_ID, stripe=2, min_part_bytes=4 << 20, load_timeout=60
    )
    assert report.loaded, report.reason
    assert report.capacity_waits >= 1 and report.seconds >= 2.5
    assert {a.outcome.source_id for a in report.loaded_parts()} == {"only"}
    assert all(not a.marked_stale for a in report.attempts)
    assert (await registry.get("only")).state is SourceState.READY  # type: ignore[union-attr]
    await registry.aclose()


@pytest.mark.parametrize("stripe", [1, 3])
async def test_two_revisions_served_by_real_processes_are_never_spliced(
    peers: Peers, registry_url: str, tmp_path: Path, stripe: int
) -> None:
    """Two processes serve revision A, one revision B of the same model id, names, dtypes and shapes
    (a fine-tune rolling out): the load's bytes are exactly one revision, verified, and the other
    revision's source is a ManifestMismatch (never STALE) listed in ``manifest_disagreement``."""
    revisions = {}
    for name, seed in (("a", 1), ("b", 2)):
        directory = tmp_path / name
        g = torch.Generator().manual_seed(seed)
        save_checkpoint(
            {f"w.{i}": torch.randn(1 << 18, generator=g) for i in range(8)}, directory / "model.safetensors"
        )
        revisions[name] = directory
    model = "acme/rolling"
    peers.start(("a1", "arena"), ("a2", "arena"), weights=revisions["a"], model_id=model)
    peers.start(("b1", "arena"), weights=revisions["b"], model_id=model)
    target = Target("arena")
    report, registry = await striped_load(
        registry_url,
        target,
        model,
        stripe=stripe,
        min_part_bytes=1 << 20,
        selection=ordered("a1", "b1", "a2"),
    )
    assert report.loaded and report.to_dict()["verified"], report.reason
    assert_equal_to(target, revisions["a"])  # a1 answered first: revision A, every byte of it
    assert "b1" not in report.bytes_by_source()
    refused = [a for a in report.attempts if a.outcome.source_id == "b1"]
    assert all(a.outcome.name == "ManifestMismatch" and not a.marked_stale for a in refused)
    assert sorted(map(sorted, report.manifest_disagreement.values())) == [["a1", "a2"], ["b1"]]
    assert (await registry.get("b1")).state is SourceState.READY  # type: ignore[union-attr]
    await registry.aclose()
