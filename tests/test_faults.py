"""The fault and hostile-input suite (``pytest -m faults``), with the fault tests in the other modules.

Every case asserts a typed outcome (or a clear error for misuse), that no
unverified bytes are accepted, that nothing is written outside the target's
buffers, that nothing leaks (NIXL handles, remote agents, registrations,
threads, processes), that it ends within its deadline, and that a healthy
source is never marked STALE for a target-side problem.
"""

from __future__ import annotations

import base64
import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mx_orchestrator import (
    Manifest,
    ManifestError,
    ModelIdentity,
    Orchestrator,
    Region,
    SourceState,
    TensorSpec,
)
from mx_orchestrator._backends.nixl import get_agent
from mx_orchestrator._backends.pool import release_connections
from mx_orchestrator.buffers import Buffers
from mx_orchestrator.layout import parse_layout, plan_layout, plan_region_reads, plan_tensor_reads
from mx_orchestrator.models import MAX_TENSORS, SourceRecord
from mx_orchestrator.pullplan import parse_advert
from mx_orchestrator.registry.sqlite import SqliteRegistry
from mx_orchestrator.target import Target
from mx_orchestrator.testing import FakeProber, FakeStrategy, make_manifest, make_record, scenario, succeed
from mx_orchestrator.testing.hub import HubServer
from mx_orchestrator.testing.peers import MODEL_ID, Peers, minilm_dir
from strategies.hf_download import HfDownload
from strategies.rdma_region import RdmaRegion
from strategies.rdma_tensor import RdmaTensor

pytestmark = pytest.mark.faults

IDENTITY = ModelIdentity(MODEL_ID)


@pytest.fixture
def no_leaks() -> Iterator[None]:
    agent = get_agent()
    release_connections()  # pooled connections of earlier tests are not this test's
    before = (agent.stats.handles_open, agent.stats.remote_agents, agent.stats.registrations)
    threads = threading.active_count()
    yield
    release_connections()  # kept on purpose across loads; what must not leak is everything else
    assert (agent.stats.handles_open, agent.stats.remote_agents, agent.stats.registrations) == before
    deadline = time.monotonic() + 5  # worker threads wind down on their own
    while threading.active_count() > threads + 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() <= threads + 2


def ordered(*ids: str) -> Any:
    rank = {sid: float(i) for i, sid in enumerate(ids)}
    return lambda _t: lambda c: (rank.get(c.source_id, 99.0),)


# -- source faults ----------------------------------------------------------------


@pytest.mark.nixl
async def test_restarted_source_same_id_new_generation_is_used_at_once(
    peers: Peers, registry_url: str, no_leaks: None
) -> None:
    (first,) = peers.start(("phoenix", "arena"))
    old_generation = first.generation
    first.kill()
    (second,) = peers.start(("phoenix", "arena"))
    registry = SqliteRegistry(registry_url.removeprefix("sqlite://"))
    (record,) = await registry.list(IDENTITY.key)
    assert record.generation == second.generation != old_generation
    report = await Orchestrator(registry, [RdmaRegion()]).load(IDENTITY, Target("arena"))
    assert report.loaded and report.final is not None and report.final.source_id == "phoenix"
    await registry.aclose()


@pytest.mark.nixl
async def test_cancel_mid_transfer_releases_everything(
    peers: Peers, registry_url: str, no_leaks: None
) -> None:
    (frozen,) = peers.start(("frozen", "arena"))
    frozen.signal(19)  # SIGSTOP: the READ cannot complete
    registry = SqliteRegistry(registry_url.removeprefix("sqlite://"))
    began = time.monotonic()
    with anyio.move_on_after(1.0) as scope:
        await Orchestrator(registry, [RdmaRegion()], attempt_timeout=30).load(IDENTITY, Target("arena"))
    assert scope.cancelled_caught and time.monotonic() - began < 3
    record = await registry.get("frozen")
    assert record is not None and record.state is SourceState.READY and record.load == 0
    await registry.aclose()


