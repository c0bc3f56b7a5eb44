"""Benchmark: striped loads, K = 1, 2, 3 sources at once, measured here and in a bandwidth model.

Two parts, one JSON object:

* ``measured``: three real source processes serving the same 1 GiB Llama-like
  set (291 tensors) on loopback NIXL; the same target loads it with
  ``stripe`` 1, 2, 3, side by side in one run, each into a fresh pre-faulted
  target, ``--repeat`` times (median). On loopback every source shares this
  machine's memory bus and the target's CPU, so K > 1 cannot be faster than
  one memcpy stream here; what this part shows is the cost of striping.
* ``model``: the real orchestrator, part planner and policy, with a transport
  whose READs take the time a bandwidth model says: each source behind one
  link of ``--link-gbps`` shared by its readers, the target behind
  ``--target-links`` such links. Time runs ``--time-scale`` times faster than
  the model, so a 16 GB load takes a fraction of a second; figures are model
  seconds. It shows load time against K (falling ~1/K until the target's
  links saturate), and the time lost when one source dies at 50 % of the
  load, striped (K=3: only its part moves) against a restart from zero
  (K=1: the next source reads everything again).

Writes ``bench/results/striping.png`` (time against K, both parts) beside the
JSON unless ``--no-plot``.

    python bench/striping.py [--repeat 3] [--json-only]
"""

from __future__ import annotations

import argparse
import json
import statistics
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
import numpy as np  # noqa: E402
import torch  # noqa: E402

from mx_orchestrator import ModelIdentity, Orchestrator  # noqa: E402
from mx_orchestrator._backends import EdgeFailure  # noqa: E402
from mx_orchestrator.logs import configure_logging  # noqa: E402
from mx_orchestrator.outcomes import SourceFailed  # noqa: E402
from mx_orchestrator.registry.sqlite import SqliteRegistry  # noqa: E402
from mx_orchestrator.source import WeightSource, load_weights  # noqa: E402
from mx_orchestrator.target import Target  # noqa: E402
from mx_orchestrator.testing import FakeRdmaAgent, FakeRdmaNetwork, FakeRegistry  # noqa: E402
from strategies.rdma_region import RdmaRegion  # noqa: E402
from strategies.rdma_tensor import RdmaTensor  # noqa: E402

sys.path.insert(0, str(HERE))
from _synthetic import SyntheticSource  # noqa: E402

sys.path.remove(str(HERE))  # bench/nixl.py would shadow the nixl package when the agent imports it

GB = 1e9


# -- measured: real processes ----------------------------------------------------------


def measured(repeat: int, stripes: list[int]) -> dict[str, Any]:
    identity = ModelIdentity("bench/llama")
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite://{tmp}/registry.db"
        sources = [SyntheticSource("llama", "arena", url, f"src-{i}") for i in range(max(stripes))]
        try:

            async def one(stripe: int) -> dict[str, Any]:
                registry = SqliteRegistry(url.removeprefix("sqlite://"))
                target = Target("arena")
                # pre-faulted memory, the same for every K: allocate before the clock starts
                async with Orchestrator(
                    registry, [RdmaRegion(), RdmaTensor()], stripe=stripe, rank_window=2.0
                ) as o:
                    began = time.perf_counter()
                    report = await o.load(identity, target)
                    seconds = time.perf_counter() - began
                await registry.aclose()
                data = report.to_dict()
                assert report.loaded, (
                    data["reason"],
                    [(a["source"], a["outcome"], a["detail"]) for a in data["attempts"]],
                )
                return {
                    "seconds": seconds,
                    "transfer_seconds": data["transfer_seconds"],
                    "bytes": data["bytes"],
                    "parts": data["parts"],
                    "bytes_by_source": data["bytes_by_source"],
                }

            runs: dict[int, list[dict[str, Any]]] = {k: [] for k in stripes}
            for _ in range(repeat):
                for k in stripes:  # side by side: K=1, 2, 3 in every round
                    runs[k].append(anyio.run(one, k))
        finally:
            for s in sources:
                s.stop()
    rows = []
    for k in stripes:
        seconds = statistics.median(r["seconds"] for r in runs[k])
        nbytes = runs[k][0]["bytes"]
        rows.append(
            {
                "stripe": k,
                "seconds": round(seconds, 4),
                "gbps": round(nbytes / seconds / GB, 3),
                "parts": runs[k][-1]["parts"],
                "sources_used": len(runs[k][-1]["bytes_by_source"]),
                "bytes_by_source": runs[k][-1]["bytes_by_source"],
            }
        )
    base = rows[0]["seconds"]
    for row in rows:
        row["speedup_vs_k1"] = round(base / row["seconds"], 3)
    return {"bytes": runs[stripes[0]][0]["bytes"], "repeat": repeat, "runs": rows}


