"""Registries under real conditions: several processes on one SQLite file, dead sources, a Redis outage."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest

from mx_orchestrator import ModelIdentity, Orchestrator, RegistryUnavailable, SourceState
from mx_orchestrator.outcomes import LayoutMismatch, ManifestMismatch
from mx_orchestrator.registry import open_registry
from mx_orchestrator.registry.redis import RedisRegistry
from mx_orchestrator.testing import (
    FakeRegistry,
    FakeStrategy,
    fail,
    make_manifest,
    make_record,
    scenario,
    succeed,
)
from mx_orchestrator.testing.peers import MODEL_ID, Peers

from .conftest import RedisServer

IDENTITY = ModelIdentity(MODEL_ID)

PUBLISHER = """
import anyio, sys
from mx_orchestrator import ModelIdentity
from mx_orchestrator.registry import open_registry
from mx_orchestrator.testing import make_manifest, make_record
async def main():
    reg = open_registry(sys.argv[1]); ident = ModelIdentity("acme/shared")
    for i in range(40):
        r = make_record(ident, f"{sys.argv[2]}-{i}")
        await reg.publish(r, make_manifest(ident, 2))
        for k in range(i % 3):
            await reg.lease_reader(r.source_id, r.generation, f"reader-{k}", 60)
    await reg.aclose()
anyio.run(main)
"""


@pytest.mark.faults
def test_one_sqlite_file_shared_by_several_writer_processes(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path}/shared.db"
    procs = [
        subprocess.Popen([sys.executable, "-c", PUBLISHER, url, f"p{n}"], stderr=subprocess.PIPE)
        for n in range(4)
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()[-2000:]

    async def count() -> int:
        reg = open_registry(url)
        records = await reg.list(ModelIdentity("acme/shared").key)
        await reg.aclose()
        return len(records)

    assert anyio.run(count) == 160


@pytest.mark.faults
@pytest.mark.nixl
@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_a_sigkilled_source_leaves_ready_listings_within_its_ttl(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = f"sqlite://{tmp_path}/r.db" if backend == "sqlite" else request.getfixturevalue("redis_url")
    ttl = 3.0

    async def ready_ids() -> list[str]:
        reg = open_registry(url)
        try:
            return [r.source_id for r in await reg.list(IDENTITY.key)]
        finally:
            await reg.aclose()

    with Peers(url) as peers:
        (victim,) = peers.start(("victim", "arena"), ttl=ttl)
        assert anyio.run(ready_ids) == ["victim"]
        victim.kill()
        killed_at = time.monotonic()
        while "victim" in anyio.run(ready_ids):
            assert time.monotonic() - killed_at < ttl + 1.5, "still READY well past its TTL"
            time.sleep(0.2)
    assert time.monotonic() - killed_at >= ttl - 1.5  # it stayed while its TTL said so


@pytest.mark.faults
async def test_redis_outage_is_typed_and_publishing_resumes_after_restart(
    redis_server: RedisServer, redis_url: str
) -> None:
    reg = RedisRegistry.from_url(redis_url)
    first = make_record(IDENTITY, "before")
    await reg.publish(first, make_manifest(IDENTITY))
    redis_server.stop()
    try:
        with pytest.raises(RegistryUnavailable):
            await reg.list(IDENTITY.key)
        with pytest.raises(RegistryUnavailable):
            await reg.publish(make_record(IDENTITY, "during"))
        # a load whose registry is down gets typed probe failures and still reaches the hub
        hub = FakeStrategy("hf_download", {None: [succeed()]}, uses_peers=False)
        peer = FakeStrategy("rdma_region", default=succeed())
        report = await Orchestrator(reg, [peer, hub]).load(IDENTITY)
        assert report.loaded and report.final is not None and report.final.strategy == "hf_download"
        assert report.registry_error is not None and "unreachable" in report.registry_error
    finally:
        redis_server.start()
    after = make_record(IDENTITY, "after")
    await reg.publish(after, make_manifest(IDENTITY))
    assert [r.source_id for r in await reg.list(IDENTITY.key)] == ["after"]
    await reg.aclose()


@pytest.mark.faults
async def test_mismatches_never_reach_mark_stale_end_to_end() -> None:
    registry, prober = await scenario(IDENTITY, ["layout", "manifest", "good"])
    order = {"layout": 0.0, "manifest": 1.0, "good": 2.0}
    strategy = FakeStrategy(
        "rdma_region",
        {"layout": [fail(LayoutMismatch)], "manifest": [fail(ManifestMismatch)], "good": [succeed()]},
    )
    report = await Orchestrator(
        registry, [strategy], prober=prober, selection=lambda _t: lambda c: (order[c.source_id],)
    ).load(IDENTITY)
    assert report.loaded
    assert [op for op, _ in registry.calls if op == "mark_stale"] == []
    assert (
        registry.state_of("layout") is SourceState.READY
        and registry.state_of("manifest") is SourceState.READY
    )


async def test_load_accounting_is_visible_during_an_attempt_and_released_after() -> None:
    registry = FakeRegistry()
    record = make_record(IDENTITY, "busy")
    await registry.publish(record, make_manifest(IDENTITY))
    seen: list[int] = []

    class Peek:
        name = "rdma_region"
        uses_peers = True

        async def attempt(self, ctx):  # type: ignore[no-untyped-def]
            current = await registry.get("busy")
            assert current is not None
            seen.append(current.load)
            from mx_orchestrator import Loaded

            return Loaded(strategy=self.name, source_id=ctx.source_id)

    assert (await Orchestrator(registry, [Peek()]).load(IDENTITY)).loaded
    after = await registry.get("busy")
    assert seen == [1] and after is not None and after.load == 0
