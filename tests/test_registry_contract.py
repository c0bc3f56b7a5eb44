"""One contract, every registry backend: publish, list, heartbeat TTL, ejection cool-down, generations."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path

import pytest
import pytest_asyncio

from mx_orchestrator import ModelIdentity, SourceRegistry, SourceState
from mx_orchestrator.registry import EjectionPolicy, MemoryRegistry
from mx_orchestrator.registry.redis import RedisRegistry
from mx_orchestrator.registry.sqlite import SqliteRegistry
from mx_orchestrator.testing import make_manifest, make_record


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


BACKENDS: dict[str, Callable[[Path, Clock], SourceRegistry]] = {
    "memory": lambda _p, clock: MemoryRegistry(ejection=EjectionPolicy(10, 25), clock=clock),
    "sqlite": lambda p, clock: SqliteRegistry(p / "reg.db", ejection=EjectionPolicy(10, 25), clock=clock),
}


@pytest.fixture
def clock() -> Clock:
    return Clock()


async def open_backend(
    name: str, request: pytest.FixtureRequest, tmp_path: Path, clock: Clock
) -> SourceRegistry:
    if name in ("redis", "redis-tls-acl"):
        url = request.getfixturevalue("redis_url" if name == "redis" else "secure_redis_url")
        return RedisRegistry.from_url(url, ejection=EjectionPolicy(10, 25), clock=clock)
    return BACKENDS[name](tmp_path, clock)


@pytest_asyncio.fixture(params=["memory", "sqlite", "redis", "redis-tls-acl"])
async def registry(
    request: pytest.FixtureRequest, tmp_path: Path, clock: Clock
) -> AsyncIterator[SourceRegistry]:
    reg = await open_backend(request.param, request, tmp_path, clock)
    yield reg
    await reg.aclose()


@pytest_asyncio.fixture(params=["sqlite", "redis"])
async def stored_registry(
    request: pytest.FixtureRequest, tmp_path: Path, clock: Clock
) -> AsyncIterator[SourceRegistry]:
    """Backends that store serialised records (which a buggy or hostile writer could garble)."""
    reg = await open_backend(request.param, request, tmp_path, clock)
    yield reg
    await reg.aclose()


def rec(identity: ModelIdentity, sid: str, clock: Clock, ttl: float = 15.0):  # type: ignore[no-untyped-def]
    return replace(make_record(identity, sid, ttl=ttl), heartbeat_at=clock.now)


async def test_publish_list_and_manifest_round_trip(
    registry: SourceRegistry, identity: ModelIdentity, clock: Clock
) -> None:
    manifest = make_manifest(identity, 3)
    a = rec(identity, "a", clock)
    await registry.publish(a, manifest)
    await registry.publish(rec(ModelIdentity("other/model"), "x", clock))
    listed = await registry.list(identity.key)
    assert [r.source_id for r in listed] == ["a"]
    assert await registry.get_manifest("a", a.generation) == manifest
    assert await registry.get_manifest("a", "another-generation") is None


async def test_expired_heartbeat_drops_out_of_ready_listings(
    registry: SourceRegistry, identity: ModelIdentity, clock: Clock
) -> None:
    a = rec(identity, "a", clock, ttl=5)
    await registry.publish(a)
    clock.now += 4
    assert len(await registry.list(identity.key)) == 1
    clock.now += 2
    assert await registry.list(identity.key) == []
    assert await registry.heartbeat("a", a.generation) is not None
    assert len(await registry.list(identity.key)) == 1


async def test_ejection_cooldown_grows_and_heartbeat_cannot_undo_it_early(
    registry: SourceRegistry, identity: ModelIdentity, clock: Clock
) -> None:
    a = rec(identity, "a", clock, ttl=1000)
    await registry.publish(a)
    assert await registry.mark_stale("a", a.generation, reason="SourceFailed", reporter="t1")
    await registry.heartbeat("a", a.generation)
    assert await registry.list(identity.key) == []
    clock.now += 10  # base cool-down 10 s x 1
    await registry.heartbeat("a", a.generation)
    assert len(await registry.list(identity.key)) == 1
    await registry.mark_stale("a", a.generation, reason="TimedOut", reporter="t1")
    clock.now += 10
    await registry.heartbeat("a", a.generation)
    assert await registry.list(identity.key) == [], "second ejection lasts 20 s"
    clock.now += 10
    await registry.heartbeat("a", a.generation)
    listed = await registry.list(identity.key)
    assert len(listed) == 1 and listed[0].times_ejected == 2
    for _ in range(3):
        await registry.mark_stale("a", a.generation, reason="x")
    record = await registry.get("a")
    assert record is not None and record.ejected_until - clock.now == 25, "capped at max_seconds"


async def test_restarted_source_with_new_generation_is_ready_at_once(
    registry: SourceRegistry, identity: ModelIdentity, clock: Clock
) -> None:
    old = rec(identity, "a", clock)
    await registry.publish(old, make_manifest(identity))
    await registry.mark_stale("a", old.generation, reason="SourceFailed")
    new = rec(identity, "a", clock)
    await registry.publish(new)
    listed = await registry.list(identity.key)
    assert [r.generation for r in listed] == [new.generation]
    assert await registry.get_manifest("a", old.generation) is None
    # a late report against the old generation does not eject the new one
    assert not await registry.mark_stale("a", old.generation, reason="late")
    assert len(await registry.list(identity.key)) == 1


async def test_list_by_state_and_remove(
    registry: SourceRegistry, identity: ModelIdentity, clock: Clock
) -> None:
    a, b = rec(identity, "a", clock), rec(identity, "b", clock)
    await registry.publish(a)
    await registry.publish(b)
    await registry.mark_stale("b", b.generation, reason="x")
    assert [r.source_id for r in await registry.list(identity.key, SourceState.STALE)] == ["b"]
    assert {r.source_id for r in await registry.list(identity.key, None)} == {"a", "b"}
    assert not await registry.remove("a", "wrong-generation")
    assert await registry.remove("a", a.generation)
    assert [r.source_id for r in await registry.list(None, None)] == ["b"]


async def test_heartbeat_of_another_generation_changes_nothing(
    registry: SourceRegistry, identity: ModelIdentity, clock: Clock
) -> None:
    a = rec(identity, "a", clock)
    await registry.publish(a)
    assert await registry.heartbeat("a", a.generation) is not None
    assert await registry.heartbeat("a", "wrong-generation") is None


async def test_reader_leases_count_as_load_and_run_out_unless_renewed(
    registry: SourceRegistry, identity: ModelIdentity, clock: Clock
) -> None:
    a = rec(identity, "a", clock)
    await registry.publish(a)
    await registry.lease_reader("a", a.generation, "t1/run", 10)
    await registry.lease_reader("a", a.generation, "t2/run", 2)
    await registry.lease_reader("a", a.generation, "t1/run", 10)  # a renewal is not a second reader
    assert (await registry.list(identity.key))[0].load == 2
    await registry.lease_reader("a", a.generation, "t1/run", None)  # given back
    await registry.lease_reader("a", a.generation, "never-held", None)  # giving back twice is harmless
    assert (await registry.list(identity.key))[0].load == 1
    clock.now += 3  # t2 crashed: it never renewed
    await registry.heartbeat("a", a.generation)
    record = (await registry.list(identity.key))[0]
    assert record.load == 0 and record.readers == {}
    await registry.lease_reader("a", "other-generation", "t3/run", 10)  # a previous life's lease: ignored
    assert (await registry.list(identity.key))[0].load == 0


async def test_one_call_gives_back_a_readers_leases_on_several_sources_and_nothing_else(
    registry: SourceRegistry, identity: ModelIdentity, clock: Clock
) -> None:
    """``release_readers``: what a load that ends does with its sessions' leases. Only that
    reader's, only on the named generation; a source gone meanwhile or never leased is harmless."""
    a, b, c = (rec(identity, sid, clock) for sid in "abc")
    for record in (a, b, c):
        await registry.publish(record)
        await registry.lease_reader(record.source_id, record.generation, "t1/run", 10)
    await registry.lease_reader("a", a.generation, "t2/run", 10)
    await registry.release_readers(
        "t1/run", [("a", a.generation), ("b", b.generation), ("c", "a-previous-life"), ("gone", "g")]
    )
    loads = {r.source_id: r.readers for r in await registry.list(identity.key)}
    assert set(loads["a"]) == {"t2/run"} and loads["b"] == {} and set(loads["c"]) == {"t1/run"}
    await registry.release_readers("t1/run", [])  # nothing to give back: nothing happens


