"""The `mxo` command line, run as users run it: real processes, real weights, stdout parsed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mx_orchestrator.testing.peers import MODEL_ID, Peers, minilm_dir
from tests.conftest import Mxo

pytestmark = pytest.mark.nixl


@pytest.fixture
def mxo() -> Mxo:
    return Mxo(quiet=True)


def test_demo_json_shows_mismatch_failure_and_verified_load(mxo: Mxo) -> None:
    result = mxo("demo", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(result.stdout)  # stdout holds the JSON document and nothing else
    states = {s["source_id"]: s["effective_state"] for s in data["sources"]}
    attempts = data["attempts"]
    mismatch = next(a for a in attempts if a["outcome"] == "LayoutMismatch")
    assert mismatch["bytes"] == 0 and states[mismatch["source"]] == "READY"
    failure = next(a for a in attempts if a["outcome"] == "SourceFailed")
    assert failure["source"] == "src-doomed" and failure["marked_stale"] and states["src-doomed"] == "STALE"
    assert attempts[-1]["outcome"] == "Loaded" and data["verified"] is True and data["outcome"] == "loaded"
    assert data["bytes"] == 90_856_960


def test_serve_then_pull_out_round_trips_the_file_byte_for_byte(mxo: Mxo, tmp_path: Path) -> None:
    registry = f"sqlite://{tmp_path}/registry.db"
    with Peers(registry) as peers:
        peers.start(("cli-src", "tensor"))
        result = mxo(
            "pull", "--model-id", MODEL_ID, "--registry", registry, "--out", str(tmp_path / "out"), "--json"
        )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["outcome"] == "loaded" and report["verified"]
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (
        minilm_dir() / "model.safetensors"
    ).read_bytes()


def test_sources_lists_published_records_as_json(mxo: Mxo, tmp_path: Path) -> None:
    registry = f"sqlite://{tmp_path}/registry.db"
    with Peers(registry) as peers:
        peers.start(("listed", "arena"))
        result = mxo("sources", "--registry", registry, "--json")
    rows = json.loads(result.stdout)
    assert [(r["source_id"], r["effective_state"]) for r in rows] == [("listed", "READY")]
    assert "transport" not in rows[0]


def test_pull_with_no_source_fails_with_a_report_and_nonzero_exit(mxo: Mxo, tmp_path: Path) -> None:
    result = mxo(
        "pull",
        "--model-id",
        "nobody/has-this",
        "--registry",
        f"sqlite://{tmp_path}/r.db",
        "--json",
        "--timeout",
        "10",
    )
    assert result.returncode == 1
    assert json.loads(result.stdout)["outcome"] == "failed"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["pull"], "--model-id"),
        (["pull", "--model-id", "x/y", "--bogus"], "unrecognized arguments"),
        (["pull", "--model-id", "not a valid id!"], "invalid model id"),
        (["pull", "--model-id", "x/y", "--layout", "ring"], "unknown layout"),
        (["pull", "--model-id", "x/y", "--registry", "ftp://x"], "unknown registry scheme"),
        (["pull", "--model-id", "x/y", "--registry", "sqlite:///proc/forbidden/r.db"], "error"),
        (["serve", "--model-id", "x/y", "--weights", "/nonexistent/dir"], "does not exist"),
        (["sources", "--registry", "nonsense"], "no scheme"),
    ],
)
def test_misuse_prints_one_error_line_and_no_traceback(mxo: Mxo, args: list[str], needle: str) -> None:
    result = mxo(*args, timeout=60)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("mxo: error:")]
    assert len(lines) == 1 and needle in lines[0], result.stderr


def test_demo_hub_fallback_ends_loaded_via_hf_download(mxo: Mxo) -> None:
    result = mxo("demo", "--scenario", "hub-fallback", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(result.stdout)
    assert data["outcome"] == "loaded" and data["strategy"] == "hf_download" and data["verified"] is True
    assert {a["outcome"] for a in data["attempts"][:-1]} <= {"LayoutMismatch", "SourceUnreachable"}


def test_serve_exposes_prometheus_metrics(tmp_path: Path) -> None:
    import signal
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, MXO_LOG_LEVEL="warning", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mx_orchestrator", "serve", "--model-id", MODEL_ID, "--weights", str(minilm_dir()),
         "--registry", f"sqlite://{tmp_path}/r.db", "--metrics-port", str(port), "--ttl", "3"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert json.loads(proc.stdout.readline())["event"] == "ready"
        import time

        time.sleep(1.5)  # at least one heartbeat
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert "mxo_source_published 1.0" in text
        assert "mxo_source_bytes 9.085696e+07" in text
        assert 'mxo_source_heartbeats_total{ok="true"}' in text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
    assert proc.returncode == 0


def test_sources_says_which_sources_are_partial_and_how_many_hops_away(mxo: Mxo, tmp_path: Path) -> None:
    """A target still loading (issue 24) is listed as a partial source, with its fan-out hops."""
    from dataclasses import replace

    import anyio

    from mx_orchestrator import ModelIdentity
    from mx_orchestrator.registry.sqlite import SqliteRegistry
    from mx_orchestrator.testing import make_manifest, make_record

    identity = ModelIdentity("acme/partial")

    async def publish() -> None:
        registry = SqliteRegistry(tmp_path / "registry.db")
        try:
            for sid, partial, hops in (("loading", True, 2), ("seed", False, 0)):
                record = replace(make_record(identity, sid), partial=partial, hops=hops)
                await registry.publish(record, make_manifest(identity))
        finally:
            await registry.aclose()

    anyio.run(publish)
    registry = f"sqlite://{tmp_path}/registry.db"
    rows = json.loads(mxo("sources", "--registry", registry, "--json").stdout)
    assert [(r["source_id"], r["partial"], r["hops"]) for r in rows] == [
        ("loading", True, 2),
        ("seed", False, 0),
    ]
    table = mxo("sources", "--registry", registry).stdout
    loading = next(line for line in table.splitlines() if "loading" in line)
    assert "partial" in loading and "whole" in next(line for line in table.splitlines() if "seed" in line)
