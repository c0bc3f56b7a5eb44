"""Benchmark: the tree digest on every host core against one core's flat SHA-256, side by side.

A buffer (``--gib``, default 1) of random bytes, pre-faulted; measured in one
run: hashlib's flat SHA-256 of the whole buffer (one core: the serial rate a
flat per-tensor digest is bound to); :func:`mx_orchestrator.digests.tree_digest`
with every core; ``mxo fingerprint --weights`` over the same bytes as a
checkpoint of 64 tensors (in process: what the command runs, files
memory-mapped and in the page cache; and the whole command as a process); and
what a pinned load's ``verify`` phase runs on a CPU target (the digests of the
landed tensors against the pin, :func:`mx_orchestrator.integrity.bad_digests`).
Issue 23 asks the host paths for >= 0.8 x (cores x one core's rate). Prints one
JSON object.

    python bench/digest.py [--gib 1] [--repeat 3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from mx_orchestrator.checkpoint import fingerprint_directory  # noqa: E402
from mx_orchestrator.digests import tree_digest  # noqa: E402
from mx_orchestrator.integrity import bad_digests  # noqa: E402
from mx_orchestrator.models import ModelIdentity  # noqa: E402
from mx_orchestrator.source import load_weights  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-loads", dest="loads", action="store_false", help="skip the real pinned loads")
    args = parser.parse_args()
    nbytes = int(args.gib * (1 << 30))
    data = np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8)  # written: pre-faulted
    tensors = {f"layer.{i}.weight": torch.from_numpy(part) for i, part in enumerate(np.split(data, 64))}
    flat, tree, fingerprint, verify, cli = [], [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        save_file(tensors, str(Path(tmp) / "model.safetensors"))
        pin, _ = fingerprint_directory(Path(tmp))
        pinned = load_weights(ModelIdentity("bench/digest"), Path(tmp), "arena").manifest
        assert pinned.content_fingerprint == pin
        for _ in range(args.repeat):
            flat.append(timed(lambda: hashlib.sha256(memoryview(data)).digest()))
            tree.append(timed(lambda: tree_digest(data)))
            fingerprint.append(timed(lambda: fingerprint_directory(Path(tmp))))
            verify.append(timed(lambda: bad_digests(tensors, pinned)))
            command = [sys.executable, "-m", "mx_orchestrator", "fingerprint", "--weights", tmp]
            cli.append(timed(lambda c=command: subprocess.run(c, check=True, capture_output=True)))
    cores = os.cpu_count() or 1
    one_core = nbytes / statistics.median(flat) / 1e9
    loads = pinned_loads(args.repeat) if args.loads else {}

    def rate(times: list[float]) -> dict[str, float]:
        gbps = nbytes / statistics.median(times) / 1e9
        return {"gbps": round(gbps, 3), "ratio_to_cores_x_one_core": round(gbps / (cores * one_core), 3)}

    print(
        json.dumps(
            {
                "benchmark": "digest",
                "date": time.strftime("%Y-%m-%d"),
                "bytes": nbytes,
                "cores": cores,
                "flat_sha256_one_core_gbps": round(one_core, 3),
                "tree_digest_every_core": rate(tree),
                "mxo_fingerprint_in_process": rate(fingerprint),
                "mxo_fingerprint_process_s": round(statistics.median(cli), 3),
                "pinned_verify_phase": rate(verify),
                "pinned_loads": {
                    k: {
                        **v,
                        "verify_ratio_to_cores_x_one_core": round(v["verify_gbps"] / (cores * one_core), 3),
                    }
                    for k, v in loads.items()
                },
                "target_ratio": 0.8,
            },
            indent=2,
        )
    )


def pinned_loads(repeat: int) -> dict[str, dict[str, float]]:
    """Real pinned loads of the 1 GiB Llama-like set (291 tensors) from two source processes on
    loopback NIXL into a CPU target, stripe 1 and 2: the report's ``verify`` time, its rate, and the
    part of it that ran while another part was in flight."""
    import anyio

    sys.path.insert(0, str(HERE))
    from _synthetic import SyntheticSource

    sys.path.remove(str(HERE))  # bench/nixl.py would shadow the nixl package when the agent imports it

    from mx_orchestrator import Orchestrator
    from mx_orchestrator.registry.sqlite import SqliteRegistry
    from mx_orchestrator.target import Target
    from strategies.rdma_region import RdmaRegion
    from strategies.rdma_tensor import RdmaTensor

    identity = ModelIdentity("bench/llama")
    out: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite://{tmp}/registry.db"
        sources = [SyntheticSource("llama", "arena", url, f"src-{i}") for i in range(2)]
        try:

            async def pin() -> str:
                registry = SqliteRegistry(url.removeprefix("sqlite://"))
                record = (await registry.list(identity.key))[0]
                manifest = await registry.get_manifest(record.source_id, record.generation)
                await registry.aclose()
                assert manifest is not None and manifest.content_fingerprint is not None
                return manifest.content_fingerprint

            expect = anyio.run(pin)

            async def one(stripe: int) -> dict[str, Any]:
                registry = SqliteRegistry(url.removeprefix("sqlite://"))
                async with Orchestrator(
                    registry, [RdmaRegion(), RdmaTensor()], stripe=stripe, rank_window=2.0, expect=expect
                ) as o:
                    report = await o.load(identity, Target("arena"))
                await registry.aclose()
                data = report.to_dict()
                assert report.loaded and data["verified"], data["reason"]
                return data

            for stripe in (1, 2):
                runs = [anyio.run(one, stripe) for _ in range(repeat)]
                verify = statistics.median(r["verify_seconds"] for r in runs)
                out[f"stripe_{stripe}"] = {
                    "seconds": round(statistics.median(r["seconds"] for r in runs), 4),
                    "verify_seconds": round(verify, 4),
                    "verify_gbps": round(runs[0]["bytes"] / verify / 1e9, 3),
                    "verify_overlapped_seconds": round(
                        statistics.median(r["verify_overlapped_seconds"] for r in runs), 4
                    ),
                }
        finally:
            for s in sources:
                s.stop()
    return out


def timed(fn: Callable[[], object]) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


if __name__ == "__main__":
    main()
