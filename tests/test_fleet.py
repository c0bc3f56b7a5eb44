"""Fleets: the virtual clock, the bandwidth model, a simulated fleet over a real registry, and a real
fan-out on loopback (one seed admitting two readers, eight republishing pulls started at once)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch

from mx_orchestrator import ModelIdentity
from mx_orchestrator.registry.sqlite import SqliteRegistry
from mx_orchestrator.testing import make_manifest, make_record, published_whole
from mx_orchestrator.testing.clock import VirtualClockLoop, accounted, virtual_wall_clock
from mx_orchestrator.testing.fleet import Fabric, FleetConfig, FleetSimulation, SourceDied
from mx_orchestrator.testing.peers import Peers

GB = 10**9


def on_virtual_time(main: Callable[[], Awaitable[Any]]) -> Any:
    return anyio.run(main, backend="asyncio", backend_options={"loop_factory": VirtualClockLoop})


def test_virtual_time_stands_still_while_a_registry_call_is_in_flight_and_jumps_otherwise(
    tmp_path: Path,
) -> None:
    """A slow real call (a worker thread holding SQLite for 0.3 s) takes no virtual time even with a
    timer due meanwhile; an hour of sleeping takes no real time."""

    class Slow:
        async def call(self) -> float:
            began = anyio.current_time()
            await anyio.to_thread.run_sync(time.sleep, 0.3)
            return anyio.current_time() - began

    async def main() -> None:
        slow = accounted(Slow())
        woke: list[float] = []

        async def timer() -> None:
            await anyio.sleep(0.01)
            woke.append(anyio.current_time())

        began_real = time.perf_counter()
        async with anyio.create_task_group() as tg:
            tg.start_soon(timer)
            assert await slow.call() == 0.0  # virtual time did not move during the real call
        assert woke and woke[0] >= 0.01
        began = anyio.current_time()
        await anyio.sleep(3600)
        assert anyio.current_time() - began == 3600
        assert time.perf_counter() - began_real < 5
        # registries on the virtual wall clock: a record heartbeats and expires in simulated time
        registry = accounted(SqliteRegistry(tmp_path / "r.db", clock=virtual_wall_clock))
        identity = ModelIdentity("org/m")
        record = make_record(identity, "s", ttl=10)
        await registry.publish(record, make_manifest(identity))
        assert [r.source_id for r in await registry.list(identity.key)] == ["s"]
        await anyio.sleep(11)
        assert await registry.list(identity.key) == []
        await registry.aclose()

    on_virtual_time(main)


def test_a_source_link_is_shared_by_its_readers_and_a_killed_source_fails_its_flows() -> None:
    async def main() -> None:
        fabric = Fabric(source_bps=10 * GB, target_bps=100 * GB, hub_bps=1 * GB)
        ends: dict[str, float] = {}
        failed: list[str] = []

        async def read(target: str, source: str, nbytes: int) -> None:
            try:
                await fabric.transfer((f"src:{source}", f"tgt:{target}"), nbytes)
                ends[target] = anyio.current_time()
            except SourceDied:
                failed.append(target)

        async with anyio.create_task_group() as tg:
            tg.start_soon(fabric.run)
            async with anyio.create_task_group() as readers:
                for i in range(4):  # four readers share the 10 GB/s link: 40 GB in 4 s
                    readers.start_soon(read, f"t{i}", "a", 10 * GB)
                readers.start_soon(read, "doomed", "b", 10 * GB)
                await anyio.sleep(0.5)
                fabric.kill("b")
            tg.cancel_scope.cancel()
        assert sorted(ends) == ["t0", "t1", "t2", "t3"]
        assert all(abs(t - 4.0) < 1e-6 for t in ends.values())
        assert failed == ["doomed"] and fabric.peak_readers["a"] == 4
        assert abs(fabric.bytes_through["src:b"] - 5 * GB) < 1e3  # half of it moved before the kill

    on_virtual_time(main)


@pytest.mark.parametrize("mode", ["pipelined", "whole", "none"])
def test_a_simulated_fleet_loads_every_target_once_within_every_cap(tmp_path: Path, mode: str) -> None:
    """Forty targets, one seed admitting four readers, a real SQLite registry, sources failing 10 %
    of the time: all load every byte exactly once, no source carries more than four readers, none
    is blamed for being full. Fan-out once loaded is faster than one seed's link allows; pipelined
    fan-out (targets serve parts from their first landed one, rarest first) within twice one
    target's time alone, at a few registry calls a target."""
    fanout, pipelined = mode != "none", mode == "pipelined"
    config = FleetConfig(
        targets=40, fanout=fanout, pipelined=pipelined, stripe=3, reader_cap=4, fail_rate=0.1, seed=7
    )

    async def main() -> dict[str, Any]:
        registry = SqliteRegistry(tmp_path / "fleet.db", clock=virtual_wall_clock)
        try:
            return await FleetSimulation(config, accounted(registry)).run()
        finally:
            await registry.aclose()

    summary = on_virtual_time(main)
    assert summary["all_loaded"] and summary["loaded_twice"] == 0, summary
    assert summary["cap_held"] and summary["max_readers_per_source"] == 4
    assert summary["full_sources_marked_stale"] == 0 and summary["hub_bytes"] == 0
    one_seed = config.targets * config.model_bytes / config.link_bps  # the seed's link, divided
    alone = config.model_bytes / config.link_bps
    if mode == "pipelined":
        assert summary["partial_sources"] == 40
        # measured: 0.96-1.08 s = 1.5-1.7 x one target alone (fan-out once loaded: 7.5 s = 12 x)
        assert summary["seconds_to_all_loaded"] < 2 * alone
        # what the fleet cost the registry, per target (measured 5.0-5.3 + 1 lease calls, 2.2-2.4
        # listings): leases given back together, a refusal makes a listing, not a chain of refusals
        calls = summary["registry_calls_per_target"]
        assert calls["lease_reader"] + calls["release_readers"] <= 8 and calls["list"] <= 4
        assert calls["get_manifest_blob"] == 1.0
    elif mode == "whole":
        assert sum(v for k, v in summary["loaded_from_hops"].items() if k != "0") > 0
        assert summary["seconds_to_all_loaded"] < one_seed / 3
    else:
        assert summary["loaded_from_hops"] == {"0": 40}
        assert one_seed <= summary["seconds_to_all_loaded"] < one_seed * 1.2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert match is not None, text[-2000:]
    return float(match.group(1))


