"""Benchmark: a registry flooded with junk records beside one honest source (real NIXL, SQLite).

Anyone who can write the registry can publish records; a load must still reach
the honest source within seconds. One real ``mxo serve`` of all-MiniLM-L6-v2,
then ``--junk`` records (default 10,000) that publish the honest manifest with
garbage connection metadata, written straight into the same SQLite registry.
A verified load into a fresh target, with the process's NIXL agent already made,
is timed: evaluation, attempts, the whole load, what the junk cost (refused
connects, registry reports written and skipped), and where the honest source
ranked. Prints one JSON object.

    python bench/junk.py [--junk 10000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))

import anyio  # noqa: E402

from mx_orchestrator import ModelIdentity, Orchestrator  # noqa: E402
from mx_orchestrator._backends.nixl import get_agent  # noqa: E402
from mx_orchestrator.logs import configure_logging  # noqa: E402
from mx_orchestrator.registry.sqlite import SqliteRegistry  # noqa: E402
from mx_orchestrator.target import Target  # noqa: E402
from mx_orchestrator.testing import publish_junk  # noqa: E402
from mx_orchestrator.testing.peers import MODEL_ID, Peers  # noqa: E402
from strategies.rdma_region import RdmaRegion  # noqa: E402
from strategies.rdma_tensor import RdmaTensor  # noqa: E402

IDENTITY = ModelIdentity(MODEL_ID)


async def flood(db: Path, junk: int) -> None:
    registry = SqliteRegistry(db)
    try:
        await publish_junk(registry, "honest", junk, metadata="Z2FyYmFnZSBtZXRhZGF0YQ==")
    finally:
        await registry.aclose()


async def load(db: Path) -> dict[str, Any]:
    registry = SqliteRegistry(db)
    try:
        target = Target("arena")
        began = time.perf_counter()
        report = await Orchestrator(
            registry, [RdmaRegion(), RdmaTensor()], probe_concurrency=256, load_timeout=120
        ).load(IDENTITY, target)
        seconds = time.perf_counter() - began
        data = report.to_dict()
        assert report.loaded and data["sources"] == ["honest"], report.reason
        return {
            "seconds": round(seconds, 3),
            "evaluation_seconds": data["evaluation_seconds"],
            "candidates": data["candidates_evaluated"],
            "attempt_records": len(data["attempts"]),
            "junk": data["junk"],
            "verified": data["verified"],
        }
    finally:
        await registry.aclose()


def pull_cli(db: Path) -> dict[str, Any]:
    """The same load as a user runs it: ``mxo pull --json``; the report's own evaluation and load
    seconds (the process's start-up, torch and the NIXL agent, come on top)."""
    began = time.perf_counter()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mx_orchestrator",
            "pull",
            "--model-id",
            MODEL_ID,
            "--registry",
            f"sqlite://{db}",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    data = json.loads(out.stdout)
    assert out.returncode == 0 and data["sources"] == ["honest"], out.stderr[-2000:]
    return {
        "load_seconds": data["seconds"],
        "evaluation_seconds": data["evaluation_seconds"],
        "process_seconds": round(time.perf_counter() - began, 3),
        "refused_connects": data["junk"]["refused_connects"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--junk", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    configure_logging("error")
    get_agent()  # made before timing, as a serving process's would be
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "registry.db"
        with Peers(f"sqlite://{db}") as peers:
            peers.start(("honest", "arena"), ttl=600.0)
            anyio.run(flood, db, args.junk)
            runs = [anyio.run(load, db) for _ in range(args.repeat)]
            cli = pull_cli(db)
    print(
        json.dumps(
            {
                "benchmark": "junk",
                "date": time.strftime("%Y-%m-%d"),
                "junk_records": args.junk,
                "median_seconds": statistics.median(r["seconds"] for r in runs),
                "mxo_pull": cli,
                "target_seconds": 5.0,
                "runs": runs,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