@pytest.mark.nixl
async def test_nixl_metadata_that_is_not_nixl_metadata_is_unreachable(
    registry_url: str, no_leaks: None
) -> None:
    registry = SqliteRegistry(registry_url.removeprefix("sqlite://"))
    manifest = make_manifest(IDENTITY, 3)
    record = make_record(IDENTITY, "impostor")
    transport = {
        "nixl_agent": "impostor",
        "nixl_metadata": base64.b64encode(b"\x00garbage, not NIXL" * 20).decode(),
        "nixl_mem": "DRAM",
        "nixl_regions": json.dumps([[4096, r.nbytes, 0] for r in manifest.regions]),
    }
    await registry.publish(SourceRecord.from_dict({**record.to_dict(), "transport": transport}), manifest)
    target = Target("arena")
    report = await Orchestrator(registry, [RdmaRegion(), RdmaTensor()]).load(IDENTITY, target)
    assert [a.outcome.name for a in report.attempts] == ["SourceUnreachable"]
    assert report.attempts[0].outcome.bytes_moved == 0 and not report.loaded
    await registry.aclose()


# -- target faults ------------------------------------------------------------------


class OutOfMemoryTarget(Target):
    def _allocate(self, planned: Manifest) -> Buffers:
        raise MemoryError("simulated: cannot allocate 90 MB")


@pytest.mark.nixl
async def test_allocation_failure_is_local_and_never_marks_the_source_stale(
    peers: Peers, registry_url: str, no_leaks: None
) -> None:
    peers.start(("healthy", "tensor"))
    registry = SqliteRegistry(registry_url.removeprefix("sqlite://"))
    report = await Orchestrator(registry, [RdmaTensor()]).load(IDENTITY, OutOfMemoryTarget("arena"))
    (attempt,) = report.attempts
    assert attempt.outcome.name == "LocalFailure" and "allocate" in attempt.outcome.detail
    assert not attempt.marked_stale
    record = await registry.get("healthy")
    assert record is not None and record.state is SourceState.READY
    await registry.aclose()


async def test_deadline_expiring_during_evaluation_ends_the_load_in_time(identity: ModelIdentity) -> None:
    registry, _ = await scenario(identity, ["slow-a", "slow-b"])
    prober = FakeProber(default_manifest=make_manifest(identity), latency=30.0)
    began = time.monotonic()
    report = await Orchestrator(
        registry,
        [FakeStrategy("rdma_region", default=succeed())],
        prober=prober,
        probe_timeout=60,
        load_timeout=0.5,
    ).load(identity)
    assert not report.loaded and "deadline" in report.reason
    assert time.monotonic() - began < 1.5
    assert prober.running == 0


# -- registry faults --------------------------------------------------------------


async def test_sqlite_file_locked_by_another_writer_is_a_typed_outage(
    tmp_path: Path, identity: ModelIdentity
) -> None:
    """Writes fail typed and fast; WAL lets reads, hence loads, go on meanwhile."""
    from mx_orchestrator import RegistryUnavailable

    path = tmp_path / "locked.db"
    registry = SqliteRegistry(path, busy_timeout=0.2)
    await registry.publish(make_record(identity, "a"), make_manifest(identity))
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        began = time.monotonic()
        with pytest.raises(RegistryUnavailable, match="locked"):
            await registry.publish(make_record(identity, "b"))
        assert time.monotonic() - began < 2
        peer = FakeStrategy("rdma_region", default=succeed())
        report = await Orchestrator(registry, [peer]).load(identity)
        assert report.loaded and report.final is not None and report.final.source_id == "a"
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    await registry.publish(make_record(identity, "c"))
    assert {r.source_id for r in await registry.list(identity.key)} == {"a", "c"}
    await registry.aclose()


# -- hub faults ---------------------------------------------------------------------


@pytest.mark.hub
@pytest.mark.parametrize(
    ("fault", "expected"), [("slow_body", "TimedOut"), ("redirect_loop", "SourceFailed")]
)
async def test_hostile_hub_behaviour_is_typed_and_bounded(tmp_path: Path, fault: str, expected: str) -> None:
    with HubServer({MODEL_ID: minilm_dir()}) as hub:
        getattr(hub.faults, fault).add("model.safetensors")
        strategy = HfDownload(
            MODEL_ID, endpoint=hub.endpoint, cache_dir=tmp_path, max_tries=2, request_timeout=1.0
        )
        began = time.monotonic()
        report = await Orchestrator(None, [strategy], attempt_timeout=3.0).load(IDENTITY, Target("arena"))
    assert time.monotonic() - began < 6
    # once the hostile server is gone, the abandoned download thread ends too
    deadline = time.monotonic() + 15
    while any(t.name.startswith("AnyIO worker") and t.is_alive() and _busy(t) for t in threading.enumerate()):
        assert time.monotonic() < deadline, "a download thread outlived the hub server"
        await anyio.sleep(0.1)
    (attempt,) = report.attempts
    assert attempt.outcome.name == expected, attempt.outcome
    assert not report.loaded


