"""Benchmark: registry latency with 10,000 records, SQLite (embedded) and Redis side by side.

Publishes 10,000 records (100 model identities x 100 sources), then measures
median latencies of listing one identity's READY sources (100 records), listing
everything, one publish and one heartbeat. Starts its own redis-server on a free
loopback port (redis-server must be installed). Prints one JSON object.

    python bench/registry.py [--records N] [--repeat N]
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
    args = parser.parse_args()
    configure_logging("warning")
    out: dict[str, Any] = {"benchmark": "registry", "date": time.strftime("%Y-%m-%d")}
    with tempfile.TemporaryDirectory() as tmp:
        out["sqlite"] = anyio.run(measure, f"sqlite://{tmp}/registry.db", args.records, args.repeat)
    proc, url = start_redis()
    try:
        out["redis"] = anyio.run(measure, url, args.records, args.repeat)
    finally:
        proc.terminate()
        proc.wait(10)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