@pytest.fixture(scope="module")
def gigabyte_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1 GiB in 64 distinct tensors: a read holds its reader slot for about a second here (the
    target allocates, reads and checks it), long enough for the seed's two slots to be contended."""
    from mx_orchestrator.checkpoint import save_checkpoint

    directory = tmp_path_factory.mktemp("fleet-1g")
    base = torch.arange((16 << 20) // 4, dtype=torch.int32)
    save_checkpoint(
        {f"block.{i:02d}.weight": base * (2 * i + 1) + i for i in range(64)}, directory / "model.safetensors"
    )
    return directory


@pytest.mark.nixl
@pytest.mark.slow
@pytest.mark.usefixtures("no_nixl_leaks")
def test_eight_republishing_pulls_against_a_seed_admitting_two_fan_out(
    peers: Peers, registry_url: str, gigabyte_checkpoint: Path
) -> None:
    """Real processes on loopback: one seed with --max-readers 2 and eight `mxo pull --republish`
    started at the same moment (``--selection spare-seeds``: once copies exist, reads move onto
    them). All eight load the checkpoint's bytes (pinned: every tensor's SHA-256 checked against the
    checkpoint's fingerprint, copies included), the seed never had more than two readers at once
    (its own metrics), and at least three targets read from a republished one."""
    from mx_orchestrator.checkpoint import fingerprint_directory

    pin, _ = fingerprint_directory(gigabyte_checkpoint)
    model_id = "acme/fleet-1g"
    port = _free_port()
    (seed,) = peers.start(
        ("seed", "arena"), weights=gigabyte_checkpoint, model_id=model_id, ttl=60.0, max_readers=2,
        extra_args=("--metrics-port", str(port)),
    )  # fmt: skip
    env = dict(os.environ, MXO_LOG_LEVEL="warning", PYTHONUNBUFFERED="1")

    def pull(i: int) -> list[str]:
        return [sys.executable, "-m", "mx_orchestrator", "pull", "--model-id", model_id, "--registry",
                registry_url, "--timeout", "240", "--json", "--republish", "--source-id", f"copy-{i}",
                "--selection", "spare-seeds", "--expect", pin]  # fmt: skip

    pulls = [
        subprocess.Popen(
            pull(i), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True
        )
        for i in range(8)
    ]
    serving: set[int] = set()
    try:
        deadline = time.monotonic() + 300
        while len(serving) < len(pulls) and time.monotonic() < deadline:
            streams = {p.stderr.fileno(): i for i, p in enumerate(pulls) if i not in serving and p.stderr}
            assert all(pulls[i].poll() is None for i in streams.values()), "a pull exited before serving"
            ready, _, _ = select.select(list(streams), [], [], 0.5)
            for fd in ready:
                i = streams[fd]
                line = pulls[i].stderr.readline().decode(errors="replace")  # type: ignore[union-attr]
                if "serving as" in line:
                    serving.add(i)
        assert len(serving) == len(pulls), f"only {sorted(serving)} republished"
        # each serves from its first landed part; its report is out once it is whole
        _until_whole(registry_url, [f"copy-{i}" for i in range(len(pulls))], 300)
        peak = _metric(port, "mxo_source_readers_peak")
        assert _metric(port, "mxo_source_readers_cap") == 2
    finally:
        for p in pulls:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        outs = []
        for p in pulls:
            try:
                out, _ = p.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                out, _ = p.communicate()
            outs.append(out)
    reports = [json.loads(out) for out in outs]
    # a pinned load that lands is the checkpoint's bytes: each tensor's SHA-256 matched the pin; its
    # landed parts add up to the model exactly once (a hedge racing a part being checked once made it more)
    assert all(r["outcome"] == "loaded" and r["verified"] and r["bytes"] == 1 << 30 for r in reports), [
        (r["outcome"], r["bytes"]) for r in reports
    ]
    assert 1 <= peak <= 2, peak
    from_copies = [r for r in reports if (r["source_hops"] or 0) >= 1]
    print("loaded from:", sorted((r["source"], r["source_hops"]) for r in reports))
    assert len(from_copies) >= 3, [(r["source"], r["source_hops"]) for r in reports]
    assert seed.proc.poll() is None  # the seed served throughout


def test_every_wake_up_of_the_fabric_makes_progress_even_with_floating_point_crumbs() -> None:
    """Hundreds of 16 GB flows joining a shared link at odd moments for ten simulated minutes: each
    flow ends exactly once and the fabric wakes a bounded number of times (a flow left with a
    fraction of a byte once spun forever: its timer fired without the clock moving)."""

    async def main() -> None:
        fabric = Fabric(source_bps=25 * GB, target_bps=25 * GB, hub_bps=GB)
        done: list[int] = []

        async def read(i: int) -> None:
            await anyio.sleep(i * 0.371 + 600.0 * (i % 3 == 0))
            await fabric.transfer(("src:seed", f"tgt:{i}"), 16 * GB + i * 7)
            done.append(i)

        # a spinning fabric never lets virtual time move, so the watchdog counts real seconds
        loop = asyncio.get_running_loop()
        with anyio.CancelScope() as watchdog:
            timer = threading.Timer(60.0, lambda: loop.call_soon_threadsafe(watchdog.cancel))
            timer.start()
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(fabric.run)
                    async with anyio.create_task_group() as readers:
                        for i in range(300):
                            readers.start_soon(read, i)
                    tg.cancel_scope.cancel()
            finally:
                timer.cancel()
        assert not watchdog.cancelled_caught, (
            f"the fabric spun: {fabric.wakeups} wake-ups, {len(done)} flows done"
        )
        assert sorted(done) == list(range(300))
        assert fabric.wakeups <= 4 * 300

    on_virtual_time(main)


def test_a_backoff_sleep_inside_an_accounted_call_waits_on_virtual_time() -> None:
    """A registry that backs off (``anyio.sleep``) inside a call, as Redis does on a WATCH conflict:
    virtual time moves to the sleep's end (it waits for nothing real), and the call returns."""

    class BacksOff:
        async def call(self) -> float:
            began = anyio.current_time()
            await anyio.sleep(2.5)
            return anyio.current_time() - began

    async def main() -> None:
        began_real = time.perf_counter()
        with anyio.fail_after(60):  # virtual: a deadlock would end here instead of hanging
            assert await accounted(BacksOff()).call() == 2.5
        assert time.perf_counter() - began_real < 5
        loop = asyncio.get_running_loop()
        assert isinstance(loop, VirtualClockLoop) and loop.real_io_in_flight == 0

    on_virtual_time(main)


def _wait_for_line(proc: subprocess.Popen[bytes], needle: str, seconds: float) -> None:
    """Read ``proc``'s stderr until a line holds ``needle`` (the process must stay alive meanwhile)."""
    assert proc.stderr is not None
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"exited before {needle!r}"
        ready, _, _ = select.select([proc.stderr.fileno()], [], [], 0.5)
        if ready and needle in proc.stderr.readline().decode(errors="replace"):
            return
    raise AssertionError(f"no {needle!r} within {seconds}s")


def _until_whole(registry_url: str, source_ids: list[str], seconds: float) -> None:
    """Until every one of ``source_ids`` is published whole (its load ended)."""
    from mx_orchestrator.registry import open_registry

    async def main() -> None:
        registry = open_registry(registry_url)
        try:
            with anyio.fail_after(seconds):
                for source_id in source_ids:
                    await published_whole(registry, source_id, poll=0.2)
        finally:
            await registry.aclose()

    anyio.run(main)


def _stop(procs: list[subprocess.Popen[bytes]]) -> list[bytes]:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    outs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, _ = p.communicate()
        outs.append(out)
    return outs


def _landed_times(report: dict[str, Any]) -> list[float]:
    return sorted(a["ended_at"] for a in report["attempts"] if a["outcome"] == "Loaded")


@pytest.mark.nixl
@pytest.mark.slow
def test_a_chain_of_three_republishing_pulls_serves_parts_before_it_has_them_all(
    peers: Peers, registry_url: str, gigabyte_checkpoint: Path
) -> None:
    """Real processes on loopback, pinned: a seed admitting one reader (read at 0.05 GB/s, so that
    the load lasts longer than a process takes to start), then three `mxo pull
    --republish --max-readers 1 --stripe 1`, each started once the one before it is a partial source (its
    memory exists, nothing landed yet). Caps make a chain: target 1 holds the seed's only slot,
    target 2 can read only target 1, target 3 only target 2. Each target's first landed part ends
    before the previous target's last (the reports' unix timestamps): parts were served while
    their source was still loading. All three land the checkpoint's bytes (each tensor's tree digest
    checked against the checkpoint's pin) and end whole."""
    from mx_orchestrator.checkpoint import fingerprint_directory

    pin, _ = fingerprint_directory(gigabyte_checkpoint)
    model_id = "acme/chain-1g"
    peers.start(("seed", "arena"), weights=gigabyte_checkpoint, model_id=model_id, ttl=60.0, max_readers=1)
    env = dict(os.environ, MXO_LOG_LEVEL="warning", PYTHONUNBUFFERED="1")
    names = [f"chain-{i}" for i in (1, 2, 3)]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for name in names:
            command = [sys.executable, "-m", "mx_orchestrator", "pull", "--model-id", model_id,
                       "--registry", registry_url, "--timeout", "180", "--json", "--republish",
                       "--source-id", name, "--max-readers", "1", "--stripe", "1", "--expect", pin]  # fmt: skip
            if (
                name == "chain-1"
            ):  # the seed's link, throttled: 1 GiB in about twenty seconds, longer than two process start-ups
                command += ["--max-rate", "0.05"]
            procs.append(
                subprocess.Popen(
                    command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True
                )
            )
            _wait_for_line(procs[-1], f"serving as {name} (partial)", 120)
        _until_whole(registry_url, names, 240)
    finally:
        outs = _stop(procs)
    reports = [json.loads(out) for out in outs]
    for report in reports:
        assert report["outcome"] == "loaded" and report["verified"] and report["bytes"] == 1 << 30, report
    assert [r["sources"] for r in reports] == [["seed"], ["chain-1"], ["chain-2"]]
    times = [_landed_times(r) for r in reports]
    print(
        "first/last landed:", [(round(t[0] - times[0][0], 3), round(t[-1] - times[0][0], 3)) for t in times]
    )
    assert times[1][0] < times[0][-1], "target 2 landed nothing before target 1 had everything"
    assert times[2][0] < times[1][-1], "target 3 landed nothing before target 2 had everything"


def _has_reader(registry_url: str, source_id: str, seconds: float) -> None:
    """Until ``source_id``'s record shows a live reader lease."""
    from mx_orchestrator.registry import open_registry

    async def main() -> None:
        registry = open_registry(registry_url)
        try:
            with anyio.fail_after(seconds):
                while True:
                    record = await registry.get(source_id)
                    if record is not None and record.live_readers(time.time()) > 0:
                        return
                    await anyio.sleep(0.1)
        finally:
            await registry.aclose()

    anyio.run(main)


@pytest.mark.nixl
@pytest.mark.slow
def test_a_partial_source_killed_mid_way_costs_its_reader_only_the_part_in_flight(
    peers: Peers, registry_url: str, gigabyte_checkpoint: Path
) -> None:
    """Real processes, pinned: a seed admitting one reader; target 1 takes that slot (read at
    0.05 GB/s, its reader lease 2 s) and republishes; target 2 can only read target 1 and does,
    until target 1 is SIGKILLed mid-way. Target 2 finishes from the seed (once the dead reader's
    lease ran out), every tensor checked against the pin, and its landed parts add up to the model
    exactly once: nothing that landed was read twice."""
    from mx_orchestrator.checkpoint import fingerprint_directory

    pin, _ = fingerprint_directory(gigabyte_checkpoint)
    model_id = "acme/killed-1g"
    peers.start(("seed", "arena"), weights=gigabyte_checkpoint, model_id=model_id, ttl=60.0, max_readers=1)
    env = dict(os.environ, MXO_LOG_LEVEL="warning", PYTHONUNBUFFERED="1")
    base = [sys.executable, "-m", "mx_orchestrator", "pull", "--model-id", model_id, "--registry", registry_url,
            "--timeout", "180", "--json", "--expect", pin]  # fmt: skip
    doomed = [*base, "--republish", "--source-id", "doomed", "--max-readers", "1", "--max-rate", "0.05",
              "--reader-lease", "2"]  # fmt: skip
    first = subprocess.Popen(
        doomed, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True
    )
    second: subprocess.Popen[bytes] | None = None
    try:
        _wait_for_line(first, "serving as doomed (partial)", 120)
        second = subprocess.Popen(
            base, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True
        )
        _has_reader(registry_url, "doomed", 120)  # target 2 reads from it
        time.sleep(6.0)  # a few of its parts landed in target 2, most are still to come
        os.killpg(first.pid, signal.SIGKILL)
        out, err = second.communicate(timeout=180)
    finally:
        _stop([p for p in (first, second) if p is not None])
    assert second.returncode == 0, err.decode(errors="replace")[-3000:]
    report = json.loads(out)
    assert report["outcome"] == "loaded" and report["verified"] and report["bytes"] == 1 << 30, report
    by_source = report["bytes_by_source"]
    assert by_source.get("doomed", 0) > 0 and by_source.get("seed", 0) > 0, by_source
    landed = sum(a["bytes"] for a in report["attempts"] if a["outcome"] == "Loaded")
    assert landed == 1 << 30, f"{landed} bytes landed for a 1 GiB model: some were read twice"
    failed = [a for a in report["attempts"] if a["source"] == "doomed" and a["outcome"] != "Loaded"]
    assert failed and all(a["outcome"] in ("SourceFailed", "TimedOut", "SourceUnreachable") for a in failed)


@pytest.mark.nixl
@pytest.mark.slow
@pytest.mark.usefixtures("no_nixl_leaks")
def test_an_open_republishing_orchestrator_serves_a_loaded_module_to_a_pull_until_it_closes(
    peers: Peers, registry_url: str, gigabyte_checkpoint: Path
) -> None:
    """The embedded form of ``--republish``: ``load_module(..., orchestrator=o)`` inside ``async with
    Orchestrator(..., republish=True) as o`` fills a module in place, pinned, and the module's own
    memory is then a source (whole, one hop from the seed): with the seed gone, a `mxo pull` process
    loads every byte from it. Closing the orchestrator unpublishes it."""
    from mx_orchestrator import Orchestrator, load_module
    from mx_orchestrator.checkpoint import fingerprint_directory
    from mx_orchestrator.registry import open_registry
    from strategies.rdma_region import RdmaRegion
    from strategies.rdma_tensor import RdmaTensor

    pin, _ = fingerprint_directory(gigabyte_checkpoint)
    model_id = "acme/embedded-1g"
    (seed,) = peers.start(("seed", "arena"), weights=gigabyte_checkpoint, model_id=model_id, ttl=60.0)

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(
                torch.zeros((16 << 20) // 4, dtype=torch.int32), requires_grad=False
            )

    model = torch.nn.Module()
    model.block = torch.nn.ModuleDict({f"{i:02d}": Block() for i in range(64)})
    pull = [sys.executable, "-m", "mx_orchestrator", "pull", "--model-id", model_id, "--registry",
            registry_url, "--timeout", "120", "--json", "--expect", pin]  # fmt: skip

    async def main() -> tuple[dict[str, Any], Any, Any]:
        registry = open_registry(registry_url)
        try:
            async with Orchestrator(
                registry, [RdmaRegion(), RdmaTensor()], republish=True, expect=pin,
                max_part_bytes=64 << 20, serve_options={"source_id": "embedded", "ttl": 30.0},
            ) as orchestrator:  # fmt: skip
                report = await load_module(model, model_id, orchestrator=orchestrator)
                summary = report.to_dict()
                assert summary["verified"] and summary["sources"] == ["seed"], summary
                with anyio.fail_after(30):
                    record = await published_whole(registry, "embedded")
                await anyio.to_thread.run_sync(seed.terminate)
                pulled = await anyio.run_process(pull, check=False)
                assert pulled.returncode == 0, pulled.stderr.decode(errors="replace")[-3000:]
            return json.loads(pulled.stdout), record, await registry.get("embedded")
        finally:
            await registry.aclose()

    pulled, served, after = anyio.run(main)
    assert served.hops == 1 and not served.partial
    assert pulled["outcome"] == "loaded" and pulled["verified"] and pulled["sources"] == ["embedded"]
    assert pulled["bytes"] == 1 << 30
    base = torch.arange((16 << 20) // 4, dtype=torch.int32)
    assert all(torch.equal(model.block[f"{i:02d}"].weight, base * (2 * i + 1) + i) for i in range(64))
    assert after is None  # closing the orchestrator unpublished the module's memory
