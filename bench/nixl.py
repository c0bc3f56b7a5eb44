"""Benchmark: NIXL pulls against the physical limit and raw NIXL, side by side in one run.

For ~1 GiB in three shapes (one region; a Llama-8B-like set of 291 tensors;
5,000 scattered 200 KiB tensors) it measures, with destination memory
pre-faulted and verification off:

* single-thread and two-thread memcpy of the same number of bytes (the limit),
* raw NIXL: the same descriptors the orchestrator would post, through the same
  agent, timed from ``initialize_xfer`` to completion,
* the orchestrated ``rdma_region`` / ``rdma_tensor`` pull (``Orchestrator.load``),

and prints one JSON object with medians and ratios.

    python bench/nixl.py [--repeat N] [--sets one,llama,scattered]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import numpy as np

HERE = Path(__file__).resolve().parent
# this file is named like the nixl package: keep bench/ off the import path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))

from mx_orchestrator import ModelIdentity  # noqa: E402
from mx_orchestrator._backends.nixl import get_agent  # noqa: E402
from mx_orchestrator.layout import plan_region_reads, plan_tensor_reads  # noqa: E402
from mx_orchestrator.logs import configure_logging  # noqa: E402
from mx_orchestrator.registry.sqlite import SqliteRegistry  # noqa: E402
from mx_orchestrator.target import Target  # noqa: E402
from strategies.rdma_region import RdmaRegion  # noqa: E402
from strategies.rdma_tensor import RdmaTensor  # noqa: E402

sys.path.append(str(HERE))  # bench helpers; last, so bench/nixl.py never shadows the nixl package
from _synthetic import SyntheticSource as Source  # noqa: E402
from _timing import orchestrated, ratios, raw_nixl  # noqa: E402


def memcpy_gbps(nbytes: int, threads: int, repeat: int) -> float:
    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.zeros(nbytes, dtype=np.uint8)  # written once: pre-faulted
    dst.fill(1)
    chunk = nbytes // threads
    times = []
    for _ in range(repeat):

        def copy(i: int) -> None:
            end = nbytes if i == threads - 1 else (i + 1) * chunk
            np.copyto(dst[i * chunk : end], src[i * chunk : end])

        workers = [threading.Thread(target=copy, args=(i,)) for i in range(threads)]
        began = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        times.append(time.perf_counter() - began)
    return nbytes / statistics.median(times) / 1e9


def process_vm_readv_gbps(pid: int, address: int, nbytes: int, repeat: int) -> float | None:
    """The kernel's cross-process copy (what UCX's cma transport uses) on the same bytes."""
    import ctypes

    class IoVec(ctypes.Structure):
        _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]

    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    dst = np.ones(nbytes, dtype=np.uint8)
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        done = 0
        while done < nbytes:
            local = IoVec(dst.ctypes.data + done, nbytes - done)
            remote = IoVec(address + done, nbytes - done)
            got = libc.process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
            if got <= 0:
                return None  # not permitted here (ptrace scope): leave it out
            done += got
        times.append(time.perf_counter() - began)
    return nbytes / statistics.median(times) / 1e9


def fresh_pull(identity: ModelIdentity, registry_url: str, runs: int = 3) -> dict[str, Any]:
    """``mxo pull`` in a new process: the report's whole-load seconds (median) and where they went."""
    loads, walls, reports = [], [], []
    for _ in range(runs):
        began = time.perf_counter()
        out = subprocess.run(
            [sys.executable, "-m", "mx_orchestrator", "pull", "--model-id", identity.model_id,
             "--registry", registry_url, "--strategies", "rdma_region", "--json", "--no-verify"],
            capture_output=True, text=True, timeout=300, cwd=HERE.parent,
        )  # fmt: skip
        walls.append(time.perf_counter() - began)
        report = json.loads(out.stdout)
        assert report["outcome"] == "loaded", report
        loads.append(report["seconds"])
        reports.append(report)
    middle = reports[loads.index(statistics.median_low(loads))]
    return {
        "load_seconds": round(statistics.median(loads), 4),
        "process_wall_seconds": round(statistics.median(walls), 3),
        "agent_wait_seconds": middle["agent_wait_seconds"],
        "phases": middle["attempts"][-1]["phases"],
        "evaluation_seconds": middle["evaluation_seconds"],
    }


