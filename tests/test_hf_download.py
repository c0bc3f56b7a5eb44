"""hf_download with the real huggingface_hub client against the loopback Hub server (real HTTP)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mx_orchestrator import ModelIdentity, Orchestrator, SourceState
from mx_orchestrator.outcomes import LayoutMismatch, SourceFailed
from mx_orchestrator.report import LoadReport
from mx_orchestrator.target import Target
from mx_orchestrator.testing import FakeStrategy, fail, scenario
from mx_orchestrator.testing.hub import HubServer
from mx_orchestrator.testing.peers import MODEL_ID, minilm_dir
from strategies.hf_download import HfDownload, safe_relative_path

pytestmark = pytest.mark.hub

IDENTITY = ModelIdentity(MODEL_ID)
WEIGHTS = "model.safetensors"


@pytest.fixture
def hub() -> Iterator[HubServer]:
    with HubServer({MODEL_ID: minilm_dir()}) as server:
        yield server


def strategy(hub: HubServer, tmp_path: Path, **kwargs: object) -> HfDownload:
    return HfDownload(MODEL_ID, endpoint=hub.endpoint, cache_dir=tmp_path / "cache", **kwargs)  # type: ignore[arg-type]


async def load(hub: HubServer, tmp_path: Path, target: Target | None = None, **kwargs: object) -> LoadReport:
    attempt_timeout = float(kwargs.pop("attempt_timeout", 60))  # type: ignore[arg-type]
    orch = Orchestrator(None, [strategy(hub, tmp_path, **kwargs)], attempt_timeout=attempt_timeout)
    return await orch.load(IDENTITY, target or Target("arena"))


def assert_same_weights(target: Target) -> None:
    reference = load_file(str(minilm_dir() / WEIGHTS))
    loaded = target.tensors()
    assert loaded.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(loaded[name], tensor), name


async def test_minilm_loads_verified_and_equal_to_the_file(hub: HubServer, tmp_path: Path) -> None:
    target = Target("arena")
    report = await load(hub, tmp_path, target)
    data = report.to_dict()
    assert data["outcome"] == "loaded" and data["strategy"] == "hf_download" and data["verified"] is True
    assert data["bytes"] == 90_856_960
    assert_same_weights(target)
    # it went into huggingface_hub's normal cache layout
    assert list(
        (tmp_path / "cache").glob(
            "models--sentence-transformers--all-MiniLM-L6-v2/snapshots/*/model.safetensors"
        )
    )


async def test_second_load_uses_the_cache_without_file_gets(hub: HubServer, tmp_path: Path) -> None:
    assert (await load(hub, tmp_path)).loaded
    gets_after_first = len(hub.file_gets())
    assert gets_after_first > 0
    report = await load(hub, tmp_path)
    assert report.loaded and report.final is not None and report.final.verified
    assert len(hub.file_gets()) == gets_after_first


async def test_preallocated_tensors_are_filled_in_place(hub: HubServer, tmp_path: Path) -> None:
    engine = {n: torch.zeros_like(t) for n, t in load_file(str(minilm_dir() / WEIGHTS)).items()}
    pointers = {n: t.data_ptr() for n, t in engine.items()}
    report = await load(hub, tmp_path, Target.from_tensors(IDENTITY, engine))
    assert report.loaded
    assert {n: t.data_ptr() for n, t in engine.items()} == pointers
    assert torch.count_nonzero(engine["embeddings.word_embeddings.weight"]) > 0


@pytest.mark.parametrize(
    ("fault", "outcome", "needle"),
    [
        ("repo_not_found", "SourceUnreachable", "RepositoryNotFound"),
        ("revision_not_found", "SourceUnreachable", "RevisionNotFound"),
        ("gated", "SourceUnreachable", "unauthorized"),
    ],
)
@pytest.mark.faults
async def test_hub_refusals_are_typed(
    hub: HubServer, tmp_path: Path, fault: str, outcome: str, needle: str
) -> None:
    setattr(hub.faults, fault, True)
    report = await load(hub, tmp_path)
    assert not report.loaded
    (attempt,) = report.attempts
    assert attempt.outcome.name == outcome and needle in attempt.outcome.detail, attempt.outcome.detail


@pytest.mark.faults
async def test_missing_weights_file_is_typed(hub: HubServer, tmp_path: Path) -> None:
    hub.faults.entry_not_found.add(WEIGHTS)
    report = await load(hub, tmp_path)
    assert report.attempts[0].outcome.name == "SourceUnreachable"
    assert "EntryNotFound" in report.attempts[0].outcome.detail


@pytest.mark.faults
async def test_transient_server_errors_are_retried_with_backoff(hub: HubServer, tmp_path: Path) -> None:
    hub.faults.server_errors = 2
    report = await load(hub, tmp_path)
    assert report.loaded
    assert hub.faults.server_errors == 0


@pytest.mark.faults
async def test_persistent_server_errors_end_in_source_failed(hub: HubServer, tmp_path: Path) -> None:
    hub.faults.server_errors = 1000
    report = await load(hub, tmp_path, max_tries=3)
    assert report.attempts[0].outcome.name == "SourceFailed"
    assert "500" in report.attempts[0].outcome.detail


@pytest.mark.faults
async def test_truncated_body_fails_then_recovers_when_the_fault_goes(hub: HubServer, tmp_path: Path) -> None:
    hub.faults.truncate.add(WEIGHTS)
    # huggingface_hub itself resumes a cut body five times, a second apart: one try of ours is enough
    report = await load(hub, tmp_path, max_tries=1)
    assert report.attempts[0].outcome.name == "SourceFailed", report.attempts[0].outcome
    hub.faults.truncate.clear()
    assert (await load(hub, tmp_path)).loaded


@pytest.mark.faults
async def test_corrupt_file_of_the_right_size_is_corrupt_and_recovers_without_manual_cleanup(
    hub: HubServer, tmp_path: Path
) -> None:
    hub.faults.corrupt.add(WEIGHTS)
    target = Target("arena")
    report = await load(hub, tmp_path, target)
    (attempt,) = report.attempts
    assert attempt.outcome.name == "Corrupt" and not report.loaded
    assert "sha256" in attempt.outcome.detail
    hub.faults.corrupt.clear()
    target = Target("arena")
    report = await load(hub, tmp_path, target)
    assert report.loaded and report.final is not None and report.final.verified
    assert_same_weights(target)


@pytest.mark.faults
async def test_slow_hub_ends_in_timed_out_at_the_deadline(hub: HubServer, tmp_path: Path) -> None:
    hub.faults.delay = 3.0
    report = await load(hub, tmp_path, attempt_timeout=1.0)
    (attempt,) = report.attempts
    assert attempt.outcome.name == "TimedOut" and attempt.outcome.seconds < 2.5


@pytest.mark.faults
async def test_tree_entries_escaping_the_snapshot_are_refused(hub: HubServer, tmp_path: Path) -> None:
    hub.faults.extra_tree_paths.append("../../outside.safetensors")
    report = await load(hub, tmp_path)
    (attempt,) = report.attempts
    assert attempt.outcome.name == "SourceFailed" and "unsafe path" in attempt.outcome.detail
    assert not (tmp_path / "outside.safetensors").exists()


@pytest.mark.parametrize(
    "path", ["../x", "a/../../x", "/etc/passwd", "a\\..\\b", "c:/x", "a//b", "", "x\x00y"]
)
@pytest.mark.faults
def test_unsafe_relative_paths_are_rejected(path: str) -> None:
    assert safe_relative_path(path) is None


def test_safe_relative_paths_are_kept() -> None:
    assert safe_relative_path("model.safetensors") == "model.safetensors"
    assert safe_relative_path("1_Pooling/config.json") == "1_Pooling/config.json"


async def test_no_repo_configured_is_not_applicable() -> None:
    report = await Orchestrator(None, [HfDownload()]).load(IDENTITY, None)
    assert report.attempts[0].outcome.name == "NotApplicable"


async def test_pipeline_falls_back_to_the_hub_when_every_peer_fails(hub: HubServer, tmp_path: Path) -> None:
    registry, prober = await scenario(IDENTITY, ["p1", "p2"])
    peers = FakeStrategy("rdma_region", {"p1": [fail(LayoutMismatch)], "p2": [fail(SourceFailed)]})
    target = Target("arena")
    report = await Orchestrator(registry, [peers, strategy(hub, tmp_path)], prober=prober).load(
        IDENTITY, target
    )
    assert report.loaded and report.final is not None and report.final.strategy == "hf_download"
    assert registry.state_of("p1") is SourceState.READY and registry.state_of("p2") is SourceState.STALE
    assert_same_weights(target)


async def test_download_progress_reaches_the_callback(hub: HubServer, tmp_path: Path) -> None:
    seen: list[int] = []
    orch = Orchestrator(None, [strategy(hub, tmp_path)])
    report = await orch.load(IDENTITY, Target("arena"), progress=lambda done, total: seen.append(done))
    assert report.loaded
    assert seen and max(seen) >= 90_856_960  # every byte of the weights was counted


@pytest.mark.hub
async def test_a_sharded_repo_downloads_only_the_files_its_index_names(tmp_path: Path) -> None:
    """Shards, their index and a Mistral-style consolidated.safetensors beside them: the latter is not fetched."""
    import json as jsonlib

    from safetensors.torch import save_file

    tensors = load_file(str(minilm_dir() / WEIGHTS))
    names = sorted(tensors)
    repo = tmp_path / "sharded"
    repo.mkdir()
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in halves.items():
        save_file({n: tensors[n] for n in part}, str(repo / file), metadata={"format": "pt"})
    save_file(tensors, str(repo / "consolidated.safetensors"), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {n: f for f, part in halves.items() for n in part}}
    (repo / "model.safetensors.index.json").write_text(jsonlib.dumps(index))
    (repo / "config.json").write_text("{}")
    with HubServer({"acme/sharded": repo}) as hub:
        target = Target("arena")
        report = await Orchestrator(
            None, [HfDownload("acme/sharded", endpoint=hub.endpoint, cache_dir=tmp_path / "cache")]
        ).load(IDENTITY, target)
        gets = hub.file_gets()
    assert report.loaded and report.final is not None and report.final.verified
    assert not any("consolidated" in g for g in gets)
    assert sum("model-0000" in g for g in gets) == 2
    assert "skipped" in report.final.detail and "consolidated.safetensors" in report.final.detail
    size = (repo / "consolidated.safetensors").stat().st_size
    assert f"{size:,} bytes" in report.final.detail
    for name, tensor in tensors.items():
        assert torch.equal(target.tensors()[name], tensor)
