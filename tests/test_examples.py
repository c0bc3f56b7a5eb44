"""Every example under examples/ runs here, as a user would run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mx_orchestrator import ModelIdentity, Orchestrator
from mx_orchestrator.target import Target
from mx_orchestrator.testing.hub import HubServer
from mx_orchestrator.testing.peers import MODEL_ID, minilm_dir

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, MXO_LOG_LEVEL="warning", PYTHONPATH=str(EXAMPLES.parent))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.nixl
def test_source_and_target_in_one_script() -> None:
    result = run(str(EXAMPLES / "source_and_target.py"))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["outcome"] == "loaded" and report["strategy"] == "rdma_region" and report["verified"]
    assert report["tensors_loaded"] == 104


def test_unit_testing_an_integration_with_the_fakes() -> None:
    result = run("-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLES / "test_with_fakes.py"))
    assert result.returncode == 0, result.stdout[-3000:]
    assert "2 passed" in result.stdout


@pytest.mark.hub
def test_asgi_app_loads_weights_in_its_lifespan_before_serving(tmp_path: Path) -> None:
    sys.path.insert(0, str(EXAMPLES))
    try:
        from asgi_lifespan import create_app  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(EXAMPLES))
    from starlette.testclient import TestClient

    with HubServer({MODEL_ID: minilm_dir()}) as hub:
        app = create_app(MODEL_ID, f"sqlite://{tmp_path}/registry.db", minilm_dir(), hub.endpoint)
        with TestClient(app) as client:  # runs the lifespan: the model is filled first
            body = client.get("/health").json()
            embedding = client.get("/embed", params={"text": "weights from the Hub"}).json()
    # the module has no pooler: 102 of the checkpoint's 104 tensors fill it
    assert (
        body["loaded"] and body["tensors"] == 102 and body["strategy"] == "hf_download" and body["verified"]
    )
    assert embedding["dim"] == 384 and abs(sum(x * x for x in embedding["embedding"]) - 1.0) < 1e-4


@pytest.mark.nixl
def test_a_transformers_model_built_empty_is_filled_from_a_peer_and_embeds() -> None:
    result = run(str(EXAMPLES / "transformers_module.py"))
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout)
    assert out["outcome"] == "loaded" and out["verified"] and out["source"] == "minilm-peer"
    assert out["tensors_filled"] == 102 and out["checkpoint_only"] == [
        "pooler.dense.bias",
        "pooler.dense.weight",
    ]
    # the same similarity as the model transformers loads from the checkpoint file itself
    import transformers

    sys.path.insert(0, str(EXAMPLES))
    try:
        from transformers_module import embed  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(EXAMPLES))
    reference = transformers.BertModel.from_pretrained(str(minilm_dir()), add_pooling_layer=False).eval()
    vectors = embed(reference, "cpu")
    assert out["embedding_dim"] == 384
    assert out["cosine_similarity"] == round(float(vectors[0] @ vectors[1]), 4)


async def test_custom_strategy_registered_through_an_entry_point(tmp_path: Path) -> None:
    """A distribution on sys.path declares the entry point; load_strategy finds and runs it."""
    dist = tmp_path / "my_package-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-package\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[mx_orchestrator.strategies]\nlocal_dir = custom_strategy:LocalDirectory\n"
    )
    sys.path[:0] = [str(tmp_path), str(EXAMPLES)]
    try:
        from strategies import available_strategies, load_strategy

        assert available_strategies()["local_dir"] == "custom_strategy:LocalDirectory"
        strategy = load_strategy("local_dir", directory=minilm_dir())
        target = Target("arena")
        report = await Orchestrator(None, [strategy]).load(ModelIdentity(MODEL_ID), target)
    finally:
        sys.path.remove(str(tmp_path))
        sys.path.remove(str(EXAMPLES))
    assert report.loaded and report.final is not None and report.final.strategy == "local_dir"
    assert len(target.tensors()) == 104


@pytest.mark.nixl
def test_an_engine_serves_the_weights_it_loaded_to_a_peer_process() -> None:
    result = run(str(EXAMPLES / "engine_republishes.py"))
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout)
    assert out["engine"] == {"outcome": "loaded", "sources": ["seed"]}
    assert out["served_as"] == {"source_id": "engine-0", "hops": 1}
    assert out["peer"]["outcome"] == "loaded" and out["peer"]["sources"] == ["engine-0"]
    assert out["after_close"] is None
