"""Synthetic weight sets for the benchmarks, and a source process serving one (run as a script).

    python bench/_synthetic.py SET LAYOUT REGISTRY_URL SOURCE_ID [DEVICE]

SET is ``one`` (one 1 GiB tensor), ``llama`` (a Llama-8B-like set of 291
tensors scaled to 1 GiB), ``scattered`` (5,000 tensors of 200 KiB) or
``llama16g`` (the real 16 GB Llama-8B-like shapes, for GPUs).
"""

from __future__ import annotations

import json
import sys

GIB = 1 << 30


def llama_shapes(scale: float = 1.0) -> list[tuple[str, tuple[int, ...]]]:
    """Llama-3-8B's 291 tensors (bf16 there); ``scale`` shrinks the hidden sizes proportionally."""
    h, inter, kv, vocab = 4096, 14336, 1024, 128256
    if scale != 1.0:
        h, inter, kv, vocab = (max(64, int(x * scale) // 64 * 64) for x in (h, inter, kv, vocab))
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, h))]
    for i in range(32):
        p = f"model.layers.{i}"
        shapes += [
            (f"{p}.self_attn.q_proj.weight", (h, h)),
            (f"{p}.self_attn.k_proj.weight", (kv, h)),
            (f"{p}.self_attn.v_proj.weight", (kv, h)),
            (f"{p}.self_attn.o_proj.weight", (h, h)),
            (f"{p}.mlp.gate_proj.weight", (inter, h)),
            (f"{p}.mlp.up_proj.weight", (inter, h)),
            (f"{p}.mlp.down_proj.weight", (h, inter)),
            (f"{p}.input_layernorm.weight", (h,)),
            (f"{p}.post_attention_layernorm.weight", (h,)),
        ]
    shapes += [("model.norm.weight", (h,)), ("lm_head.weight", (vocab, h))]
    return shapes


def weight_set(name: str, device: str = "cpu"):  # type: ignore[no-untyped-def]
    import torch

    gen = torch.Generator(device=device).manual_seed(0)
    if name == "one":
        return {"blob": torch.randint(0, 255, (GIB,), dtype=torch.uint8, generator=gen)}
    if name == "scattered":
        return {
            f"piece.{i}": torch.randint(0, 255, (200 << 10,), dtype=torch.uint8, generator=gen)
            for i in range(5000)
        }
    if name in ("llama", "llama16g"):
        # bf16 bytes: 16.06 GB at full scale; ~0.5 scale lands near 1 GiB... computed below
        scale = 1.0 if name == "llama16g" else 0.255
        out = {}
        for tensor_name, shape in llama_shapes(scale):
            numel = 1
            for d in shape:
                numel *= d
            out[tensor_name] = (
                torch.empty(numel, dtype=torch.int16, device=device)
                .random_(generator=gen)
                .view(torch.bfloat16)
                .view(shape)
            )
        return out
    raise SystemExit(f"unknown set {name!r}")


class SyntheticSource:
    """This script as a child process serving ``set_name``; ready once constructed, :meth:`stop` ends it."""

    def __init__(self, set_name: str, layout: str, registry_url: str, source_id: str) -> None:
        import os
        import subprocess
        from pathlib import Path

        self.source_id = source_id
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), set_name, layout, registry_url, source_id],
            stdout=subprocess.PIPE,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"source for {set_name}/{layout} failed to start")
        self.info = json.loads(line)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def main() -> None:
    from pathlib import Path

    here = Path(__file__).resolve().parent
    # bench/nixl.py would shadow the nixl package
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    import anyio

    from mx_orchestrator import ModelIdentity
    from mx_orchestrator.logs import configure_logging
    from mx_orchestrator.registry import open_registry
    from mx_orchestrator.source import WeightSource, load_weights, serve_until_signal

    set_name, layout, registry_url, source_id = sys.argv[1:5]
    device = sys.argv[5] if len(sys.argv) > 5 else "cpu"
    configure_logging("warning")
    if device != "cpu":
        import torch

        torch.cuda.set_device(torch.device(device))
    tensors = weight_set(set_name, device)
    weights = load_weights(ModelIdentity(f"bench/{set_name}"), tensors, layout, device)
    del tensors

    async def run() -> None:
        registry = open_registry(registry_url)
        source = WeightSource(registry, weights, source_id=source_id, ttl=600)

        def ready(record: object) -> None:
            print(
                json.dumps(
                    {"event": "ready", "bytes": weights.manifest.total_bytes, "regions": len(weights.spans)}
                ),
                flush=True,
            )

        await serve_until_signal(source, ready)
        await registry.aclose()

    anyio.run(run)


if __name__ == "__main__":
    main()
