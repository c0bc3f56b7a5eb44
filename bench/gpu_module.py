"""Benchmark (GPU machines; ``--device cpu --tiny`` runs it anywhere): ``load_module`` on real models.

Two checks, side by side in one run, one JSON object (also ``$OUT/gpu_module.json`` when ``$OUT``
is set):

* ``bert``: a ``BertModel`` of all-MiniLM-L6-v2's shape (its config; weights made here and saved as
  safetensors) served by an ``mxo serve`` process on the source device, built empty (meta device,
  ``to_empty``) on the target device and filled by ``load_module``: its hidden states must equal,
  bitwise, those of the same checkpoint loaded by transformers' ``from_pretrained``.
* ``llama``: a Llama-3-8B-shaped ``LlamaForCausalLM`` (16 GB of bf16; ``--tiny`` shrinks it),
  saved as safetensors on local disk and served the same way; the time from an empty process state
  to the first forward pass, ``load_module`` (verified) against transformers' ``from_pretrained``
  of the same files from local disk (page cache warm: its best case), logits compared bitwise.
  The process's one-time GPU costs (context, cuBLAS) are paid by a small model's forward pass
  before either is timed; transformers goes first. ``load_module`` runs twice: the first pays its
  own one-time costs (the checksum kernel's compile), the second is what every later load costs.

The target device is ``cuda:1`` when there are two GPUs (the source on ``cuda:0``), else the
source's own GPU (``cuda_ipc`` between two processes of one GPU).

    python bench/gpu_module.py [--device cuda] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import os
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
import torch  # noqa: E402
import transformers  # noqa: E402

from mx_orchestrator import load_module  # noqa: E402
from mx_orchestrator.logs import configure_logging  # noqa: E402

# all-MiniLM-L6-v2's config.json, as the checkpoint ships it (the weights are made here)
MINILM = dict(
    hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
    vocab_size=30522, max_position_embeddings=512, type_vocab_size=2, hidden_act="gelu",
    layer_norm_eps=1e-12, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
)  # fmt: skip
LLAMA_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
    rms_norm_eps=1e-5, tie_word_embeddings=False,
)  # fmt: skip
LLAMA_TINY = dict(LLAMA_8B, vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)  # fmt: skip


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def serve(
    weights: Path, model_id: str, device: str, registry: str, source_id: str
) -> subprocess.Popen[bytes]:
    """An ``mxo serve`` process holding ``weights`` on ``device``; returns once it is published."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "mx_orchestrator", "serve", "--model-id", model_id, "--weights", str(weights),
         "--layout", "tensor", "--device", device, "--registry", registry, "--source-id", source_id],
        stdout=subprocess.PIPE,
        env=dict(os.environ, PYTHONUNBUFFERED="1", MXO_LOG_LEVEL="warning"),
    )  # fmt: skip
    assert proc.stdout is not None
    began = time.perf_counter()
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"mxo serve {source_id} exited with {proc.wait()}")
    ready = json.loads(line)
    ready["serve_seconds"] = round(time.perf_counter() - began, 2)
    return proc


def computed_buffers(model: Any, config: Any, device: str) -> None:
    """Buffers no checkpoint holds (non-persistent: position ids, rotary frequencies) are computed,
    as a serving framework computes them after ``to_empty``; ``load_module`` fills the rest."""
    for module in model.modules():
        if "RotaryEmbedding" in type(module).__name__:
            with torch.device(device):
                fresh = type(module)(config)
            for name, buffer in fresh.named_buffers():
                module.get_buffer(name).copy_(buffer)
        elif type(module).__name__ == "BertEmbeddings":
            module.position_ids.copy_(
                torch.arange(module.position_ids.shape[-1], device=device).expand(1, -1)
            )
            module.token_type_ids.zero_()