def measure_set(set_name: str, registry_url: str, repeat: int) -> dict[str, Any]:
    identity = ModelIdentity(f"bench/{set_name}")
    path = registry_url.removeprefix("sqlite://")
    result: dict[str, Any] = {"set": set_name}

    async def phase(strategy: str) -> None:
        registry = SqliteRegistry(path)
        if strategy == "rdma_region":
            (record,) = await registry.list(identity.key)
            first_region = json.loads(record.transport["nixl_regions"])[0]
            cma = process_vm_readv_gbps(source.proc.pid, first_region[0], first_region[1], repeat)
            result["process_vm_readv_gbps"] = round(cma, 2) if cma else None
        plan, cls = (
            (plan_region_reads, RdmaRegion) if strategy == "rdma_region" else (plan_tensor_reads, RdmaTensor)
        )
        target = Target("arena", verify=False)
        raw, setup, ndesc = await raw_nixl(registry, identity, target, plan, repeat)
        orch, load = await orchestrated(registry, identity, target, cls(), repeat)
        result.update(bytes=target.nbytes, tensors=len(target.tensors()))
        result[strategy] = ratios(target.nbytes, raw, setup, orch, load, ndesc)
        if strategy == "rdma_tensor":
            result[strategy]["source_layout"] = "tensor" if set_name != "one" else "arena"
        await registry.aclose()

    source = Source(set_name, "arena", registry_url, f"{set_name}-arena")
    try:
        anyio.run(phase, "rdma_region")
        if set_name == "one":
            anyio.run(phase, "rdma_tensor")
            result["fresh_mxo_pull"] = fresh_pull(identity, registry_url)
    finally:
        source.stop()
    if set_name != "one":
        source = Source(set_name, "tensor", registry_url, f"{set_name}-tensor")
        try:
            anyio.run(phase, "rdma_tensor")
        finally:
            source.stop()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--sets", default="one,llama,scattered")
    args = parser.parse_args()
    configure_logging("warning")
    get_agent()  # created once, outside every timing
    with tempfile.TemporaryDirectory() as tmp:
        registry_url = f"sqlite://{tmp}/registry.db"
        results = []
        for set_name in args.sets.split(","):
            memcpy1 = memcpy_gbps(1 << 30, 1, args.repeat)
            memcpy2 = memcpy_gbps(1 << 30, 2, args.repeat)
            row = measure_set(set_name, registry_url, args.repeat)
            row["memcpy_1thread_gbps"] = round(memcpy1, 2)
            row["memcpy_2threads_gbps"] = round(memcpy2, 2)
            for key in ("rdma_region", "rdma_tensor"):
                if key in row:
                    if row.get("process_vm_readv_gbps"):
                        row[key]["vs_process_vm_readv"] = round(
                            row[key]["orchestrated_gbps"] / row["process_vm_readv_gbps"], 3
                        )
                    row[key]["vs_memcpy_1thread"] = round(row[key]["orchestrated_gbps"] / memcpy1, 3)
                    row[key]["vs_memcpy_2threads"] = round(row[key]["orchestrated_gbps"] / memcpy2, 3)
            if "fresh_mxo_pull" in row:
                memcpy_seconds = row["bytes"] / (memcpy1 * 1e9)
                row["fresh_mxo_pull"]["memcpy_seconds"] = round(memcpy_seconds, 4)
                row["fresh_mxo_pull"]["vs_memcpy_time"] = round(
                    row["fresh_mxo_pull"]["load_seconds"] / memcpy_seconds, 2
                )
            results.append(row)
    print(
        json.dumps(
            {
                "benchmark": "nixl",
                "date": time.strftime("%Y-%m-%d"),
                "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
                "repeat": args.repeat,
                "results": results,
                "targets": {
                    "rdma_region_vs_memcpy_1thread": 0.95,
                    "rdma_tensor_vs_memcpy_llama": 0.80,
                    "orchestrated_vs_raw": 0.97,
                    "fresh_mxo_pull_vs_memcpy_time": 8.0,
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
