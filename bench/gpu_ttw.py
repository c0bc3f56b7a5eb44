"""Benchmark (GPU machines only, not CI): time to *verified* weights on one or two H200s.

A source process holds the 16 GB Llama-8B-like set (291 bf16 tensors) on GPU 0
and exports it both to NIXL and as CUDA IPC handles. This process is the
target, on GPU 1 when there are two GPUs, else on GPU 0. Side by side in one
run it measures:

* ``mxsum1`` on the GPU over the 16 GB (GB/s) and its agreement with the CPU value;
* ``cuda_ipc`` whole loads, verified and not, into a fresh target and into a
  reused one (same GPU; and across GPUs when there are two);
* with two GPUs, ``rdma_region`` over NIXL with a prewarmed agent, verified and not;
* a first load in a fresh process (``cuda_ipc`` then ``rdma_region``, as
  ``mxo pull --device cuda:N`` orders them) against the NIXL agent's creation time;
* on one GPU, the same-GPU NIXL READ of a 1 GiB set, which UCX stages through the host.

Prints one JSON object (and writes it to ``$OUT/gpu_ttw.json`` when ``$OUT`` is set).

    python bench/gpu_ttw.py [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))

import anyio  # noqa: E402
import torch  # noqa: E402

from mx_orchestrator import ModelIdentity, Orchestrator  # noqa: E402
from mx_orchestrator.integrity import mxsum, mxsum_many  # noqa: E402
from mx_orchestrator.logs import configure_logging  # noqa: E402
from mx_orchestrator.registry.sqlite import SqliteRegistry  # noqa: E402
from mx_orchestrator.target import Target  # noqa: E402


def start_source(set_name: str, layout: str, url: str, sid: str, device: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "_synthetic.py"), set_name, layout, url, sid, device],
        stdout=subprocess.PIPE,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    assert proc.stdout is not None
    if not proc.stdout.readline():
        raise RuntimeError(f"source {sid} failed to start")
    return proc


def summary(report: Any) -> dict[str, Any]:
    data = report.to_dict()
    last = data["attempts"][-1] if data["attempts"] else {}
    return {
        "outcome": data["outcome"],
        "strategy": data["strategy"],
        "verified": data["verified"],
        "load_ms": round(data["seconds"] * 1e3, 2),
        "transfer_gbps": data["transfer_gbps"],
        "phases_ms": {k: round(v * 1e3, 2) for k, v in last.get("phases", {}).items()},
        "attempts": [(a["strategy"], a["outcome"]) for a in data["attempts"]],
        "detail": last.get("detail", ""),
    }


async def loads(
    url: str,
    identity: ModelIdentity,
    strategies: list[Any],
    device: str,
    repeat: int,
    verify: bool,
    reuse: bool,
    pinned: bool = False,
) -> dict[str, Any]:
    registry = SqliteRegistry(url.removeprefix("sqlite://"))
    expect = None
    if pinned:  # the pin of what the source serves: its manifest's content fingerprint
        (record,) = await registry.list(identity.key)
        manifest = await registry.get_manifest(record.source_id, record.generation)
        expect = manifest.content_fingerprint if manifest is not None else None
    runs = []
    target = Target("arena", device, verify=verify)
    try:
        for _ in range(repeat + 1):  # the first is a warm-up (CUDA context, IPC mapping)
            if not reuse:
                target = Target("arena", device, verify=verify)
            report = await Orchestrator(
                registry, strategies, rank_window=0.0, attempt_timeout=300, expect=expect
            ).load(identity, target)
            runs.append(summary(report))
            if not reuse:
                del target
                torch.cuda.empty_cache()
    finally:
        await registry.aclose()
    timed = runs[1:]
    return {
        "median_load_ms": statistics.median(r["load_ms"] for r in timed),
        "median_transfer_gbps": statistics.median(r["transfer_gbps"] for r in timed),
        "runs": timed,
        "warmup": runs[0],
    }


def mxsum_gbps(tensors: list[torch.Tensor], repeat: int) -> tuple[float, float]:
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    times = []
    for _ in range(repeat + 1):
        torch.cuda.synchronize()
        began = time.perf_counter()
        mxsum_many(tensors)  # ends with one device-to-host copy: synchronised
        times.append(time.perf_counter() - began)
    best = statistics.median(times[1:])
    return nbytes / best / 1e9, best


FIRST_LOAD = """
import json, sys, time
began = time.perf_counter()
import torch
device = int(sys.argv[2])
torch.cuda.set_device(device)
import anyio
from mx_orchestrator import ModelIdentity, Orchestrator
from mx_orchestrator._backends.nixl import agent_creation_seconds
from mx_orchestrator.registry.sqlite import SqliteRegistry
from mx_orchestrator.target import Target
from strategies.cuda_ipc import CudaIpc
from strategies.rdma_region import RdmaRegion

