"""Benchmark: a fleet of 10 to 1,000 targets loading one model at once, in simulation over the real thing.

What is real: the ``Orchestrator`` each target loads with (evaluation, rendezvous
ranking, reader leases and admission at each source's cap, capacity waits, the
policy, STALE marks and unreachable reports), the registry backend (a real
SQLite file, or a real ``redis-server`` this script starts), the records every
source publishes and heartbeats, and fan-out (a target that loaded publishes
itself, one hop further than the source it read). What is modelled: the bytes.
Transfers are flows through ``mx_orchestrator.testing.fleet.Fabric`` (each
source's link shared by its readers, each target's link, the Hub's), on a
virtual clock (``mx_orchestrator.testing.clock.VirtualClockLoop``) that stands
still while a registry call is in flight and jumps otherwise: a thousand
targets of a 16 GB model run in seconds of real time, and every registry call
is a real one.

Faults: each source but the first seed dies with probability ``--fail-rate``
at a random moment of its first transfer (its readers get ``SourceFailed``, its
record expires with its TTL) or freezes with ``--freeze-rate`` (its readers
time out). A run checks that every target loads exactly once and that no
source ever carried more readers than its cap (counted on the fabric's links,
not in the registry).

    python bench/fleet.py [--targets 10,100,1000] [--registries sqlite,redis] [--json]

Prints ``{"runs": [...]}`` (times in simulated seconds) and writes
``bench/results/fleet.png`` (time to all-loaded against N, log axis) beside it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))

import anyio  # noqa: E402

from mx_orchestrator.logs import configure_logging  # noqa: E402
from mx_orchestrator.registry.redis import RedisRegistry  # noqa: E402
from mx_orchestrator.registry.sqlite import SqliteRegistry  # noqa: E402
from mx_orchestrator.testing.clock import VirtualClockLoop, accounted, virtual_wall_clock  # noqa: E402
from mx_orchestrator.testing.fleet import FleetConfig, FleetSimulation  # noqa: E402

sys.path.insert(0, str(HERE))
from registry import start_redis  # noqa: E402

sys.path.remove(str(HERE))

GB = 1e9


def run_one(args: argparse.Namespace, url: str, targets: int, fanout: bool, seed: int) -> dict[str, Any]:
    config = FleetConfig(
        targets=targets,
        fanout=fanout,
        model_bytes=int(args.model_gb * GB),
        link_bps=args.link_gbps * GB,
        hub_bps=args.hub_gbps * GB,
        reader_cap=args.reader_cap,
        seeds=args.seeds,
        ttl=args.ttl,
        attempt_timeout=args.attempt_timeout,
        fail_rate=args.fail_rate,
        freeze_rate=args.freeze_rate,
        seed=seed,
    )

    async def main() -> dict[str, Any]:
        # leases, TTLs and ejections on the simulated clock
        if url.startswith("sqlite://"):
            registry: Any = SqliteRegistry(url.removeprefix("sqlite://"), clock=virtual_wall_clock)
        else:
            registry = RedisRegistry.from_url(url, clock=virtual_wall_clock)
        began = time.perf_counter()
        try:
            summary = await FleetSimulation(config, accounted(registry)).run()
        finally:
            await registry.aclose()
        return {
            "registry": args.registry_name,
            **summary,
            "real_seconds": round(time.perf_counter() - began, 2),
        }

    return anyio.run(main, backend="asyncio", backend_options={"loop_factory": VirtualClockLoop})


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for registry in sorted({r["registry"] for r in runs}):
        for fanout in (True, False):
            rows = sorted(
                (r for r in runs if r["registry"] == registry and r["fanout"] is fanout),
                key=lambda r: r["targets"],
            )
            if rows:
                ax.plot(
                    [r["targets"] for r in rows],
                    [r["seconds_to_all_loaded"] for r in rows],
                    marker="o",
                    linestyle="-" if fanout else "--",
                    label=f"{'fan-out' if fanout else 'one seed, no fan-out'} ({registry})",
                )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("targets loading at once")
    ax.set_ylabel("simulated seconds until every target loaded")
    ax.set_title("16 GB model, 25 GB/s links, 8 readers per source")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="10,100,1000", help="fleet sizes, comma separated")
    parser.add_argument("--registries", default="sqlite,redis", help="sqlite, redis or both")
    parser.add_argument("--fanout", default="both", choices=["both", "on", "off"])
    parser.add_argument("--model-gb", type=float, default=16.0)
    parser.add_argument(
        "--link-gbps", type=float, default=25.0, help="GB/s of each source's and target's link"
    )
    parser.add_argument("--hub-gbps", type=float, default=10.0, help="GB/s the Hub serves the whole fleet")
    parser.add_argument("--reader-cap", type=int, default=8, help="max readers per source (serve's default)")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--ttl", type=float, default=15.0)
    parser.add_argument("--attempt-timeout", type=float, default=60.0)
    parser.add_argument("--fail-rate", type=float, default=0.02)
    parser.add_argument("--freeze-rate", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print the JSON only")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args()
    configure_logging("error")
    sizes = [int(n) for n in args.targets.split(",")]
    fanouts = {"both": [True, False], "on": [True], "off": [False]}[args.fanout]
    registries = [r.strip() for r in args.registries.split(",") if r.strip()]
    if "redis" in registries and shutil.which("redis-server") is None:
        print("redis-server is not installed: running sqlite only", file=sys.stderr)
        registries.remove("redis")
    runs = []
    began = time.perf_counter()
    for registry in registries:
        args.registry_name = registry
        proc = None
        with tempfile.TemporaryDirectory() as tmp:
            if registry == "redis":
                proc, url = start_redis()
            try:
                for n in sizes:
                    for fanout in fanouts:
                        if registry == "sqlite":
                            url = f"sqlite://{tmp}/fleet-{n}-{fanout}.db"
                        else:
                            url = f"{url.rsplit('/', 1)[0]}/{len(runs) % 16}"  # a fresh database per run
                        row = run_one(args, url, n, fanout, args.seed)
                        runs.append(row)
                        if not args.json:
                            print(json.dumps(row), file=sys.stderr, flush=True)
            finally:
                if proc is not None:
                    proc.terminate()
                    proc.wait(10)
    out: dict[str, Any] = {
        "benchmark": "fleet",
        "date": time.strftime("%Y-%m-%d"),
        "model_bytes": int(args.model_gb * GB),
        "link_gbps": args.link_gbps,
        "hub_gbps": args.hub_gbps,
        "fail_rate": args.fail_rate,
        "freeze_rate": args.freeze_rate,
        "runs": runs,
        "real_seconds": round(time.perf_counter() - began, 1),
    }
    for registry in registries:
        by = {
            (r["targets"], r["fanout"]): r["seconds_to_all_loaded"] for r in runs if r["registry"] == registry
        }
        lo, hi = min(sizes), max(sizes)
        if (lo, True) in by and (hi, True) in by:
            out.setdefault("growth", {})[f"{registry}_fanout_{hi}_over_{lo}"] = round(
                by[hi, True] / by[lo, True], 2
            )
        if (lo, False) in by and (hi, False) in by:
            out.setdefault("growth", {})[f"{registry}_one_seed_{hi}_over_{lo}"] = round(
                by[hi, False] / by[lo, False], 2
            )
    if not args.no_plot:
        path = HERE / "results" / "fleet.png"
        plot(runs, path)
        out["plot"] = str(path.relative_to(HERE.parent))
    print(json.dumps(out, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