# -- model: the real pipeline over a bandwidth-modelled transport ------------------------


class Links:
    """The bandwidth model: each source's link is shared by its readers, the target's by all."""

    def __init__(self, link_bps: float, target_links: int, scale_bytes: float, time_scale: float) -> None:
        self.link_bps = link_bps
        self.target_bps = link_bps * target_links
        self.scale_bytes = scale_bytes
        self.time_scale = time_scale
        self.active: dict[str, int] = {}
        self.dies_at: dict[str, float] = {}

    def seconds(self, source: str, nbytes: int) -> float:
        """Model seconds for ``nbytes`` real bytes from ``source`` with the readers active now."""
        total = sum(self.active.values())
        rate = min(self.link_bps / max(1, self.active.get(source, 0)), self.target_bps / max(1, total))
        return nbytes * self.scale_bytes / rate


class ModelledAgent(FakeRdmaAgent):
    """The fake agent (really copies bytes) whose READs take the model's time."""

    links: Links

    async def read(self, remote: str, local: Any, remote_blocks: Any, **kwargs: Any) -> float:
        links = self.links
        nbytes = int(np.asarray(local)[:, 1].sum()) if len(local) else 0
        links.active[remote] = links.active.get(remote, 0) + 1
        try:
            began = anyio.current_time()
            duration = links.seconds(remote, nbytes) * links.time_scale
            dies = links.dies_at.get(remote)
            if dies is not None and began + duration >= dies:
                await anyio.sleep(max(0.0, dies - began))
                raise EdgeFailure(SourceFailed, "remote disconnected mid-read (modelled death)")
            await anyio.sleep(duration)
        finally:
            links.active[remote] -= 1
        await super().read(remote, local, remote_blocks, **kwargs)
        return anyio.current_time() - began


