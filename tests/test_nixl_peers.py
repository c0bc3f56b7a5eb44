"""Real NIXL transfers from real source processes on loopback (CPU memory), real MiniLM weights."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import pytest
import torch
from safetensors.torch import load_file

from mx_orchestrator import ModelIdentity, Orchestrator, Policy, SourceState
from mx_orchestrator.checkpoint import save_checkpoint
from mx_orchestrator.registry.sqlite import SqliteRegistry
from mx_orchestrator.report import LoadReport
from mx_orchestrator.target import Target
from mx_orchestrator.testing.peers import MODEL_ID, Peers, minilm_dir
from strategies.rdma_region import RdmaRegion
from strategies.rdma_tensor import RdmaTensor

pytestmark = [pytest.mark.nixl, pytest.mark.usefixtures("no_nixl_leaks")]

IDENTITY = ModelIdentity(MODEL_ID)


def original() -> dict[str, torch.Tensor]:
    return load_file(str(minilm_dir() / "model.safetensors"))


def assert_same_weights(target: Target) -> None:
    loaded = target.tensors()
    reference = original()
    assert loaded.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(loaded[name].view(torch.uint8), tensor.view(torch.uint8)), name


def ordered(*ids: str):  # type: ignore[no-untyped-def]
    rank = {sid: float(i) for i, sid in enumerate(ids)}
    return lambda _target: lambda c: (rank.get(c.source_id, 99.0),)


async def load(registry_url: str, target: Target, **kwargs: object) -> tuple[LoadReport, SqliteRegistry]:
    registry = SqliteRegistry(registry_url.removeprefix("sqlite://"))
    strategies = kwargs.pop("strategies", None) or [RdmaRegion(), RdmaTensor()]
    kwargs.setdefault("rank_window", 5.0)  # every source is ranked before the first attempt
    orchestrator = Orchestrator(registry, strategies, **kwargs)  # type: ignore[arg-type]
    return await orchestrator.load(IDENTITY, target), registry


async def state(registry: SqliteRegistry, source_id: str) -> SourceState | None:
    record = await registry.get(source_id)
    return record.state if record else None


async def test_same_layout_pulls_by_region_and_bytes_equal_the_file(
    peers: Peers, registry_url: str, tmp_path: Path
) -> None:
    peers.start(("arena-src", "arena"))
    target = Target("arena")
    report, registry = await load(registry_url, target)
    data = report.to_dict()
    assert data["outcome"] == "loaded" and data["strategy"] == "rdma_region" and data["verified"]
    # one source, read in parts (half first): every part landed, the ranges cover the model once
    assert {a["outcome"] for a in data["attempts"]} == {"Loaded"}
    assert sorted(tuple(a["range"]) for a in data["attempts"]) == report.landed_ranges()
    assert sum(e - s for s, e in report.landed_ranges()) == data["bytes"]
    assert data["bytes"] == sum(t.numel() * t.element_size() for t in original().values())
    assert_same_weights(target)
    save_checkpoint(target.tensors(), tmp_path / "out" / "model.safetensors")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (
        minilm_dir() / "model.safetensors"
    ).read_bytes()
    await registry.aclose()


async def test_chunked_source_arena_target_is_layout_mismatch_then_tensor_pull(
    peers: Peers, registry_url: str
) -> None:
    peers.start(("chunked-src", "chunked:8MiB"))
    target = Target("arena")
    report, registry = await load(registry_url, target)
    first, *parts = report.attempts
    assert first.outcome.name == "LayoutMismatch" and first.outcome.bytes_moved == 0
    assert "source has" in first.outcome.detail and not first.marked_stale
    assert parts and all(a.outcome.name == "Loaded" and a.outcome.strategy == "rdma_tensor" for a in parts)
    assert {a.outcome.source_id for a in parts} == {"chunked-src"}
    assert await state(registry, "chunked-src") is SourceState.READY
    assert_same_weights(target)
    await registry.aclose()


async def test_tensor_layout_source_into_chunked_target(peers: Peers, registry_url: str) -> None:
    peers.start(("tensor-src", "tensor"))
    target = Target("chunked:4MiB")
    report, registry = await load(registry_url, target)
    assert report.loaded and report.final is not None and report.final.strategy == "rdma_tensor"
    assert_same_weights(target)
    await registry.aclose()


async def test_preallocated_engine_tensors_are_filled_in_place(peers: Peers, registry_url: str) -> None:
    peers.start(("src", "tensor"))
    engine = {name: torch.zeros_like(t) for name, t in original().items()}
    pointers = {name: t.data_ptr() for name, t in engine.items()}
    target = Target.from_tensors(IDENTITY, engine)
    report, registry = await load(registry_url, target)
    assert report.loaded
    assert {name: t.data_ptr() for name, t in engine.items()} == pointers
    for name, tensor in original().items():
        assert torch.equal(engine[name], tensor), name
    await registry.aclose()


@pytest.mark.faults
async def test_manifest_claiming_a_larger_tensor_is_rejected_before_any_transfer(
    peers: Peers, registry_url: str
) -> None:
    peers.start(("src", "arena"))
    engine = {name: torch.zeros_like(t) for name, t in original().items()}
    name = "embeddings.word_embeddings.weight"
    engine[name] = torch.zeros(engine[name].shape[0] - 1, engine[name].shape[1])  # one row short
    target = Target.from_tensors(IDENTITY, engine)
    report, registry = await load(registry_url, target)
    assert not report.loaded
    assert [a.outcome.name for a in report.attempts] == ["ManifestMismatch"]
    assert report.attempts[0].outcome.bytes_moved == 0 and name in report.attempts[0].outcome.detail
    assert torch.count_nonzero(engine[name]) == 0
    assert await state(registry, "src") is SourceState.READY
    await registry.aclose()


@pytest.mark.faults
async def test_source_killed_before_the_pull_is_skipped(peers: Peers, registry_url: str) -> None:
    dead, _alive = peers.start(("dead", "arena"), ("alive", "arena"))
    dead.kill()
    target = Target("arena")
    began = time.monotonic()
    report, registry = await load(
        registry_url, target, selection=ordered("dead", "alive"), attempt_timeout=10
    )
    assert time.monotonic() - began < 8
    assert report.attempts[0].outcome.source_id == "dead"
    assert report.attempts[0].outcome.name == "SourceUnreachable"  # add_remote_agent refuses a dead peer
    assert not report.attempts[0].marked_stale
    assert report.final is not None and report.final.source_id == "alive"
    assert_same_weights(target)
    await registry.aclose()


@pytest.mark.faults
async def test_source_killed_during_the_pull_fails_over(peers: Peers, registry_url: str) -> None:
    """Freeze the source so its READ cannot complete, start the pull, then SIGKILL it mid-transfer."""
    victim, _spare = peers.start(("victim", "arena"), ("spare", "arena"))
    victim.signal(19)  # SIGSTOP: the READ is posted but never completes
    target = Target("arena")

    async def kill_soon() -> None:
        await anyio.sleep(1.0)
        victim.kill()

    async with anyio.create_task_group() as tg:
        tg.start_soon(kill_soon)
        report, registry = await load(
            registry_url, target, selection=ordered("victim", "spare"), attempt_timeout=20
        )
    first = report.attempts[0].outcome
    assert first.source_id == "victim" and first.name == "SourceFailed", first
    assert report.attempts[0].marked_stale and await state(registry, "victim") is SourceState.STALE
    assert first.seconds < 15, "the kill is noticed long before the attempt deadline"
    assert report.final is not None and report.final.source_id == "spare"
    assert_same_weights(target)
    await registry.aclose()


@pytest.mark.faults
async def test_frozen_source_times_out_is_marked_stale_and_another_serves(
    peers: Peers, registry_url: str
) -> None:
    frozen, _healthy = peers.start(("frozen", "arena"), ("healthy", "arena"))
    frozen.signal(19)  # SIGSTOP
    target = Target("arena")
    # a policy that takes 1 s without completion as a stall (the default wants 5 s and more for
    # larger transfers, so that a target's own short deadline never blames a source)
    report, registry = await load(
        registry_url,
        target,
        selection=ordered("frozen", "healthy"),
        attempt_timeout=1.5,
        policy=Policy(stall_floor=1.0, stall_rate=1e9),
    )
    first = report.attempts[0]
    assert first.outcome.name == "TimedOut" and first.marked_stale
    assert 1.0 <= first.outcome.seconds < 5
    assert await state(registry, "frozen") is SourceState.STALE
    assert report.final is not None and report.final.source_id == "healthy"
    assert_same_weights(target)
    await registry.aclose()


async def test_sigterm_unpublishes_the_source(peers: Peers, registry_url: str) -> None:
    (src,) = peers.start(("leaving", "arena"))
    registry = SqliteRegistry(registry_url.removeprefix("sqlite://"))
    assert await registry.get("leaving") is not None
    assert src.terminate() == 0
    assert await registry.get("leaving") is None
    await registry.aclose()


@pytest.mark.faults
async def test_bytes_that_fail_their_checksum_are_corrupt_and_mark_the_source_stale(
    peers: Peers, registry_url: str
) -> None:
    """The liar's manifest promises other bytes than it serves (its checksums are edited in the registry)."""
    from tests.conftest import publish_a_lie

    _liar, _honest = peers.start(("liar", "arena"), ("honest", "arena"))
    victim = await publish_a_lie(registry_url, "liar", 3)
    target = Target("arena")
    report, registry = await load(registry_url, target, selection=ordered("liar", "honest"))
    first = report.attempts[0]
    assert first.outcome.name == "Corrupt" and first.marked_stale
    assert victim in first.outcome.detail
    assert await state(registry, "liar") is SourceState.STALE
    assert report.final is not None and report.final.source_id == "honest" and report.final.verified
    assert_same_weights(target)
    await registry.aclose()


