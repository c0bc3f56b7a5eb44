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

Modes (``--modes``): ``pipelined``, targets are partial sources from their first
landed part and read parts from ``--stripe`` sources at once, rarest first
(issue 24); ``whole``, a target serves once its whole load is in (the fan-out
of 2026-12-03); ``none``, one seed serves everyone. Each run reports its time
against one target alone (the model over one link: the physical floor).

Faults: each source but the first seed dies with probability ``--fail-rate``
at a random moment of its first transfer (its readers get ``SourceFailed``, its
record expires with its TTL) or freezes with ``--freeze-rate`` (its readers
time out). A run checks that every target loads exactly once and that no
source ever carried more readers than its cap (counted on the fabric's links,
not in the registry).

    python bench/fleet.py [--targets 10,100,1000] [--registries sqlite,redis] [--modes ...] [--json]

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


#: how targets share what they load: while loading (partial sources, parts from several sources at
#: once, issue 24), once loaded (a whole copy), or not at all (one seed serves everyone)
MODES = {"pipelined": (True, True), "whole": (True, False), "none": (False, False)}


def run_one(args: argparse.Namespace, url: str, targets: int, mode: str, seed: int) -> dict[str, Any]:
    fanout, pipelined = MODES[mode]
    config = FleetConfig(
        targets=targets,
        fanout=fanout,
        pipelined=pipelined,
        stripe=args.stripe,
        max_part_bytes=int(args.max_part_mb * 2**20),
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
            # the server expires keys in real seconds, and a run lasts minutes of them while its
            # virtual second stands still: keys outlive the run (listings judge life by the clock)
            registry = RedisRegistry.from_url(url, clock=virtual_wall_clock, key_expiry_floor=3600)
        began = time.perf_counter()
        try:
            summary = await FleetSimulation(config, accounted(registry)).run()
        finally:
            await registry.aclose()
        alone = config.model_bytes / config.link_bps
        done = summary["seconds_to_all_loaded"]
        return {
            "registry": args.registry_name,
            "mode": mode,
            **summary,
            "one_target_alone_seconds": round(alone, 3),
            "over_one_target": round(done / alone, 2) if done is not None else None,
            "real_seconds": round(time.perf_counter() - began, 2),
        }

    return anyio.run(main, backend="asyncio", backend_options={"loop_factory": VirtualClockLoop})


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    labels = {
        "pipelined": "pipelined fan-out (partial sources)",
        "whole": "fan-out once loaded (2026-12-03)",
        "none": "one seed, no fan-out",
    }
    styles = {"pipelined": "-", "whole": "-.", "none": "--"}
    for registry in sorted({r["registry"] for r in runs}):
        for mode in MODES:
            rows = sorted(
                (r for r in runs if r["registry"] == registry and r["mode"] == mode),
                key=lambda r: r["targets"],
            )
            if rows:
                ax.plot(
                    [r["targets"] for r in rows],
                    [r["seconds_to_all_loaded"] for r in rows],
                    marker="o",
                    linestyle=styles[mode],
                    label=f"{labels[mode]} ({registry})",
                )
    if runs:
        alone = runs[0]["one_target_alone_seconds"]
        ax.axhline(alone, color="grey", linewidth=0.8)
        ax.axhline(2 * alone, color="grey", linewidth=0.8, linestyle=":")
        ax.text(10, alone * 1.05, "one target alone", fontsize=7, color="grey")
        ax.text(10, 2 * alone * 1.05, "2 x one target", fontsize=7, color="grey")
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
    parser.add_argument(
        "--modes", default="pipelined,whole,none", help="pipelined, whole, none (comma separated)"
    )
    parser.add_argument("--stripe", type=int, default=5, help="pipelined: sources a target reads at once")
    parser.add_argument("--max-part-mb", type=float, default=128.0, help="pipelined: the largest part (MiB)")
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
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not set(modes) <= set(MODES):
        parser.error(f"--modes: choose from {sorted(MODES)}")
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
                    for mode in modes:
                        if registry == "sqlite":
                            url = f"sqlite://{tmp}/fleet-{n}-{mode}.db"
                        else:
                            url = f"{url.rsplit('/', 1)[0]}/{len(runs) % 16}"  # a fresh database per run
                        row = run_one(args, url, n, mode, args.seed)
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
            (r["targets"], r["mode"]): r["seconds_to_all_loaded"] for r in runs if r["registry"] == registry
        }
        lo, hi = min(sizes), max(sizes)
        for mode in modes:
            if (lo, mode) in by and (hi, mode) in by:
                out.setdefault("growth", {})[f"{registry}_{mode}_{hi}_over_{lo}"] = round(
                    by[hi, mode] / by[lo, mode], 2
                )
    if not args.no_plot:
        path = HERE / "results" / "fleet.png"
        plot(runs, path)
        out["plot"] = str(path.relative_to(HERE.parent))
    print(json.dumps(out, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