def _busy(thread: threading.Thread) -> bool:
    """True while a thread is inside huggingface_hub (an idle pool worker waits in the threading module)."""
    import sys
    import traceback

    frame = sys._current_frames().get(thread.ident or -1)
    return frame is not None and any("huggingface_hub" in f.filename for f in traceback.extract_stack(frame))


# -- hostile manifests and metadata -------------------------------------------------


@pytest.mark.parametrize(
    "mutate",
    [
        lambda m: m["regions"].__setitem__(0, -1),
        lambda m: m["regions"].__setitem__(0, 1 << 62),
        lambda m: m["tensors"][0].__setitem__("offset", 1 << 40),
        lambda m: m["tensors"][1].__setitem__("offset", m["tensors"][0]["offset"]),
        lambda m: m["tensors"].append(dict(m["tensors"][0])),
        lambda m: m["tensors"][0].__setitem__("dtype", "F128"),
        lambda m: m["tensors"][0].__setitem__("shape", [1 << 40, 1 << 40]),
        lambda m: m["tensors"][0].__setitem__("shape", [-4]),
        lambda m: m["tensors"][0].__setitem__("region", 7),
        lambda m: m["tensors"][0].__setitem__("name", "x" * 5000),
        lambda m: m["tensors"][0].__setitem__("shape", [1.5]),
        lambda m: m.__setitem__("regions", "lots"),
        lambda m: m["identity"].__setitem__("model_id", "../../etc/passwd"),
    ],
    ids=[
        "negative-region",
        "huge-region",
        "offset-outside",
        "overlap",
        "duplicate-name",
        "unknown-dtype",
        "huge-shape",
        "negative-dim",
        "missing-region",
        "long-name",
        "float-dim",
        "regions-not-list",
        "bad-identity",
    ],
)
def test_hand_made_hostile_manifests_are_refused_with_a_typed_error(mutate: Any) -> None:
    data = json.loads(make_manifest(IDENTITY, 4).to_json())
    mutate(data)
    with pytest.raises(ManifestError):
        Manifest.from_json(json.dumps(data))


def test_millions_of_tiny_tensors_are_refused_quickly() -> None:
    tensors = [{"name": f"t{i}", "dtype": "U8", "shape": [1], "offset": i} for i in range(MAX_TENSORS + 1)]
    text = json.dumps({"identity": {"model_id": "a/b"}, "regions": [MAX_TENSORS + 1], "tensors": tensors})
    began = time.monotonic()
    with pytest.raises(ManifestError, match=r"limit|more than"):
        Manifest.from_json(text)
    assert time.monotonic() - began < 10  # refused before a million specs are built (that takes minutes)


def test_oversized_manifest_payload_is_refused_before_parsing() -> None:
    with pytest.raises(ManifestError, match="size limit"):
        Manifest.from_json(b"{" + b" " * (65 << 20) + b"}")


