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
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))

import anyio  # noqa: E402

from mx_orchestrator import ModelIdentity, Orchestrator, Policy  # noqa: E402
from mx_orchestrator.logs import configure_logging  # noqa: E402
from mx_orchestrator.manifests import ManifestCache  # noqa: E402
from mx_orchestrator.models import SourceRecord  # noqa: E402
from mx_orchestrator.outcomes import Loaded  # noqa: E402
from mx_orchestrator.registry.redis import RedisRegistry  # noqa: E402
from mx_orchestrator.registry.sqlite import SqliteRegistry  # noqa: E402
from mx_orchestrator.testing import make_manifest  # noqa: E402
from mx_orchestrator.testing.clock import VirtualClockLoop, accounted, virtual_wall_clock  # noqa: E402
from mx_orchestrator.testing.fleet import Fabric, FabricHub, FabricPeer  # noqa: E402

sys.path.insert(0, str(HERE))
from registry import start_redis  # noqa: E402

sys.path.remove(str(HERE))

GB = 1e9
IDENTITY = ModelIdentity("fleet/llama-8b")


class Fleet:
    """One simulated fleet: the fabric, the registry, the sources and the targets."""

    def __init__(
        self, args: argparse.Namespace, registry: Any, targets: int, fanout: bool, seed: int
    ) -> None:
        self.args = args
        self.registry = registry
        self.targets = targets
        self.fanout = fanout
        self.rng = random.Random(seed)
        self.fabric = Fabric(
            source_bps=args.link_gbps * GB, target_bps=args.link_gbps * GB, hub_bps=args.hub_gbps * GB
        )
        self.nbytes = int(args.model_gb * GB)
        self.manifest = make_manifest(IDENTITY, 291)  # what the registry stores and targets parse
        self.loaded_at: dict[str, float] = {}
        self.reports: dict[str, Any] = {}
        self.failed_sources: set[str] = set()
        self.frozen_sources: set[str] = set()
        self.sources: list[str] = []
        self.policy = Policy(capacity_waits=100_000)  # a fleet waits for its peers rather than the Hub

    async def source(self, source_id: str, hops: int, first_seed: bool) -> None:
        """A serving process: publish, heartbeat; maybe die or freeze during its first transfer."""
        record = SourceRecord(
            source_id=source_id,
            identity_key=IDENTITY.key,
            generation=f"{source_id}-gen",
            endpoint=f"fabric://{source_id}",
            heartbeat_at=virtual_wall_clock(),
            ttl=self.args.ttl,
            max_readers=self.args.reader_cap,
            hops=hops,
        )
        await self.registry.publish(record, self.manifest)
        self.sources.append(source_id)
        fate = self.rng.random()
        doom = None
        if not first_seed and fate < self.args.fail_rate:
            doom = "kill"
        elif not first_seed and fate < self.args.fail_rate + self.args.freeze_rate:
            doom = "freeze"
        async with anyio.create_task_group() as tg:
            if doom is not None:
                tg.start_soon(self.fault, source_id, doom, tg.cancel_scope)
            while True:
                await anyio.sleep(self.args.ttl / 3)
                await self.registry.heartbeat(source_id, record.generation)

    async def fault(self, source_id: str, doom: str, heartbeats: anyio.CancelScope) -> None:
        """Strike at a random moment of the source's first transfer (when it has one)."""
        await self.fabric.first_reader(source_id)
        full_speed = self.nbytes / (self.fabric.source_bps / max(1, self.args.reader_cap))
        await anyio.sleep(self.rng.uniform(0.05, 0.95) * full_speed)
        if doom == "kill":
            self.fabric.kill(source_id)
            self.failed_sources.add(source_id)
        else:
            self.fabric.freeze(source_id)
            self.frozen_sources.add(source_id)
        heartbeats.cancel()  # a dead or stopped process sends none: its record expires with its TTL

    async def target(self, index: int, tg: anyio.abc.TaskGroup) -> None:
        target_id = f"t{index:04d}"
        orchestrator = Orchestrator(
            self.registry,
            [FabricPeer(self.fabric, target_id, self.nbytes), FabricHub(self.fabric, target_id, self.nbytes)],
            target_id=target_id,
            policy=self.policy,
            attempt_timeout=self.args.attempt_timeout,
            probe_timeout=30.0,
            manifest_cache=ManifestCache(),  # every target is its own process
        )
        report = await orchestrator.load(IDENTITY)
        self.reports[target_id] = report
        if report.loaded:
            self.loaded_at[target_id] = anyio.current_time()
            if self.fanout:
                hops = 0 if report.source_hops is None else report.source_hops + 1
                tg.start_soon(self.source, f"{target_id}-copy", hops, False)

    async def run(self) -> dict[str, Any]:
        began_real = time.perf_counter()
        began = anyio.current_time()
        async with anyio.create_task_group() as world:
            world.start_soon(self.fabric.run)
            for s in range(self.args.seeds):
                world.start_soon(self.source, f"seed-{s}", 0, s == 0)
            await anyio.sleep(0.001)  # the seeds are published before the fleet starts
            async with anyio.create_task_group() as fleet:
                for i in range(self.targets):
                    fleet.start_soon(self.target, i, world)
            world.cancel_scope.cancel()
        return self.summary(began, time.perf_counter() - began_real)

    def summary(self, began: float, real_seconds: float) -> dict[str, Any]:
        reports = self.reports.values()
        loaded_attempts = Counter(
            t for t, r in self.reports.items() for a in r.attempts if isinstance(a.outcome, Loaded)
        )
        outcomes = Counter(a.outcome.name for r in reports for a in r.attempts)
        stale_marks = sum(a.marked_stale for r in reports for a in r.attempts)
        busy_stale = sum(
            a.marked_stale for r in reports for a in r.attempts if a.outcome.name == "SourceBusy"
        )
        peak = max(self.fabric.peak_readers.values(), default=0)
        hops = Counter(r.source_hops for r in reports if r.loaded)
        return {
            "targets": self.targets,
            "fanout": self.fanout,
            "registry": self.args.registry_name,
            "seconds_to_all_loaded": round(max(self.loaded_at.values(), default=float("nan")) - began, 3),
            "median_seconds_to_loaded": round(
                sorted(self.loaded_at.values())[len(self.loaded_at) // 2] - began, 3
            )
            if self.loaded_at
            else None,
            "all_loaded": len(self.loaded_at) == self.targets,
            "loaded_twice": sum(1 for n in loaded_attempts.values() if n > 1),
            "max_readers_per_source": peak,
            "reader_cap": self.args.reader_cap,
            "cap_held": peak <= self.args.reader_cap or self.args.reader_cap == 0,
            "hub_bytes": int(self.fabric.bytes_through.get("hub", 0.0)),
            "peer_bytes": int(sum(v for k, v in self.fabric.bytes_through.items() if k.startswith("src:"))),
            "sources_at_end": len(self.sources),
            "failed_sources": len(self.failed_sources),
            "frozen_sources": len(self.frozen_sources),
            "stale_marks": stale_marks,
            "full_sources_marked_stale": busy_stale,
            "loaded_from_hops": {
                str(k): v for k, v in sorted(hops.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))
            },
            "capacity_waits": sum(r.capacity_waits for r in reports),
            "outcomes": dict(outcomes),
            "real_seconds": round(real_seconds, 2),
        }


def run_one(args: argparse.Namespace, url: str, targets: int, fanout: bool, seed: int) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        # leases, TTLs and ejections on the simulated clock
        if url.startswith("sqlite://"):
            registry: Any = SqliteRegistry(url.removeprefix("sqlite://"), clock=virtual_wall_clock)
        else:
            registry = RedisRegistry.from_url(url, clock=virtual_wall_clock)
        try:
            return await Fleet(args, accounted(registry), targets, fanout, seed).run()
        finally:
            await registry.aclose()

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