async def test_fan_out_a_loaded_target_serves_the_next_target(
    peers: Peers, registry_url: str, tmp_path: Path
) -> None:
    """The first target republishes what it loaded; the original dies; a second process loads from the first."""
    import json
    import os
    import sys

    from mx_orchestrator.source import ServedWeights, WeightSource

    (origin,) = peers.start(("origin", "arena"))
    target = Target("arena")
    report, registry = await load(registry_url, target)
    assert report.loaded
    assert report.source_hops == 0  # loaded from a seed
    fanout = WeightSource(
        registry, ServedWeights.from_target(target), source_id="fanout", ttl=30, hops=report.source_hops + 1
    )
    async with anyio.create_task_group() as tg:
        await tg.start(fanout.run)
        origin.kill()
        out = tmp_path / "second"
        result = await anyio.run_process(
            [
                sys.executable,
                "-m",
                "mx_orchestrator",
                "pull",
                "--model-id",
                MODEL_ID,
                "--registry",
                registry_url,
                "--out",
                str(out),
                "--json",
                "--timeout",
                "60",
            ],
            check=False,
            env=dict(os.environ, MXO_LOG_LEVEL="warning"),
        )
        tg.cancel_scope.cancel()
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    second = json.loads(result.stdout)
    assert second["source"] == "fanout" and second["verified"] and second["source_hops"] == 1
    assert (out / "model.safetensors").read_bytes() == (minilm_dir() / "model.safetensors").read_bytes()
    assert await registry.get("fanout") is None  # unpublished when it stopped
    await registry.aclose()


