"""A source and a target in one script: serve all-MiniLM-L6-v2 from one process, pull it into this one.

    python examples/source_and_target.py

Prints the JSON load report. The source is a real ``mxo serve`` process; the
pull is a real NIXL READ over loopback; the registry is a temporary SQLite file.
"""

from __future__ import annotations

import json
import tempfile

import anyio

from mx_orchestrator import ModelIdentity, Orchestrator
from mx_orchestrator.logs import configure_logging
from mx_orchestrator.registry.sqlite import SqliteRegistry
from mx_orchestrator.target import Target
from mx_orchestrator.testing.peers import MODEL_ID, Peers
from strategies.rdma_region import RdmaRegion
from strategies.rdma_tensor import RdmaTensor


def main() -> None:
    configure_logging("warning")
    with tempfile.TemporaryDirectory() as tmp, Peers(f"sqlite://{tmp}/registry.db") as peers:
        peers.start(("example-source", "chunked:16MiB"))

        async def pull() -> dict[str, object]:
            registry = SqliteRegistry(f"{tmp}/registry.db")
            try:
                target = Target("chunked:16MiB")  # same layout as the source: one descriptor per region
                report = await Orchestrator(registry, [RdmaRegion(), RdmaTensor()]).load(
                    ModelIdentity(MODEL_ID), target
                )
                data = report.to_dict()
                data["tensors_loaded"] = len(target.tensors())
                return data
            finally:
                await registry.aclose()

        print(json.dumps(anyio.run(pull), indent=2))


if __name__ == "__main__":
    main()
