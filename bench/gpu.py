"""Benchmark (GPU machines only, not CI): VRAM pulls between processes against the NVLink limit.

A source process holds the 16 GB Llama-8B-like set (291 bf16 tensors) on GPU 0;
this process is the target on GPU 1 (GPU 0 too when only one GPU exists, where
UCX stages through the host). It measures, side by side: torch peer copy
(the NVLink limit), raw NIXL with the orchestrator's descriptors, orchestrated
``rdma_region`` (arena source) and ``rdma_tensor`` (separately allocated source
tensors), one verified pull, and reading safetensors from local disk onto the
GPU (what a non-peer load costs). Prints one JSON object.

    python bench/gpu.py [--repeat N] [--set llama16g]
"""

from __future__ import annotations

import argparse
import json
import os
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
import torch  # noqa: E402

from mx_orchestrator import ModelIdentity, Orchestrator  # noqa: E402
from mx_orchestrator.layout import plan_region_reads, plan_tensor_reads  # noqa: E402
from mx_orchestrator.logs import configure_logging  # noqa: E402
from mx_orchestrator.registry.sqlite import SqliteRegistry  # noqa: E402
from mx_orchestrator.target import Target  # noqa: E402

sys.path.append(str(HERE))  # bench helpers; last, so bench/nixl.py never shadows the nixl package
from _timing import orchestrated, ratios, raw_nixl  # noqa: E402


def source(set_name: str, layout: str, registry_url: str, sid: str, device: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "_synthetic.py"), set_name, layout, registry_url, sid, device],
        stdout=subprocess.PIPE,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    assert proc.stdout is not None
    if not proc.stdout.readline():
        raise RuntimeError(f"source {sid} failed")
    return proc


def peer_copy_gbps(nbytes: int, src_dev: int, dst_dev: int, repeat: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{src_dev}").fill_(1)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{dst_dev}").fill_(0)
    times = []
    for _ in range(repeat + 1):
        torch.cuda.synchronize(src_dev)
        torch.cuda.synchronize(dst_dev)
        began = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize(dst_dev)
        times.append(time.perf_counter() - began)
    del src, dst
    torch.cuda.empty_cache()
    return nbytes / statistics.median(times[1:]) / 1e9


def disk_gbps(device: str, nbytes: int = 2 << 30) -> float:
    from safetensors.torch import load_file, save_file

    with tempfile.TemporaryDirectory(dir=os.environ.get("MXO_BENCH_DISK", "/tmp")) as tmp:
        path = Path(tmp) / "model.safetensors"
        save_file({"w": torch.ones(nbytes // 2, dtype=torch.bfloat16)}, str(path))
        load_file(str(path), device=device)  # page cache warm, as in a best case
        torch.cuda.synchronize()
        began = time.perf_counter()
        loaded = load_file(str(path), device=device)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - began
        del loaded
    return nbytes / seconds / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--set", default="llama16g")
    args = parser.parse_args()
    configure_logging("warning")
    gpus = torch.cuda.device_count()
    if gpus == 0:
        raise SystemExit("no CUDA device: bench/gpu.py runs on GPU machines only")
    src_dev, dst_dev = 0, (1 if gpus > 1 else 0)
    torch.cuda.set_device(dst_dev)
    from mx_orchestrator._backends.nixl import get_agent
    from strategies.rdma_region import RdmaRegion
    from strategies.rdma_tensor import RdmaTensor

    get_agent()
    identity = ModelIdentity(f"bench/{args.set}")
    out: dict[str, Any] = {
        "benchmark": "gpu",
        "date": time.strftime("%Y-%m-%d"),
        "gpus": gpus,
        "gpu": torch.cuda.get_device_name(0),
        "source_gpu": src_dev,
        "target_gpu": dst_dev,
    }
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite://{tmp}/registry.db"
        path = url.removeprefix("sqlite://")

        async def phase(layout_strategy: str) -> dict[str, Any]:
            registry = SqliteRegistry(path)
            target = Target("arena", f"cuda:{dst_dev}", verify=False)
            plan = plan_region_reads if layout_strategy == "rdma_region" else plan_tensor_reads
            raw, setup, ndesc = await raw_nixl(registry, identity, target, plan, args.repeat, warmup=1)
            strategy = RdmaRegion() if layout_strategy == "rdma_region" else RdmaTensor()
            orch, load = await orchestrated(
                registry, identity, target, strategy, args.repeat, warmup=1, attempt_timeout=120
            )
            nbytes = target.nbytes
            verified_target = Target("arena", f"cuda:{dst_dev}", verify=True)
            verified = await Orchestrator(
                registry, [type(strategy)()], rank_window=0.0, attempt_timeout=300
            ).load(identity, verified_target)
            await registry.aclose()
            return {
                "bytes": nbytes,
                **ratios(nbytes, raw, setup, orch, load, ndesc),
                "verified_pull": {
                    "loaded": verified.loaded,
                    "verified": verified.to_dict()["verified"],
                    "detail": verified.to_dict()["attempts"][-1]["detail"],
                },
            }

        for key, layout in (("rdma_region", "arena"), ("rdma_tensor", "tensor")):
            proc = source(args.set, layout, url, f"gpu-{layout}", f"cuda:{src_dev}")
            try:
                out[key] = anyio.run(phase, key)
            except Exception as exc:  # keep the other phase's numbers
                out[key] = {"error": f"{type(exc).__name__}: {exc}"}
            finally:
                proc.terminate()
                proc.wait(60)
            print(json.dumps({key: out[key]}), file=sys.stderr, flush=True)
    nbytes = next((out[k]["bytes"] for k in ("rdma_region", "rdma_tensor") if "bytes" in out[k]), 1 << 30)
    out["torch_peer_copy_gbps"] = round(peer_copy_gbps(nbytes, src_dev, dst_dev, args.repeat), 1)
    out["safetensors_disk_to_gpu_gbps"] = round(disk_gbps(f"cuda:{dst_dev}"), 2)
    for key in ("rdma_region", "rdma_tensor"):
        if "orchestrated_gbps" in out[key]:
            out[key]["vs_torch_peer_copy"] = round(
                out[key]["orchestrated_gbps"] / out["torch_peer_copy_gbps"], 3
            )
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