def _host_ipv4_addresses() -> dict[str, str]:
    """Interface -> IPv4 address, from the kernel (SIOCGIFADDR), loopback excluded."""
    import fcntl
    import socket
    import struct

    found = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                raw = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue  # no IPv4 address on this interface
            address = socket.inet_ntoa(raw[20:24])
            if not address.startswith("127."):
                found[name] = address
    return found


async def test_a_source_restricted_to_loopback_advertises_no_other_address_and_still_serves(
    peers: Peers, registry_url: str
) -> None:
    import base64
    import socket

    others = _host_ipv4_addresses()
    assert others, "this machine has no non-loopback IPv4 interface: nothing to restrict"
    peers.start(("everywhere", "arena"))
    peers.start(("loopback-only", "arena"), interfaces=("lo",))
    registry = SqliteRegistry(registry_url.removeprefix("sqlite://"))
    published = {}
    for sid in ("everywhere", "loopback-only"):
        record = await registry.get(sid)
        assert record is not None
        published[sid] = base64.b64decode(record.transport["nixl_metadata"])
    packed = [socket.inet_aton(a) for a in others.values()]
    assert any(p in published["everywhere"] for p in packed)  # the control: UCX advertises them by default
    assert not any(p in published["loopback-only"] for p in packed)
    assert not any(a.encode() in published["loopback-only"] for a in others.values())
    await registry.remove("everywhere")
    target = Target("arena")
    report, registry2 = await load(registry_url, target)
    assert report.loaded and report.final is not None and report.final.source_id == "loopback-only"
    assert_same_weights(target)
    await registry.aclose()
    await registry2.aclose()


