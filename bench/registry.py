"""Benchmark: registry latency with 10,000 records, and rates with 1,000 concurrent clients.

Two parts for SQLite (embedded) and Redis side by side, one JSON object:

* ``sqlite`` / ``redis``: publishes 10,000 records (100 model identities x 100
  sources), then median latencies of listing one identity's READY sources (100
  records), listing everything, one publish, one heartbeat, one manifest fetch;
* ``concurrent``: a fleet's traffic from ``--clients`` (1,000) registry clients
  at once, each its own registry object (its own connection, as a process of a
  fleet has), against one model with 100 sources: every client loops list
  (evaluation) -> lease (a reader's add_load) -> give the lease back ->
  heartbeat (a source's) for ``--seconds``. Reports each operation's rate, p50
  and p99, and errors (a locked SQLite file past its busy timeout, a refused
  Redis connection).

Starts its own redis-server on a free loopback port (redis-server must be installed).

    python bench/registry.py [--records N] [--repeat N] [--clients N] [--seconds S]
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import anyio  # noqa: E402

from mx_orchestrator import ModelIdentity  # noqa: E402
from mx_orchestrator.logs import configure_logging  # noqa: E402
from mx_orchestrator.registry import open_registry  # noqa: E402
from mx_orchestrator.testing import make_manifest, make_record  # noqa: E402


async def timed(fn: Callable[[], Awaitable[Any]], repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        began = time.perf_counter()
        await fn()
        samples.append(time.perf_counter() - began)
    return statistics.median(samples) * 1e3


async def measure(url: str, records: int, repeat: int) -> dict[str, Any]:
    registry = open_registry(url)
    identities = [ModelIdentity(f"bench/model-{i}") for i in range(max(1, records // 100))]
    manifest = make_manifest(identities[0], 8)
    began = time.perf_counter()
    published = []
    for i in range(records):
        identity = identities[i % len(identities)]
        record = make_record(identity, f"src-{i:05d}", ttl=3600)
        await registry.publish(record, manifest)
        published.append(record)
    fill = time.perf_counter() - began
    one = identities[0]
    listed = await registry.list(one.key)
    probe = published[0]
    result = {
        "records": records,
        "fill_s": round(fill, 2),
        "list_one_identity_ms": round(await timed(lambda: registry.list(one.key), repeat), 3),
        "list_one_identity_count": len(listed),
        "list_all_ms": round(await timed(lambda: registry.list(None, None), max(3, repeat // 5)), 3),
        "publish_ms": round(
            await timed(lambda: registry.publish(make_record(one, "extra", ttl=3600), manifest), repeat), 3
        ),
        "heartbeat_ms": round(
            await timed(lambda: registry.heartbeat(probe.source_id, probe.generation), repeat), 3
        ),
        "get_manifest_ms": round(
            await timed(lambda: registry.get_manifest(probe.source_id, probe.generation), repeat), 3
        ),
    }
    await registry.aclose()
    return result


async def concurrent(url: str, clients: int, seconds: float) -> dict[str, Any]:
    """``clients`` registry objects at once, each looping list -> lease -> release -> heartbeat."""
    from mx_orchestrator.errors import RegistryError

    identity = ModelIdentity("bench/fleet")
    manifest = make_manifest(identity, 291)
    setup = open_registry(url)
    sources = [make_record(identity, f"src-{i:03d}", ttl=3600) for i in range(100)]
    for record in sources:
        await setup.publish(record, manifest)
    await setup.aclose()
    registries = [open_registry(url) for _ in range(clients)]
    latencies: dict[str, list[float]] = {"list": [], "lease": [], "release": [], "heartbeat": []}
    errors: dict[str, int] = dict.fromkeys(latencies, 0)
    stop = time.perf_counter() + seconds

    async def client(i: int) -> None:
        registry = registries[i]
        source = sources[i % len(sources)]
        reader = f"target-{i}"
        calls = (
            ("list", lambda: registry.list(identity.key)),
            ("lease", lambda: registry.lease_reader(source.source_id, source.generation, reader, 30.0)),
            ("release", lambda: registry.lease_reader(source.source_id, source.generation, reader, None)),
            ("heartbeat", lambda: registry.heartbeat(source.source_id, source.generation)),
        )
        while time.perf_counter() < stop:
            for name, call in calls:
                began = time.perf_counter()
                try:
                    await call()
                except (RegistryError, OSError):
                    errors[name] += 1
                    continue
                latencies[name].append(time.perf_counter() - began)

    began, cpu = time.perf_counter(), time.process_time()
    async with anyio.create_task_group() as tg:
        for i in range(clients):
            tg.start_soon(client, i)
    wall, cpu = time.perf_counter() - began, time.process_time() - cpu
    for registry in registries:
        await registry.aclose()

    def quantile(samples: list[float], q: float) -> float:
        return round(sorted(samples)[int(q * (len(samples) - 1))] * 1e3, 2) if samples else float("nan")

    return {
        "clients": clients,
        "sources": len(sources),
        "seconds": round(wall, 2),
        # close to "seconds": this one process (every client's decoding) was the bottleneck, not the server
        "client_cpu_seconds": round(cpu, 2),
        "records_decoded_per_second": round(len(latencies["list"]) * len(sources) / wall),
        "ops": {
            name: {
                "per_second": round(len(samples) / wall, 1),
                "p50_ms": quantile(samples, 0.5),
                "p99_ms": quantile(samples, 0.99),
                "errors": errors[name],
            }
            for name, samples in latencies.items()
        },
    }


def start_redis() -> tuple[subprocess.Popen[bytes], str]:
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("redis-server is not installed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    return proc, f"redis://127.0.0.1:{port}/0"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    configure_logging("warning")
    out: dict[str, Any] = {"benchmark": "registry", "date": time.strftime("%Y-%m-%d"), "concurrent": {}}
    with tempfile.TemporaryDirectory() as tmp:
        out["sqlite"] = anyio.run(measure, f"sqlite://{tmp}/registry.db", args.records, args.repeat)
        out["concurrent"]["sqlite"] = anyio.run(
            concurrent, f"sqlite://{tmp}/fleet.db", args.clients, args.seconds
        )
    proc, url = start_redis()
    try:
        out["redis"] = anyio.run(measure, url, args.records, args.repeat)
        out["concurrent"]["redis"] = anyio.run(
            concurrent, url.rsplit("/", 1)[0] + "/1", args.clients, args.seconds
        )
    finally:
        proc.terminate()
        proc.wait(10)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