def modelled_weights(tensors: int, tensor_bytes: int) -> dict[str, torch.Tensor]:
    return {f"layer.{i:03d}.weight": torch.full((tensor_bytes // 4,), float(i)) for i in range(tensors)}


async def modelled_load(
    stripe: int, links: Links, sources: int, *, die: str | None = None, die_after: float = 0.0
) -> dict[str, Any]:
    identity = ModelIdentity("model/16g")
    network = FakeRdmaNetwork()
    registry = FakeRegistry()
    ModelledAgent.links = links
    target_agent = ModelledAgent("target", network)
    links.active.clear()
    links.dies_at.clear()
    weights = modelled_weights(256, 64 << 10)  # 16 MiB real, 16 GB in the model
    async with anyio.create_task_group() as tg:
        for i in range(sources):
            sid = f"s{i}"
            agent = FakeRdmaAgent(sid, network)
            served = load_weights(identity, weights, "arena")
            await tg.start(WeightSource(registry, served, source_id=sid, agent=agent, poll_interval=0.05).run)
        order = {f"s{i}": float(i) for i in range(sources)}
        orchestrator = Orchestrator(
            registry,
            [RdmaRegion(agent=target_agent), RdmaTensor(agent=target_agent)],
            stripe=stripe,
            rank_window=0.02,
            selection=lambda _t: lambda c: (order.get(c.source_id, 99.0),),
            min_part_bytes=128 << 10,  # 128 MB in the model
            hedge=False,
        )
        target = Target("arena", verify=False)
        total = sum(t.numel() * 4 for t in weights.values())
        ideal = links.seconds("s0", total) if stripe == 1 else None
        began = anyio.current_time()
        if die is not None:  # the victim dies ``die_after`` model seconds into the load
            links.dies_at[die] = began + die_after * links.time_scale
        report = await orchestrator.load(identity, target)
        seconds = (anyio.current_time() - began) / links.time_scale
        await orchestrator.aclose()
        tg.cancel_scope.cancel()
    assert report.loaded, report.reason
    assert all(torch.equal(target.tensors()[n], t) for n, t in weights.items())
    data = report.to_dict()
    return {
        "stripe": stripe,
        "seconds": round(seconds, 3),
        "ideal_one_source_seconds": round(ideal, 3) if ideal is not None else None,
        "sources_used": len(data["sources"]),
        "parts": data["parts"],
        "reread_bytes_model": int((target.bytes_written - target.nbytes) * links.scale_bytes),
        "attempts": dict(Counter(a["outcome"] for a in data["attempts"])),
    }


def model(args: argparse.Namespace) -> dict[str, Any]:
    real_bytes = 256 * (64 << 10)
    links = Links(args.link_gbps * GB, args.target_links, 16e9 / real_bytes, args.time_scale)
    sweep = [anyio.run(modelled_load, k, links, max(args.model_stripes)) for k in args.model_stripes]
    k_max = max(args.model_stripes)
    base = sweep[0]["seconds"]
    for row in sweep:
        row["speedup_vs_k1"] = round(base / row["seconds"], 3)
        row["ideal_speedup"] = min(row["stripe"], args.target_links)
    healthy_1 = anyio.run(modelled_load, 1, links, 3)
    dead_1 = anyio.run(lambda: modelled_load(1, links, 3, die="s0", die_after=healthy_1["seconds"] / 2))
    healthy_3 = anyio.run(modelled_load, 3, links, 3)
    dead_3 = anyio.run(lambda: modelled_load(3, links, 3, die="s0", die_after=healthy_3["seconds"] / 2))
    return {
        "model_bytes": 16e9,
        "link_gbps": args.link_gbps,
        "target_links": args.target_links,
        "time_scale": args.time_scale,
        "sources": k_max,
        "sweep": sweep,
        "one_source_dies_at_50_percent": {
            "restart_from_zero_k1": {
                "healthy_seconds": healthy_1["seconds"],
                "seconds": dead_1["seconds"],
                "lost_seconds": round(dead_1["seconds"] - healthy_1["seconds"], 3),
                "attempts": dead_1["attempts"],
            },
            "striped_k3": {
                "healthy_seconds": healthy_3["seconds"],
                "seconds": dead_3["seconds"],
                "lost_seconds": round(dead_3["seconds"] - healthy_3["seconds"], 3),
                "attempts": dead_3["attempts"],
            },
        },
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    sweep = result["model"]["sweep"]
    ks = [r["stripe"] for r in sweep]
    left.plot(ks, [r["seconds"] for r in sweep], "o-", label="measured through the pipeline")
    base = sweep[0]["seconds"]
    left.plot(
        ks, [base / r["ideal_speedup"] for r in sweep], "--", label="1/K until the target's links saturate"
    )
    left.set_xlabel("stripe K (sources read at once)")
    left.set_ylabel("model seconds to load 16 GB")
    left.set_title(
        f"bandwidth model: {result['model']['link_gbps']} GB/s per source, {result['model']['target_links']} target links"
    )
    left.legend()
    if "measured" in result:
        runs = result["measured"]["runs"]
        right.bar([str(r["stripe"]) for r in runs], [r["seconds"] for r in runs])
        right.set_xlabel("stripe K")
        right.set_ylabel("seconds to load 1 GiB (loopback, this machine)")
        right.set_title("measured: real processes, one memory bus")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--stripes", default="1,2,3", help="K values of the measured part")
    parser.add_argument("--model-stripes", default="1,2,3,4,5,6")
    parser.add_argument("--link-gbps", type=float, default=12.5, help="one source's link (100 Gb/s NIC)")
    parser.add_argument("--target-links", type=int, default=4)
    parser.add_argument("--time-scale", type=float, default=0.5, help="real seconds per model second")
    parser.add_argument("--no-measured", action="store_true", help="the bandwidth model only")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--plot", type=Path, default=HERE / "results" / "striping.png")
    args = parser.parse_args()
    args.model_stripes = [int(k) for k in args.model_stripes.split(",")]
    configure_logging("warning")
    result: dict[str, Any] = {"bench": "striping"}
    if not args.no_measured:
        result["measured"] = measured(args.repeat, [int(k) for k in args.stripes.split(",")])
    result["model"] = model(args)
    if not args.no_plot:
        plot(result, args.plot)
        result["plot"] = str(args.plot)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