@pytest.mark.faults
def test_with_a_frozen_and_a_healthy_source_every_pull_keeps_its_deadline(
    peers: Peers, registry_url: str
) -> None:
    """Whichever source ranks first (each pull is a new target id), the healthy one loads within --timeout."""
    import json
    import subprocess
    import sys
    import time

    frozen, _healthy = peers.start(("frozen", "arena"), ("healthy", "arena"), ttl=120.0)
    frozen.signal(19)  # SIGSTOP: it answers nothing, ever
    command = [sys.executable, "-m", "mx_orchestrator", "pull", "--model-id", MODEL_ID,
               "--registry", registry_url, "--timeout", "8", "--json"]  # fmt: skip
    for _ in range(3):
        began = time.monotonic()
        out = subprocess.run(command, capture_output=True, text=True, timeout=60)
        elapsed = time.monotonic() - began
        report = json.loads(out.stdout)
        assert out.returncode == 0 and report["source"] == "healthy", report["attempts"]
        assert report["seconds"] < 8.0 and elapsed < 15.0
    frozen.signal(18)  # SIGCONT, so the fixture can reap it


@pytest.mark.faults
def test_a_reader_cap_holds_when_many_targets_race_for_one_source(peers: Peers, registry_url: str) -> None:
    """Six pulls at once against a source admitting two: two read, four wait for capacity (they
    are refused, or see it full in the listing) and never read, never blame it."""
    import json
    import subprocess
    import sys

    (source,) = peers.start(("seed", "arena"), ttl=120.0, max_readers=2)
    source.signal(19)  # SIGSTOP: the admitted reads never complete, so their leases stay held
    # every pull ends at its own 12 s deadline
    command = [sys.executable, "-m", "mx_orchestrator", "pull", "--model-id", MODEL_ID, "--registry",
               registry_url, "--timeout", "12", "--attempt-timeout", "30", "--json"]  # fmt: skip
    pulls = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        for _ in range(6)
    ]
    try:
        outs = [json.loads(p.communicate(timeout=60)[0]) for p in pulls]
    finally:
        for p in pulls:
            if p.poll() is None:
                p.kill()
        source.signal(18)
    admitted = [o for o in outs if any(a["outcome"] != "SourceBusy" for a in o["attempts"])]
    waited = [o for o in outs if o not in admitted]
    assert len(admitted) == 2 and len(waited) == 4, [[a["outcome"] for a in o["attempts"]] for o in outs]
    for out in waited:
        assert out["capacity_waits"] >= 1 and out["outcome"] == "failed"
        assert all(a["bytes"] == 0 and not a["marked_stale"] for a in out["attempts"])
    # the admitted reads of a frozen source end TimedOut at the deadline, evidence of a stall (STALE
    # is right for them); a refusal for capacity never marks
    assert not any(a["marked_stale"] for o in outs for a in o["attempts"] if a["outcome"] == "SourceBusy")
