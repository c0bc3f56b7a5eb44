"""Benchmark: the tree digest on every host core against one core's flat SHA-256, side by side.

A buffer (``--gib``, default 1) of random bytes, pre-faulted; measured in one
run: hashlib's flat SHA-256 of the whole buffer (one core: the serial rate a
flat per-tensor digest is bound to), and :func:`mx_orchestrator.digests.tree_digest`
with every core. Issue 23 asks the host path for >= 0.8 x (cores x one core's
rate). Prints one JSON object.

    python bench/digest.py [--gib 1] [--repeat 3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402

from mx_orchestrator.digests import tree_digest  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    nbytes = int(args.gib * (1 << 30))
    data = np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8)  # written: pre-faulted
    flat, tree = [], []
    for _ in range(args.repeat):
        began = time.perf_counter()
        hashlib.sha256(memoryview(data)).digest()
        flat.append(time.perf_counter() - began)
        began = time.perf_counter()
        tree_digest(data)
        tree.append(time.perf_counter() - began)
    cores = os.cpu_count() or 1
    one_core = nbytes / statistics.median(flat) / 1e9
    every_core = nbytes / statistics.median(tree) / 1e9
    print(
        json.dumps(
            {
                "benchmark": "digest",
                "date": time.strftime("%Y-%m-%d"),
                "bytes": nbytes,
                "cores": cores,
                "flat_sha256_one_core_gbps": round(one_core, 3),
                "tree_digest_every_core_gbps": round(every_core, 3),
                "ratio_to_cores_x_one_core": round(every_core / (cores * one_core), 3),
                "target_ratio": 0.8,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