async def main():
    registry = SqliteRegistry(sys.argv[1])
    # as mxo pull --device cuda:N orders them; the NIXL agent starts being made here
    names = sys.argv[3].split(",")
    strategies = [{"cuda_ipc": CudaIpc, "rdma_region": RdmaRegion}[n]() for n in names]
    expect = sys.argv[5] if len(sys.argv) > 5 else None
    report = await Orchestrator(registry, strategies, rank_window=0.0, attempt_timeout=300, expect=expect).load(
        ModelIdentity(sys.argv[4]), Target("arena", f"cuda:{device}", verify=True))
    await registry.aclose()
    data = report.to_dict()
    while "rdma_region" in names and agent_creation_seconds() is None:
        time.sleep(0.05)
    print(json.dumps({"load_s": data["seconds"], "agent_creation_s": agent_creation_seconds(),
                      "agent_wait_s": data["agent_wait_seconds"], "strategy": data["strategy"],
                      "verified": data["verified"], "process_s": time.perf_counter() - began,
                      "attempts": [(a["strategy"], a["outcome"], a["phases"]) for a in data["attempts"]]}))

anyio.run(main)
"""


def first_load(url: str, device: int, strategies: str, model: str, expect: str = "") -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(FIRST_LOAD), url.removeprefix("sqlite://"), str(device), strategies, model]
        + ([expect] if expect else []),
        capture_output=True, text=True, timeout=300, cwd=HERE.parent,
    )  # fmt: skip
    if out.returncode != 0:
        return {"error": out.stderr[-2000:]}
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


async def pin_of_source(url: str, identity: ModelIdentity) -> str:
    registry = SqliteRegistry(url.removeprefix("sqlite://"))
    try:
        (record,) = await registry.list(identity.key)
        manifest = await registry.get_manifest(record.source_id, record.generation)
        assert manifest is not None and manifest.content_fingerprint is not None
        return manifest.content_fingerprint
    finally:
        await registry.aclose()


def mxo_pulls(url: str, device: int, model: str, pin: str, strategies: str, repeat: int) -> dict[str, Any]:
    """Fresh ``mxo pull --device cuda:N`` processes, pinned and not, interleaved: wall time each."""
    base = [sys.executable, "-m", "mx_orchestrator", "pull", "--model-id", model, "--registry", url,
            "--device", f"cuda:{device}", "--strategies", strategies, "--json"]  # fmt: skip
    runs: dict[str, list[dict[str, Any]]] = {"unpinned": [], "pinned": []}
    for _ in range(repeat):
        for label, extra in (("unpinned", []), ("pinned", ["--expect", pin])):
            began = time.perf_counter()
            out = subprocess.run(base + extra, capture_output=True, text=True, timeout=300, cwd=HERE.parent)
            wall = time.perf_counter() - began
            if out.returncode != 0:
                runs[label].append({"error": out.stderr[-1500:], "rc": out.returncode})
                continue
            data = json.loads(out.stdout)
            last = data["attempts"][-1]
            runs[label].append(
                {
                    "process_s": round(wall, 3),
                    "load_s": round(data["seconds"], 4),
                    "verified": data["verified"],
                    "phases_ms": {k: round(v * 1e3, 2) for k, v in last.get("phases", {}).items()},
                }
            )
    summary: dict[str, Any] = {"runs": runs}
    ok = {k: [r["process_s"] for r in v if "process_s" in r] for k, v in runs.items()}
    if ok["pinned"] and ok["unpinned"]:
        summary["median_process_s"] = {k: statistics.median(v) for k, v in ok.items()}
        summary["pinned_minus_unpinned_s"] = round(
            statistics.median(ok["pinned"]) - statistics.median(ok["unpinned"]), 3
        )
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--set", default="llama16g")
    args = parser.parse_args()
    configure_logging("warning")
    gpus = torch.cuda.device_count()
    if gpus == 0:
        raise SystemExit("no CUDA device: bench/gpu_ttw.py runs on GPU machines only")
    src, dst = 0, (1 if gpus > 1 else 0)
    torch.cuda.set_device(dst)
    try:
        from mx_orchestrator._backends.nixl import agent_creation_seconds, get_agent

        have_nixl = True
    except ImportError:  # the GPU image lacks nixl and its wheel is larger than a device run carries
        have_nixl = False
    from strategies.cuda_ipc import CudaIpc
    from strategies.rdma_region import RdmaRegion

    identity = ModelIdentity(f"bench/{args.set}")
    out: dict[str, Any] = {
        "benchmark": "gpu_ttw",
        "date": time.strftime("%Y-%m-%d"),
        "gpus": gpus,
        "gpu": torch.cuda.get_device_name(0),
        "source_gpu": src,
        "target_gpu": dst,
    }

    def emit(key: str, value: Any) -> None:
        out[key] = value
        print(json.dumps({key: value}), file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite://{tmp}/registry.db"
        proc = start_source(args.set, "arena", url, "gpu-arena", f"cuda:{src}")
        try:
            pin = anyio.run(pin_of_source, url, identity)
            emit("pin", pin)
            names = "cuda_ipc,rdma_region" if have_nixl else "cuda_ipc"
            emit("first_load_fresh_process", first_load(url, dst, names, identity.model_id))
            emit("first_load_fresh_process_pinned", first_load(url, dst, names, identity.model_id, pin))
            emit("mxo_pull_fresh_process", mxo_pulls(url, dst, identity.model_id, pin, names, args.repeat))
            if have_nixl:
                get_agent()  # prewarmed from here on
                emit("agent_creation_s", agent_creation_seconds())
            for verify in (False, True):
                for reuse in (False, True):
                    key = f"cuda_ipc_{'verified' if verify else 'unverified'}_{'reused' if reuse else 'fresh'}_target"
                    emit(
                        key,
                        anyio.run(
                            loads, url, identity, [CudaIpc()], f"cuda:{dst}", args.repeat, verify, reuse
                        ),
                    )
            if gpus > 1:
                emit(
                    "cuda_ipc_same_gpu_verified",
                    anyio.run(loads, url, identity, [CudaIpc()], f"cuda:{src}", args.repeat, True, False),
                )
                for verify in (False, True):
                    key = f"rdma_region_prewarmed_{'verified' if verify else 'unverified'}"
                    emit(
                        key,
                        anyio.run(
                            loads, url, identity, [RdmaRegion()], f"cuda:{dst}", args.repeat, verify, True
                        ),
                    )
            # a pinned load: the tree digest of every landed tensor, on the device
            emit(
                "cuda_ipc_pinned_reused_target",
                anyio.run(loads, url, identity, [CudaIpc()], f"cuda:{dst}", args.repeat, True, True, True),
            )
            # the device checksum over the whole set, on the GPU, and its CPU twin
            target = Target("arena", f"cuda:{dst}", verify=False)
            registry = SqliteRegistry(url.removeprefix("sqlite://"))
            report = anyio.run(Orchestrator(registry, [CudaIpc()], rank_window=0.0).load, identity, target)
            assert report.loaded, report.to_json()
            tensors = list(target.tensors().values())
            gbps, seconds = mxsum_gbps(tensors, args.repeat)
            sample = tensors[:3] + tensors[-3:]
            agree = all(mxsum(t) == mxsum(t.cpu()) for t in sample)
            # random sizes, odd storage offsets, every dtype width: the GPU value equals the CPU one
            gen = torch.Generator().manual_seed(1)
            randoms = [
                torch.randint(
                    0,
                    256,
                    (int(torch.randint(0, 300_000, (1,), generator=gen)) + 1,),
                    dtype=torch.uint8,
                    generator=gen,
                )[1:]
                for _ in range(200)
            ]
            on_gpu = mxsum_many([r.to(f"cuda:{dst}") for r in randoms])
            agree_random = on_gpu == [mxsum(r) for r in randoms]
            emit(
                "mxsum_gpu",
                {
                    "gbps": round(gbps, 1),
                    "ms": round(seconds * 1e3, 2),
                    "bytes": target.nbytes,
                    "cpu_equals_gpu_on_6_tensors": agree,
                    "cpu_equals_gpu_on_200_random_tensors": agree_random,
                },
            )
            del target, tensors, sample
            torch.cuda.empty_cache()
        finally:
            proc.terminate()
            proc.wait(60)
        if gpus == 1:
            small = start_source("llama", "arena", url, "gpu-1g", f"cuda:{src}")
            try:
                emit(
                    "rdma_region_same_gpu_1gib_unverified",
                    anyio.run(
                        loads,
                        url,
                        ModelIdentity("bench/llama"),
                        [RdmaRegion()],
                        f"cuda:{dst}",
                        1,
                        False,
                        True,
                    ),
                )
                emit(
                    "cuda_ipc_same_gpu_1gib_verified",
                    anyio.run(
                        loads, url, ModelIdentity("bench/llama"), [CudaIpc()], f"cuda:{dst}", 1, True, True
                    ),
                )
            finally:
                small.terminate()
                small.wait(60)
    text = json.dumps(out, indent=2)
    print(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_ttw.json").write_text(text)


if __name__ == "__main__":
    main()
