"""Content pinning: only the pinned content loads, checked against its SHA-256 digests, whatever sources claim."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
import torch
from safetensors.torch import load_file, save_file

from mx_orchestrator import ConfigError, ModelIdentity, Orchestrator, SourceState
from mx_orchestrator.checkpoint import fingerprint_directory
from mx_orchestrator.digests import tree_digest_reference
from mx_orchestrator.integrity import pin_of
from mx_orchestrator.models import Manifest, TensorSpec, content_fingerprint
from mx_orchestrator.registry.sqlite import SqliteRegistry
from mx_orchestrator.source import WeightSource, load_weights
from mx_orchestrator.target import Target
from mx_orchestrator.testing import FakeRdmaNetwork, FakeRegistry
from mx_orchestrator.testing.hub import HubServer
from mx_orchestrator.testing.peers import MODEL_ID, Peers, minilm_dir
from strategies.hf_download import HfDownload
from strategies.rdma_region import RdmaRegion
from strategies.rdma_tensor import RdmaTensor

IDENTITY = ModelIdentity(MODEL_ID)
WEIGHTS = "model.safetensors"


def reference() -> dict[str, torch.Tensor]:
    return load_file(str(minilm_dir() / WEIGHTS))


@pytest.fixture(scope="module")
def pin() -> str:
    return fingerprint_directory(minilm_dir())[0]


@pytest.fixture
def altered_checkpoint(tmp_path: Path) -> Path:
    """all-MiniLM-L6-v2 with one tensor changed: what a lying source serves under the same model id."""
    directory = tmp_path / "altered"
    shutil.copytree(minilm_dir(), directory)
    tensors = reference()
    tensors["pooler.dense.bias"] = (
        tensors["pooler.dense.bias"] + 0.5 if "pooler.dense.bias" in tensors else None
    )
    name = next(iter(n for n in tensors if tensors[n] is not None and tensors[n].dtype == torch.float32))
    tensors = {n: t for n, t in tensors.items() if t is not None}
    tensors[name] = tensors[name] + 1.0
    save_file(tensors, str(directory / WEIGHTS), metadata={"format": "pt"})
    return directory


def test_the_fingerprint_of_a_directory_is_the_cli_s_last_line(pin: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "mx_orchestrator", "fingerprint", "--weights", str(minilm_dir())],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == pin and pin.startswith("mxc2-") and len(pin) == 69
    assert load_weights(IDENTITY, minilm_dir(), "arena").manifest.content_fingerprint == pin


def test_the_pin_commits_to_every_tensor_s_tree_digest_as_defined() -> None:
    """The fingerprint from the memory-mapped files equals one built from the plain definition over
    each tensor's bytes, and equals the pin of the same tensors in memory."""
    fingerprint, rows = fingerprint_directory(minilm_dir())
    tensors = reference()
    for name, tensor in tensors.items():
        data = tensor.contiguous().view(torch.uint8).numpy().tobytes()
        assert rows[name]["digest"] == tree_digest_reference(data)
    assert pin_of(tensors) == (fingerprint, rows)
    assert fingerprint == content_fingerprint(
        (n, str(r["dtype"]), tuple(r["shape"]), str(r["digest"]).removeprefix("sha256t64k:"))  # type: ignore[arg-type]
        for n, r in rows.items()
    )


def test_an_mxc1_pin_is_refused_with_how_to_get_its_successor() -> None:
    with pytest.raises(ConfigError, match="mxo fingerprint"):
        Orchestrator(None, [HfDownload()], expect="mxc1-" + "0" * 64)


def test_a_manifest_with_another_digest_algorithm_has_no_content_fingerprint() -> None:
    """An older source's flat SHA-256 digests are never read as tree digests: nothing to pin to."""
    manifest = load_weights(IDENTITY, minilm_dir(), "arena").manifest
    assert manifest.content_fingerprint is not None
    legacy = Manifest.from_dict({**manifest.to_dict(), "digest_algorithm": "sha256"})
    assert legacy.content_fingerprint is None
    assert legacy.content_key != manifest.content_key
    del_key = {k: v for k, v in manifest.to_dict().items() if k != "digest_algorithm"}
    assert Manifest.from_dict(del_key).digest_algorithm == "sha256"


def test_a_malformed_pin_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="content fingerprint"):
        Orchestrator(None, [HfDownload()], expect="sha256:abc")


@pytest.mark.nixl
async def test_with_a_pin_a_lying_source_is_never_loaded_and_the_bytes_are_the_checkpoint(
    peers: Peers, registry_url: str, altered_checkpoint: Path, pin: str
) -> None:
    peers.start(("liar", "arena"), weights=altered_checkpoint)
    peers.start(("honest", "arena"))
    registry = SqliteRegistry(registry_url.removeprefix("sqlite://"))
    liar_first = 0
    try:
        for i in range(8):  # rendezvous ranks the liar first for some target ids
            target = Target("arena")
            report = await Orchestrator(
                registry, [RdmaRegion(), RdmaTensor()], rank_window=5.0, target_id=f"pinned-{i}", expect=pin
            ).load(IDENTITY, target)
            assert report.loaded and report.final is not None and report.final.source_id == "honest"
            assert report.final.verified and "SHA-256" in report.final.detail
            liar = [a for a in report.attempts if a.outcome.source_id == "liar"]
            liar_first += bool(liar) and report.attempts[0].outcome.source_id == "liar"
            assert all(a.outcome.name == "ManifestMismatch" and a.outcome.bytes_moved == 0 for a in liar)
            assert not any(a.marked_stale for a in liar)
            for name, tensor in reference().items():
                assert torch.equal(target.tensors()[name], tensor), name
        record = await registry.get("liar")
        assert record is not None and record.state is SourceState.READY  # another revision, not a fault
        assert liar_first > 0, "the liar never ranked first: the test proved nothing"
    finally:
        await registry.aclose()


