"""Embed mx_orchestrator in an ASGI app: the weights load in the lifespan, before the app serves.

    python examples/asgi_lifespan.py --model-id ORG/NAME [--registry URL] [--hub-endpoint URL]

The app refuses to start when no source can provide the weights (a serving
process without its weights should not pass its readiness check).
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from mx_orchestrator import ModelIdentity, Orchestrator, open_registry
from mx_orchestrator.target import Target
from strategies.hf_download import HfDownload
from strategies.rdma_region import RdmaRegion
from strategies.rdma_tensor import RdmaTensor


def create_app(model_id: str, registry_url: str, hub_endpoint: str | None = None) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        strategies: list[Any] = [RdmaRegion(), RdmaTensor()]
        if hub_endpoint:
            strategies.append(HfDownload(model_id, endpoint=hub_endpoint))
        target = Target("arena")
        registry = open_registry(registry_url)
        try:
            report = await Orchestrator(registry, strategies, load_timeout=300).load(
                ModelIdentity(model_id), target
            )
        finally:
            await registry.aclose()
        if not report.loaded:
            raise RuntimeError(f"no source could provide {model_id}: {report.reason}")
        app.state.weights = target.tensors()  # hand these to the model
        app.state.report = report.to_dict()
        yield

    async def health(request: Request) -> JSONResponse:
        report = request.app.state.report
        return JSONResponse(
            {
                "loaded": True,
                "tensors": len(request.app.state.weights),
                "strategy": report["strategy"],
                "verified": report["verified"],
                "load_seconds": report["seconds"],
            }
        )

    return Starlette(routes=[Route("/health", health)], lifespan=lifespan)


if __name__ == "__main__":
    import uvicorn

    parser = argparse.ArgumentParser()
    parser.add_argument("--model-id", required=True)
    parser.add_argument("--registry", default="sqlite://")
    parser.add_argument("--hub-endpoint", default=None)
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    uvicorn.run(create_app(args.model_id, args.registry, args.hub_endpoint), port=args.port)