@pytest.mark.parametrize(
    "transport",
    [
        {},
        {"nixl_agent": "x", "nixl_metadata": "!!!not-base64!!!", "nixl_regions": "[[1,4096,0]]"},
        {"nixl_agent": "x", "nixl_metadata": "QQ==" * (1 << 19), "nixl_regions": "[[1,4096,0]]"},
        {"nixl_agent": "x", "nixl_metadata": "QQ==", "nixl_regions": "[[1,4096,0],[2,4096,0]]"},
        {"nixl_agent": "x", "nixl_metadata": "QQ==", "nixl_regions": "[[1,999,0]]"},
        {"nixl_agent": "x", "nixl_metadata": "QQ==", "nixl_regions": "[[-1,4096,0]]"},
        {"nixl_agent": "x", "nixl_metadata": "QQ==", "nixl_regions": '[["a",4096,0]]'},
        {"nixl_agent": "x", "nixl_metadata": "QQ==", "nixl_regions": "[[18446744073709551615,4096,0]]"},
        {"nixl_agent": "x", "nixl_metadata": "QQ==", "nixl_mem": "GPU", "nixl_regions": "[[1,4096,0]]"},
        {"nixl_agent": "x", "nixl_metadata": "QQ==", "nixl_regions": "{not json"},
    ],
)
def test_hostile_nixl_advertisements_are_refused_before_nixl_sees_them(transport: dict[str, str]) -> None:
    manifest = make_manifest(IDENTITY, 4)  # one region of 4096 bytes
    assert isinstance(parse_advert(transport, manifest), str)


manifests = st.builds(
    lambda shapes, layout: plan_layout(
        IDENTITY, [(f"t{i}", dtype, shape) for i, (dtype, shape) in enumerate(shapes)], parse_layout(layout)
    ),
    st.lists(
        st.tuples(
            st.sampled_from(["F32", "BF16", "U8", "I64"]), st.lists(st.integers(0, 40), max_size=3).map(tuple)
        ),
        min_size=1,
        max_size=30,
    ),
    st.sampled_from(["arena", "chunked:256", "chunked:4KiB"]),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(source=manifests, target=manifests, base=st.integers(1 << 20, 1 << 40))
def test_planned_descriptors_never_leave_the_target_buffers(
    source: Manifest, target: Manifest, base: int
) -> None:
    """Whatever two manifests meet, a plan is either refused (a reason) or stays inside local memory."""
    remote_spans = [(base + i * (1 << 30), r.nbytes) for i, r in enumerate(source.regions)]
    local_spans = [((7 << 40) + i * (1 << 30), r.nbytes) for i, r in enumerate(target.regions)]
    for plan in (plan_region_reads, plan_tensor_reads):
        result = plan(source, remote_spans, target, local_spans)
        if isinstance(result, str):
            continue
        local, remote = result
        assert sum(n for _, n in local) == sum(n for _, n in remote)
        for address, nbytes in local:
            assert any(b <= address and address + nbytes <= b + size for b, size in local_spans)
        for address, nbytes in remote:
            assert any(b <= address and address + nbytes <= b + size for b, size in remote_spans)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(1 << 70), 1 << 70)
    | st.floats(allow_nan=True)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(
    data=st.fixed_dictionaries(
        {"identity": json_values, "regions": json_values, "tensors": json_values},
        optional={"checksum_algorithm": json_values},
    )
)
def test_arbitrary_json_manifests_either_validate_or_raise_manifest_error(data: dict[str, Any]) -> None:
    try:
        manifest = Manifest.from_json(json.dumps(data))
    except ManifestError:
        return
    for spec in manifest.tensors:
        assert spec.end <= manifest.regions[spec.region].nbytes


RECORD_KEYS = [
    "source_id", "identity_key", "generation", "state", "load", "heartbeat_at", "ttl", "labels", "transport",
    "times_ejected", "ejected_until", "stale_reason",
]  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(data=st.dictionaries(st.sampled_from(RECORD_KEYS), json_values))
def test_arbitrary_source_records_either_validate_or_raise_manifest_error(data: dict[str, Any]) -> None:
    with contextlib.suppress(ManifestError):
        SourceRecord.from_dict(data)


def test_a_tensor_larger_than_the_preallocated_buffer_never_gets_a_descriptor() -> None:
    source = make_manifest(IDENTITY, [("w", "F32", (1024,))])
    engine = {"w": torch.zeros(1000)}
    target = Target.from_tensors(IDENTITY, engine)
    assert target.manifest is not None
    result = plan_tensor_reads(
        source, [(1 << 30, source.regions[0].nbytes)], target.manifest, target.region_spans()
    )
    assert isinstance(result, str) and "'w'" in result


def test_manifest_spec_validation_examples() -> None:
    with pytest.raises(ManifestError):
        Manifest(IDENTITY, (TensorSpec("a", "F32", (4,), 0, 0),), (Region(8),))