async def test_a_source_publishing_the_pinned_manifest_but_serving_other_bytes_is_corrupt_and_stale() -> None:
    network, registry = FakeRdmaNetwork(), FakeRegistry()
    tensors = {"w": torch.arange(4096, dtype=torch.float32), "b": torch.ones(7)}
    honest = load_weights(IDENTITY, tensors, "arena")
    pinned = honest.manifest.content_fingerprint
    assert pinned is not None
    forger = load_weights(IDENTITY, tensors, "arena")
    forger.tensors["w"][5] = -1.0  # after its manifest (with the true digests) was made
    agent = network.agent("target")
    async with anyio.create_task_group() as tg:
        await tg.start(WeightSource(registry, forger, source_id="forger", agent=network.agent("f")).run)
        await tg.start(WeightSource(registry, honest, source_id="honest", agent=network.agent("h")).run)
        order = {"forger": 0.0, "honest": 1.0}
        target = Target("arena", verify=False)  # a pin is checked whatever verify says
        report = await Orchestrator(
            registry,
            [RdmaRegion(agent=agent)],
            expect=pinned,
            rank_window=0.05,
            selection=lambda _t: lambda c: (order[c.source_id],),
        ).load(IDENTITY, target)
        assert registry.state_of("forger") is SourceState.STALE
        tg.cancel_scope.cancel()
    first, second = report.attempts
    assert first.outcome.name == "Corrupt" and first.outcome.bad_tensors == ("w",) and first.marked_stale
    assert second.outcome.name == "Loaded" and second.outcome.verified
    assert torch.equal(target.tensors()["w"], tensors["w"])


async def test_relabelled_dtypes_over_honest_bytes_do_not_match_the_pin() -> None:
    network, registry = FakeRdmaNetwork(), FakeRegistry()
    served = load_weights(IDENTITY, {"w": torch.arange(64, dtype=torch.float32)}, "arena")
    pinned = served.manifest.content_fingerprint
    spec = served.manifest.tensors[0]
    relabelled = Manifest(
        IDENTITY,
        (TensorSpec(spec.name, "I32", spec.shape, spec.region, spec.offset, spec.checksum, spec.digest),),
        served.manifest.regions,
        served.manifest.checksum_algorithm,
    )
    served.manifest = relabelled
    async with anyio.create_task_group() as tg:
        await tg.start(WeightSource(registry, served, source_id="relabel", agent=network.agent("s")).run)
        report = await Orchestrator(registry, [RdmaRegion(agent=network.agent("t"))], expect=pinned).load(
            IDENTITY, Target("arena")
        )
        tg.cancel_scope.cancel()
    (attempt,) = report.attempts
    assert attempt.outcome.name == "ManifestMismatch" and "pinned" in attempt.outcome.detail
    assert not report.loaded and not attempt.marked_stale


@pytest.mark.hub
def test_a_hub_download_pins_the_same_content_as_the_checkpoint_on_disk(tmp_path: Path, pin: str) -> None:
    import os

    with HubServer({MODEL_ID: minilm_dir()}) as hub:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "mx_orchestrator",
                "fingerprint",
                "--repo",
                MODEL_ID,
                "--hub-endpoint",
                hub.endpoint,
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env=dict(os.environ, HF_HOME=str(tmp_path / "hf")),
        )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == pin


@pytest.mark.nixl
def test_pull_expect_from_the_cli_loads_the_pinned_content(peers: Peers, registry_url: str, pin: str) -> None:
    import json

    peers.start(("honest", "arena"))
    mxo = [
        sys.executable,
        "-m",
        "mx_orchestrator",
        "pull",
        "--model-id",
        MODEL_ID,
        "--registry",
        registry_url,
        "--json",
    ]
    good = subprocess.run([*mxo, "--expect", pin], capture_output=True, text=True, timeout=120)
    bad = subprocess.run([*mxo, "--expect", "mxc2-" + "0" * 64], capture_output=True, text=True, timeout=120)
    old = subprocess.run([*mxo, "--expect", "mxc1-" + "0" * 64], capture_output=True, text=True, timeout=120)
    assert good.returncode == 0 and json.loads(good.stdout)["verified"] is True
    assert bad.returncode == 1
    assert {a["outcome"] for a in json.loads(bad.stdout)["attempts"]} == {"ManifestMismatch"}
    # an old pin is a usage error before anything is read, saying how to get the new one
    assert old.returncode == 2 and "mxo fingerprint" in old.stderr and not old.stdout


@pytest.mark.hub
async def test_the_hub_loads_only_the_pinned_content(
    tmp_path: Path, altered_checkpoint: Path, pin: str
) -> None:
    with HubServer({MODEL_ID: minilm_dir(), "acme/altered": altered_checkpoint}) as hub:
        good = await Orchestrator(
            None, [HfDownload(MODEL_ID, endpoint=hub.endpoint, cache_dir=tmp_path / "c")], expect=pin
        ).load(IDENTITY, Target("arena"))
        other = await Orchestrator(
            None, [HfDownload("acme/altered", endpoint=hub.endpoint, cache_dir=tmp_path / "c")], expect=pin
        ).load(IDENTITY, Target("arena"))
    assert good.loaded and good.final is not None and good.final.verified
    (attempt,) = other.attempts
    assert attempt.outcome.name == "ManifestMismatch" and not other.loaded
