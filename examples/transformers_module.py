"""Fill a transformers model in place from a peer: all-MiniLM-L6-v2 as a ``BertModel``.

    python examples/transformers_module.py [--device cpu|cuda:N]

What a serving framework does at start-up, with mx_orchestrator as the loader:
build the model from its config on the meta device (no memory, no init),
``to_empty`` on the device it will run on, then ``load_module`` fills every
parameter and buffer in its own storage from the best source (here a real
``mxo serve`` process in another process, read over NIXL; the registry is a
temporary SQLite file). Then it embeds two sentences (mean pooling, as
sentence-transformers does for this model) and prints their cosine similarity
with the load report as JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile

import torch
import transformers

from mx_orchestrator import load_module_sync
from mx_orchestrator.logs import configure_logging
from mx_orchestrator.testing.peers import MODEL_ID, Peers, minilm_dir

SENTENCES = ["The weights arrived from a peer.", "A neighbour sent the model's weights."]


def empty_model(device: str) -> transformers.BertModel:
    """The model as the framework builds it: from its config, on the meta device, then made real."""
    config = transformers.BertConfig.from_pretrained(str(minilm_dir()))
    with torch.device("meta"):
        model = transformers.BertModel(config, add_pooling_layer=False)
    return model.to_empty(device=device).eval()


def embed(model: transformers.BertModel, device: str) -> torch.Tensor:
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm_dir()))
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt").to(device)
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1)  # mean over the real tokens
    return torch.nn.functional.normalize(pooled, dim=-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    configure_logging("warning")
    with tempfile.TemporaryDirectory() as tmp, Peers(f"sqlite://{tmp}/registry.db") as peers:
        peers.start(("minilm-peer", "arena"))  # another process that holds the weights
        model = empty_model(args.device)
        report = load_module_sync(model, MODEL_ID, registry=f"sqlite://{tmp}/registry.db", rank_window=2.0)
        if not report.loaded:
            raise SystemExit(f"no source could fill the model: {report.reason}")
        vectors = embed(model, args.device)
        data = report.to_dict()
        print(
            json.dumps(
                {
                    "outcome": data["outcome"],
                    "strategy": data["strategy"],
                    "source": data["source"],
                    "verified": data["verified"],
                    "bytes": data["bytes"],
                    "seconds": data["seconds"],
                    "tensors_filled": data["module"]["filled"],
                    "checkpoint_only": data["module"]["checkpoint_only"],
                    "sentences": SENTENCES,
                    "embedding_dim": vectors.shape[-1],
                    "cosine_similarity": round(float(vectors[0] @ vectors[1]), 4),
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