@pytest.mark.faults
async def test_a_lease_is_bounded_by_the_source_and_an_expired_one_never_blocks_it(
    registry: SourceRegistry, identity: ModelIdentity, clock: Clock
) -> None:
    """A reader asking for 31 years (then dying) holds a ``max_readers=1`` source's slot for the
    source's own ``max_lease`` at most; NaN or negative asks end at once; once a lease ran out the
    listing shows the slot free with no write in between (a crashed reader never blocks a source)."""
    a = replace(rec(identity, "a", clock, ttl=120.0), max_readers=1, max_lease=30.0)
    await registry.publish(a)
    assert await registry.lease_reader("a", a.generation, "greedy/run", 1e9)
    (listed,) = await registry.list(identity.key)
    assert listed.load == 1 and listed.readers["greedy/run"] <= clock.now + 30.0
    assert not await registry.lease_reader("a", a.generation, "next/run", 10)  # full: refused
    clock.now += 30.5  # the greedy reader died: its lease ran out at the source's bound
    (listed,) = await registry.list(identity.key)
    assert listed.load == 0 and not listed.listed_full  # the listing alone shows it free
    assert await registry.lease_reader("a", a.generation, "next/run", 10)
    for nonsense in (float("nan"), -5.0, float("-inf")):
        assert await registry.lease_reader("a", a.generation, "next/run", None)
        assert await registry.lease_reader("a", a.generation, f"odd-{nonsense}", nonsense)
        assert (await registry.list(identity.key))[0].load == 0


