"""Benchmark: concurrent candidate evaluation, MoE-sized manifests, and the cost of pure decisions.

Prints one JSON object:

* ``evaluation``: for 10 / 100 / 1,000 fake candidates with 10 ms and 100 ms
  probe latency, the evaluation wall time against the serial sum;
* ``moe_manifest``: a synthetic 90,000-tensor checkpoint (DeepSeek-V3-sized)
  published by 20 sources to a real SQLite registry file, as ``WeightSource``
  publishes: how many manifests the registry holds, the time to evaluate one
  candidate against all 20 (each in a fresh process-like state: an empty
  manifest cache), the blobs a second load in the same process fetches (0),
  and for reference what parsing every candidate's manifest as JSON, as the
  registry served it before manifests were content-addressed, would cost;
* ``policy_and_selection``: CPU time of planner + policy + rendezvous per candidate.

    python bench/evaluate.py [--repeat N] [--moe-tensors 90000] [--moe-sources 20]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio

from mx_orchestrator import DEFAULT_POLICY, Candidate, DecisionState, ModelIdentity, Orchestrator, Policy
from mx_orchestrator.logs import configure_logging
from mx_orchestrator.manifests import ManifestCache
from mx_orchestrator.models import Manifest
from mx_orchestrator.outcomes import LayoutMismatch
from mx_orchestrator.plan import Attempt, Planner, StrategySlot
from mx_orchestrator.registry.sqlite import SqliteRegistry
from mx_orchestrator.selection import rendezvous
from mx_orchestrator.testing import FakeStrategy, fail, make_manifest, make_record, scenario

IDENTITY = ModelIdentity("bench/model")


async def evaluation_seconds(n: int, latency: float, concurrency: int) -> float:
    registry, prober = await scenario(IDENTITY, [f"s{i:04d}" for i in range(n)], latency=latency)
    strategy = FakeStrategy("rdma_region", default=fail(LayoutMismatch))
    orchestrator = Orchestrator(
        registry,
        [strategy],
        prober=prober,
        probe_concurrency=concurrency,
        probe_timeout=10,
        policy=Policy(max_attempts=n + 1),
    )
    report = await orchestrator.load(IDENTITY)
    assert len(report.probes) == n
    return report.evaluation_seconds


def decision_cpu_seconds(n: int) -> float:
    candidates = [Candidate(make_record(IDENTITY, f"s{i:05d}")) for i in range(n)]
    began = time.process_time()
    planner = Planner([StrategySlot("rdma_region")], rendezvous("target"), max_attempts=n + 1)
    for c in candidates:
        planner.add_candidate(c)
    planner.evaluation_finished()
    policy = DEFAULT_POLICY
    while isinstance(step := planner.next_step(), Attempt):
        outcome = LayoutMismatch(strategy=step.strategy, source_id=step.source_id)
        planner.record(policy.decide(outcome, DecisionState(1, planner.attempts_total + 1)))
    return time.process_time() - began


def moe_manifest(tensors: int) -> Manifest:
    """``tensors`` expert weights (60 layers x 256 experts x 3, then more layers), with the per-tensor
    checksums and SHA-256 digests a real source publishes."""
    import hashlib

    names = (
        f"model.layers.{i // 768}.mlp.experts.{i // 3 % 256}.{('gate', 'up', 'down')[i % 3]}_proj.weight"
        for i in range(tensors)
    )
    manifest = make_manifest(ModelIdentity("bench/moe"), [(n, "BF16", (16, 8)) for n in names])
    return replace(
        manifest,
        tensors=tuple(
            replace(s, checksum=f"{i:016x}", digest=hashlib.sha256(s.name.encode()).hexdigest())
            for i, s in enumerate(manifest.tensors)
        ),
    )


class CountingRegistry(SqliteRegistry):
    blob_fetches = 0

    async def get_manifest_blob(self, key: str) -> bytes | None:
        self.blob_fetches += 1
        return await super().get_manifest_blob(key)


async def moe_evaluation(tensors: int, sources: int, repeat: int) -> dict[str, Any]:
    manifest = moe_manifest(tensors)
    identity = manifest.identity
    began = time.perf_counter()
    stored = manifest.stored
    encode_s = time.perf_counter() - began
    result: dict[str, Any] = {
        "tensors": tensors,
        "sources": sources,
        "stored_manifest_bytes": len(stored.blob),
        "json_manifest_bytes": len(manifest.to_json()),
        "encode_once_s": round(encode_s, 3),
    }
    with tempfile.TemporaryDirectory() as tmp:
        timings: dict[int, list[float]] = {1: [], sources: []}
        for n in (1, sources):
            registry = CountingRegistry(Path(tmp) / f"registry-{n}.db")
            for i in range(n):  # what WeightSource.run publishes
                await registry.publish(make_record(identity, f"src-{i:02d}", ttl=3600), manifest)
            if n == sources:
                result["manifests_stored"] = await registry.manifests_stored()
            strategy = FakeStrategy("rdma_region", default=fail(LayoutMismatch))
            for _ in range(repeat):
                orchestrator = Orchestrator(
                    registry,
                    [strategy],
                    manifest_cache=ManifestCache(),  # a fresh process each time
                    probe_timeout=120,
                    policy=Policy(max_attempts=n + 1),
                )
                report = await orchestrator.load(identity)
                assert len(report.probes) == n and all(p.ok for p in report.probes), report.reason
                timings[n].append(report.evaluation_seconds)
            if n == sources:  # a second load in the same process: every manifest is known already
                registry.blob_fetches = 0
                report = await orchestrator.load(identity)
                assert len(report.probes) == n and all(p.ok for p in report.probes)
                result["second_load_manifest_fetches"] = registry.blob_fetches
                result["second_load_evaluation_s"] = round(report.evaluation_seconds, 4)
            await registry.aclose()
    one, all_ = statistics.median(timings[1]), statistics.median(timings[sources])
    text = manifest.to_json()
    began = time.perf_counter()
    Manifest.from_json(text)
    json_parse = time.perf_counter() - began
    result.update(
        {
            "evaluate_one_s": round(one, 4),
            f"evaluate_{sources}_s": round(all_, 4),
            "ratio_all_to_one": round(all_ / one, 3),
            "before_json_parse_per_candidate_s": round(json_parse, 4),
            f"before_{sources}_candidates_parse_s": round(json_parse * sources, 3),
        }
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=128)
    parser.add_argument("--moe-tensors", type=int, default=90_000)
    parser.add_argument("--moe-sources", type=int, default=20)
    args = parser.parse_args()
    configure_logging("warning")
    moe = anyio.run(moe_evaluation, args.moe_tensors, args.moe_sources, args.repeat)

    rows = []
    for n in (10, 100, 1000):
        for latency in (0.010, 0.100):
            walls = [anyio.run(evaluation_seconds, n, latency, args.concurrency) for _ in range(args.repeat)]
            wall = statistics.median(walls)
            rows.append(
                {
                    "candidates": n,
                    "probe_latency_s": latency,
                    "evaluation_wall_s": round(wall, 4),
                    "serial_equivalent_s": round(n * latency, 3),
                    "speedup": round(n * latency / wall, 1),
                }
            )
    decisions = []
    for n in (10, 100, 1000):
        cpu = statistics.median(decision_cpu_seconds(n) for _ in range(args.repeat))
        decisions.append(
            {"candidates": n, "cpu_ms": round(cpu * 1e3, 3), "us_per_candidate": round(cpu / n * 1e6, 2)}
        )
    row_100 = next(r for r in rows if r["candidates"] == 100 and r["probe_latency_s"] == 0.1)
    dec_1000 = next(d for d in decisions if d["candidates"] == 1000)
    print(
        json.dumps(
            {
                "benchmark": "evaluate",
                "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                "repeat": args.repeat,
                "probe_concurrency": args.concurrency,
                "evaluation": rows,
                "moe_manifest": moe,
                "policy_and_selection": decisions,
                "targets": {
                    "100x100ms_evaluation_s": {"value": row_100["evaluation_wall_s"], "target": 0.25},
                    "decisions_1000_ms": {"value": dec_1000["cpu_ms"], "target": 20.0},
                    "moe_all_to_one": {"value": moe["ratio_all_to_one"], "target": 2.0},
                    "moe_manifests_stored": {"value": moe["manifests_stored"], "target": 1},
                    "moe_second_load_fetches": {"value": moe["second_load_manifest_fetches"], "target": 0},
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
