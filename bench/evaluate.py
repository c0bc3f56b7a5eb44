"""Benchmark: concurrent candidate evaluation and the cost of pure decisions.

Prints one JSON object: for 10 / 100 / 1,000 fake candidates with 10 ms and
100 ms probe latency, the evaluation wall time against the serial sum; and the
CPU time of planner + policy + rendezvous selection per candidate.

    python bench/evaluate.py [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import anyio

from mx_orchestrator import DEFAULT_POLICY, Candidate, DecisionState, ModelIdentity, Orchestrator, Policy
from mx_orchestrator.logs import configure_logging
from mx_orchestrator.outcomes import LayoutMismatch
from mx_orchestrator.plan import Attempt, Planner, StrategySlot
from mx_orchestrator.selection import rendezvous
from mx_orchestrator.testing import FakeStrategy, fail, make_record, scenario

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=128)
    args = parser.parse_args()
    configure_logging("warning")

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
                "policy_and_selection": decisions,
                "targets": {
                    "100x100ms_evaluation_s": {"value": row_100["evaluation_wall_s"], "target": 0.25},
                    "decisions_1000_ms": {"value": dec_1000["cpu_ms"], "target": 20.0},
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