@pytest.mark.faults
async def test_garbage_records_are_skipped_not_fatal(
    stored_registry: SourceRegistry, identity: ModelIdentity, clock: Clock
) -> None:
    registry = stored_registry
    good = rec(identity, "good", clock)
    await registry.publish(good)
    await registry.publish(rec(identity, "bad", clock))
    await _corrupt(registry, "bad")
    assert [r.source_id for r in await registry.list(identity.key)] == ["good"]


async def _corrupt(registry: SourceRegistry, source_id: str) -> None:
    if isinstance(registry, SqliteRegistry):
        import sqlite3

        db = sqlite3.connect(registry.path)
        db.execute(
            "UPDATE sources SET record=? WHERE source_id=?", ('{"source_id": 5, "state": "??"}', source_id)
        )
        db.commit()
        db.close()
    else:
        await registry._r.set(registry._k("src", source_id), "not json at all")  # type: ignore[attr-defined]


async def test_a_draining_source_is_not_offered_but_still_listed_as_draining(
    registry: SourceRegistry, identity: ModelIdentity, clock: Clock
) -> None:
    a = rec(identity, "a", clock)
    await registry.publish(a)
    await registry.lease_reader("a", a.generation, "reader", 30)
    drained = await registry.drain("a", a.generation)
    assert drained is not None and drained.state is SourceState.DRAINING and drained.load == 1
    assert await registry.list(identity.key) == []
    assert [r.source_id for r in await registry.list(identity.key, SourceState.DRAINING)] == ["a"]
    assert await registry.drain("a", "other-generation") is None


async def test_unreachable_reports_eject_at_the_threshold_not_before(
    registry: SourceRegistry, identity: ModelIdentity, clock: Clock
) -> None:
    a = rec(identity, "a", clock, ttl=1000)
    await registry.publish(a)
    assert not await registry.report_unreachable("a", a.generation, reason="connect refused", reporter="t1")
    assert not await registry.report_unreachable("a", a.generation, reason="connect refused", reporter="t2")
    assert len(await registry.list(identity.key)) == 1, "two reports are not enough"
    assert await registry.report_unreachable("a", a.generation, reason="connect refused", reporter="t3")
    assert await registry.list(identity.key) == []
    record = await registry.get("a")
    assert record is not None and record.state is SourceState.STALE and "unreachable" in record.stale_reason
    assert not await registry.report_unreachable("a", "old-generation", reason="late")


@pytest.mark.redis
async def test_a_wrong_password_or_no_tls_is_a_typed_registry_error(secure_redis_server: object) -> None:
    from mx_orchestrator import RegistryUnavailable

    from .conftest import RedisServer

    assert isinstance(secure_redis_server, RedisServer)
    wrong = RedisRegistry.from_url(secure_redis_server.url_with("mxo", "not-the-password"))
    plain = RedisRegistry.from_url(
        f"redis://mxo:{RedisServer.PASSWORD}@127.0.0.1:{secure_redis_server.port}/0"
    )
    for registry in (wrong, plain):
        with pytest.raises(RegistryUnavailable):
            await registry.list()
        await registry.aclose()