def empty(cls: Any, config: Any, device: str, dtype: torch.dtype, **kwargs: Any) -> Any:
    """The model as a framework builds it: on the meta device, then made real on ``device``."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = cls(config, **kwargs)
    finally:
        torch.set_default_dtype(previous)
    model = model.to_empty(device=device).eval()
    model.tie_weights()
    computed_buffers(model, config, device)
    return model


async def fill(model: Any, model_id: str, registry: str) -> dict[str, Any]:
    report = await load_module(model, model_id, registry=registry, rank_window=0.5, load_timeout=600)
    data = report.to_dict()
    assert report.loaded, (
        data["reason"],
        [(a["strategy"], a["outcome"], a["detail"]) for a in data["attempts"]],
    )
    final = data["attempts"][-1]
    return {
        "strategy": data["strategy"],
        "verified": data["verified"],
        "bytes": data["bytes"],
        "load_seconds": data["seconds"],
        "phases": final.get("phases"),
        "tensors_filled": data["module"]["filled"],
        "tied": data["module"]["tied"],
    }


def bert_check(work: Path, source_device: str, device: str, registry: str) -> dict[str, Any]:
    config = transformers.BertConfig(**MINILM)
    torch.manual_seed(0)
    reference = transformers.BertModel(config, add_pooling_layer=False).eval()
    reference.save_pretrained(work / "bert")
    proc = serve(work / "bert", "bench/minilm-shape", source_device, registry, "bert-src")
    try:
        model = empty(transformers.BertModel, config, device, torch.float32, add_pooling_layer=False)
        before = {n: p.data_ptr() for n, p in model.named_parameters()}
        result = anyio.run(fill, model, "bench/minilm-shape", registry)
        loaded = (
            transformers.BertModel.from_pretrained(str(work / "bert"), add_pooling_layer=False)
            .to(device)
            .eval()
        )
        ids = torch.randint(0, config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(1)).to(
            device
        )
        with torch.no_grad():
            ours, theirs = model(input_ids=ids).last_hidden_state, loaded(input_ids=ids).last_hidden_state
        result["hidden_states_equal"] = bool(torch.equal(ours, theirs))
        result["storage_kept"] = before == {n: p.data_ptr() for n, p in model.named_parameters()}
        return result
    finally:
        proc.terminate()
        proc.wait(60)


def llama_check(work: Path, source_device: str, device: str, registry: str, tiny: bool) -> dict[str, Any]:
    config = transformers.LlamaConfig(**(LLAMA_TINY if tiny else LLAMA_8B))
    began = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(source_device):
        reference = empty(transformers.LlamaForCausalLM, config, source_device, torch.bfloat16)
        for p in reference.parameters():  # random weights, made on the device (fast at 8B)
            p.data.normal_(0.0, 0.02)
    reference.save_pretrained(work / "llama")
    nbytes = sum(p.numel() * p.element_size() for p in reference.parameters())
    del reference
    torch.cuda.empty_cache() if source_device.startswith("cuda") else None
    made = time.perf_counter() - began
    proc = serve(work / "llama", "bench/llama-8b-shape", source_device, registry, "llama-src")
    ids = torch.randint(0, config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(2))
    try:
        # the process's one-time GPU costs (context, cuBLAS, kernels) are paid before either is timed,
        # by a forward pass of a small model of the same kind
        tiny = transformers.LlamaConfig(**LLAMA_TINY)
        with torch.no_grad():
            empty(transformers.LlamaForCausalLM, tiny, device, torch.bfloat16)(
                input_ids=ids.to(device) % 1024
            )
        sync(device)
        began = time.perf_counter()  # transformers first: the page cache holds the files (its best case)
        placement = {"device_map": device} if device != "cpu" else {}  # (a device map needs accelerate)
        loaded = transformers.LlamaForCausalLM.from_pretrained(
            str(work / "llama"), dtype=torch.bfloat16, **placement
        ).eval()
        with torch.no_grad():
            theirs = loaded(input_ids=ids.to(device)).logits.float().cpu()
        sync(device)
        hf_seconds = time.perf_counter() - began
        del loaded
        runs = []
        for _ in range(2):
            began = time.perf_counter()
            model = empty(transformers.LlamaForCausalLM, config, device, torch.bfloat16)
            built = time.perf_counter() - began
            run = anyio.run(fill, model, "bench/llama-8b-shape", registry)
            with torch.no_grad():
                logits = model(input_ids=ids.to(device)).logits
            sync(device)
            run["build_empty_seconds"] = round(built, 4)
            run["seconds_to_first_forward"] = round(time.perf_counter() - began, 4)
            runs.append(run)
            ours = logits.float().cpu()
            del model, logits
        return {
            "bytes": nbytes,
            "make_and_save_seconds": round(made, 1),
            "load_module_first": runs[0],
            "load_module_warm": runs[1],
            "from_pretrained_seconds_to_first_forward": round(hf_seconds, 3),
            "speedup_warm": round(hf_seconds / runs[1]["seconds_to_first_forward"], 1),
            "speedup_first": round(hf_seconds / runs[0]["seconds_to_first_forward"], 1),
            "logits_equal": bool(torch.equal(ours, theirs)),
        }
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (GPUs) or cpu")
    parser.add_argument("--tiny", action="store_true", help="a small Llama instead of the 16 GB one")
    args = parser.parse_args()
    configure_logging("warning")
    if args.device == "cuda":
        count = torch.cuda.device_count()
        source_device, device = "cuda:0", ("cuda:1" if count > 1 else "cuda:0")
        gpu = torch.cuda.get_device_name(0)
    else:
        source_device = device = "cpu"
        count, gpu = 0, None
    out: dict[str, Any] = {"benchmark": "gpu_module", "gpus": count, "gpu": gpu,
                           "source_device": source_device, "target_device": device,
                           "torch": torch.__version__, "transformers": transformers.__version__}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        registry = f"sqlite://{work}/registry.db"
        out["bert"] = bert_check(work, source_device, device, registry)
        print(json.dumps(out["bert"]), file=sys.stderr, flush=True)
        out["llama"] = llama_check(work, source_device, device, registry, args.tiny)
    text = json.dumps(out, indent=2)
    print(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_module.json").write_text(text)


if __name__ == "__main__":
    main()
