"""An engine that serves its weights to peers while it loads them, and after.

    python examples/engine_republishes.py

A seed (a real ``mxo serve`` process) holds all-MiniLM-L6-v2. This process loads
it with ``Orchestrator(..., republish=True)``: from its first landed part its own
memory is a partial source (``mxo sources`` would show it), whole once loaded.
Then the seed stops, and a real ``mxo pull`` process loads the model from this
engine over NIXL. Closing the orchestrator unpublishes the engine. Prints the
essentials of both loads as JSON.
"""

from __future__ import annotations

import json
import sys
import tempfile

import anyio

from mx_orchestrator import ModelIdentity, Orchestrator
from mx_orchestrator.logs import configure_logging
from mx_orchestrator.registry.sqlite import SqliteRegistry
from mx_orchestrator.target import Target
from mx_orchestrator.testing import published_whole
from mx_orchestrator.testing.peers import MODEL_ID, Peers
from strategies.rdma_region import RdmaRegion
from strategies.rdma_tensor import RdmaTensor


def main() -> None:
    configure_logging("warning")
    with tempfile.TemporaryDirectory() as tmp, Peers(f"sqlite://{tmp}/registry.db") as peers:
        (seed,) = peers.start(("seed", "arena"))

        async def engine() -> dict[str, object]:
            registry = SqliteRegistry(f"{tmp}/registry.db")
            try:
                async with Orchestrator(
                    registry,
                    [RdmaRegion(), RdmaTensor()],
                    republish=True,
                    serve_options={"source_id": "engine-0", "max_readers": 4},
                ) as orchestrator:
                    report = await orchestrator.load(ModelIdentity(MODEL_ID), Target("arena"))
                    # it publishes itself whole once every tensor landed verified
                    record = await published_whole(registry, "engine-0")
                    await anyio.to_thread.run_sync(seed.terminate)  # from now on only the engine has it
                    pull = [sys.executable, "-m", "mx_orchestrator", "pull", "--model-id", MODEL_ID,
                            "--registry", f"sqlite://{tmp}/registry.db", "--json"]  # fmt: skip
                    peer = json.loads((await anyio.run_process(pull)).stdout)
                return {
                    "engine": {"outcome": report.outcome, "sources": sorted(report.bytes_by_source())},
                    "served_as": {"source_id": record.source_id, "hops": record.hops},
                    "peer": {"outcome": peer["outcome"], "sources": peer["sources"], "bytes": peer["bytes"]},
                    "after_close": await registry.get("engine-0"),
                }
            finally:
                await registry.aclose()

        print(json.dumps(anyio.run(engine), indent=2))


if __name__ == "__main__":
    main()