async def test_a_source_at_its_reader_cap_refuses_a_new_reader_but_renews_the_ones_it_has(
    registry: SourceRegistry, identity: ModelIdentity, clock: Clock
) -> None:
    a = replace(rec(identity, "a", clock), max_readers=2)
    await registry.publish(a)
    assert await registry.lease_reader("a", a.generation, "r1", 10)
    assert await registry.lease_reader("a", a.generation, "r2", 10)
    assert not await registry.lease_reader("a", a.generation, "r3", 10)  # full: refused, nothing written
    assert await registry.lease_reader("a", a.generation, "r1", 10)  # a renewal always passes
    assert (await registry.list(identity.key))[0].load == 2
    await registry.lease_reader("a", a.generation, "r2", None)
    assert await registry.lease_reader("a", a.generation, "r3", 10)  # room again
    clock.now += 11  # every lease ran out: a crashed reader frees its seat on its own
    assert await registry.lease_reader("a", a.generation, "r4", 10)


async def test_a_manifest_shared_by_many_sources_is_stored_once_and_goes_with_the_last(
    registry: SourceRegistry, identity: ModelIdentity, clock: Clock
) -> None:
    """Content-addressed manifests: records name one stored copy; a new generation with another
    manifest names the new one; the copy goes when no record names it (Redis: it expires)."""
    manifest = make_manifest(identity, 5)
    records = [rec(identity, f"s{i}", clock) for i in range(5)]
    for record in records:
        await registry.publish(record, manifest)
    listed = await registry.list(identity.key)
    assert {r.manifest_key for r in listed} == {manifest.stored.key}
    assert await registry.manifests_stored() == 1  # type: ignore[attr-defined]
    assert await registry.get_manifest_blob(manifest.stored.key) == manifest.stored.blob
    for record in records:
        assert await registry.get_manifest(record.source_id, record.generation) == manifest
    # a heartbeat or a re-publish without a manifest keeps the one the generation has
    await registry.heartbeat("s0", records[0].generation)
    await registry.publish(records[0])
    assert await registry.get_manifest("s0", records[0].generation) == manifest
    # s0 restarts serving other weights: the shared copy stays for the others
    other = make_manifest(identity, 6)
    await registry.publish(rec(identity, "s0", clock), other)
    assert await registry.manifests_stored() == 2  # type: ignore[attr-defined]
    for record in records[1:]:
        assert await registry.remove(record.source_id)
    if not isinstance(registry, RedisRegistry):
        assert await registry.manifests_stored() == 1  # type: ignore[attr-defined]
        assert await registry.get_manifest_blob(manifest.stored.key) is None


async def test_a_stored_manifest_that_does_not_hash_to_its_key_is_a_typed_error(
    stored_registry: SourceRegistry, identity: ModelIdentity, clock: Clock
) -> None:
    """A registry writer cannot swap the manifest under a key: the bytes are checked against it."""
    from mx_orchestrator.errors import ManifestError

    registry = stored_registry
    manifest = make_manifest(identity, 3)
    record = rec(identity, "a", clock)
    await registry.publish(record, manifest)
    forged = make_manifest(identity, 4).stored.blob
    key = manifest.stored.key
    if isinstance(registry, SqliteRegistry):
        import sqlite3

        db = sqlite3.connect(registry.path)
        db.execute("UPDATE manifest_blobs SET blob=? WHERE key=?", (forged, key))
        db.commit()
        db.close()
    else:
        await registry._b.set(registry._k("mblob", key), forged)  # type: ignore[attr-defined]
    with pytest.raises(ManifestError, match="does not hash to its key"):
        await registry.get_manifest("a", record.generation)


async def test_a_redis_key_expiry_floor_keeps_keys_on_the_server_while_the_clock_judges_the_record(
    redis_url: str, identity: ModelIdentity, clock: Clock
) -> None:
    """``key_expiry_floor`` (a registry on a virtual clock): the server keeps a record's key for at
    least that many real seconds, whatever its TTL; whether it is listed is still the clock's call."""
    registry = RedisRegistry.from_url(redis_url, clock=clock, key_expiry_floor=600, prefix="floor:")
    try:
        a = rec(identity, "a", clock, ttl=2.0)
        await registry.publish(a)
        assert 590 <= await registry._r.ttl("floor:src:a") <= 600
        clock.now += 5  # past its TTL by the clock: not listed, though the server still holds the key
        assert await registry.list(identity.key) == []
        assert await registry.get("a") is not None
    finally:
        await registry.aclose()
