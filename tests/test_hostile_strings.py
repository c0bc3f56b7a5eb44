"""Untrusted strings never reach the terminal raw: markup shows as text, control characters are escaped or refused."""

from __future__ import annotations

import json
import time
from pathlib import Path

import anyio
import pytest

from mx_orchestrator import ManifestError, ModelIdentity
from mx_orchestrator.models import SourceRecord, SourceState, TensorSpec
from mx_orchestrator.registry.sqlite import SqliteRegistry
from mx_orchestrator.testing import make_manifest
from tests.conftest import Mxo

IDENTITY = ModelIdentity("acme/hostile")
MARKUP = "[bold red]trusted-seed[/bold red]"
ANSI = "\x1b[2J\x1b[31mall clear\x1b[0m"


@pytest.fixture
def hostile_registry(tmp_path: Path) -> str:
    """A registry holding a record named in rich markup, READY with garbage connection data, and a STALE
    one whose reason carries ANSI escapes."""
    url = f"sqlite://{tmp_path}/r.db"

    async def fill() -> None:
        registry = SqliteRegistry(url.removeprefix("sqlite://"))
        now = time.time()
        for sid, state, reason in ((MARKUP, SourceState.READY, ""), ("stale-one", SourceState.STALE, ANSI)):
            record = SourceRecord(
                source_id=sid,
                identity_key=IDENTITY.key,
                generation=f"gen-{sid[:3]}",
                heartbeat_at=now,
                ttl=600,
                state=state,
                stale_reason=reason,
                transport={
                    "nixl_agent": "x",
                    "nixl_metadata": "Z2FyYmFnZQ==",
                    "nixl_regions": "[[4096, 1024, 0]]",
                },
            )
            await registry.publish(record, make_manifest(IDENTITY, [("w", "U8", (1024,))]))
            if state is SourceState.STALE:
                await registry.mark_stale(sid, record.generation, reason=reason, reporter="a target")
        await registry.aclose()

    anyio.run(fill)
    return url


def test_sources_table_shows_markup_literally_and_no_escape_byte(mxo: Mxo, hostile_registry: str) -> None:
    out = mxo("sources", "--registry", hostile_registry)
    assert out.returncode == 0, out.stderr
    assert "\x1b" not in out.stdout and "\x1b" not in out.stderr
    text = out.stdout
    assert MARKUP in text  # shown as written, not rendered as a red "trusted-seed"
    assert "\\x1b[2J" in text  # the reason's escapes shown escaped
    rows = json.loads(mxo("sources", "--registry", hostile_registry, "--json").stdout)
    assert {r["source_id"] for r in rows} == {MARKUP, "stale-one"}


def test_pull_table_json_and_logs_carry_no_escape_byte(mxo: Mxo, hostile_registry: str) -> None:
    common = ("pull", "--model-id", IDENTITY.model_id, "--registry", hostile_registry, "--timeout", "20")
    table = mxo(*common, "--log-level", "info")
    as_json = mxo(*common, "--json", "--log-level", "info")
    for out in (table, as_json):
        assert out.returncode == 1  # the garbage record cannot be read from
        assert "\x1b" not in out.stdout and "\x1b" not in out.stderr
    assert MARKUP in table.stdout
    report = json.loads(as_json.stdout)
    assert report["attempts"][0]["source"] == MARKUP


@pytest.mark.parametrize("name", ["w\x1b[31m", "w\nforged log line", "w\x00", "w\u202eevil"])
def test_tensor_names_with_control_characters_are_refused(name: str) -> None:
    with pytest.raises(ManifestError, match="control characters"):
        TensorSpec(name, "F32", (1,))


@pytest.mark.parametrize(
    "field,value",
    [("ttl", float("nan")), ("ttl", float("inf")), ("ttl", -1.0), ("ttl", 0.0), ("heartbeat_at", float("nan")),
     ("ejected_until", float("inf")), ("load", -1), ("times_ejected", 1 << 40), ("source_id", "a\x1bb")],
)  # fmt: skip
def test_records_with_bad_numbers_or_control_characters_are_refused_on_read(
    field: str, value: object
) -> None:
    data = SourceRecord("s", IDENTITY.key, "g", heartbeat_at=time.time()).to_dict()
    data[field] = value
    with pytest.raises(ManifestError):
        SourceRecord.from_dict(data)


def test_sqlite_registry_files_are_private_and_a_missing_directory_is_an_error(
    mxo: Mxo, tmp_path: Path
) -> None:
    import stat

    from mx_orchestrator import ConfigError
    from mx_orchestrator.registry import open_registry

    url = f"sqlite://{tmp_path}/r.db"

    async def touch() -> list[int]:
        registry = open_registry(url)
        await registry.list()
        modes = [stat.S_IMODE((tmp_path / n).stat().st_mode) for n in ("r.db", "r.db-wal", "r.db-shm")]
        await registry.aclose()
        return modes

    assert anyio.run(touch) == [0o600, 0o600, 0o600]
    with pytest.raises(ConfigError, match="no/such/dir"):
        open_registry(f"sqlite://{tmp_path}/no/such/dir/x.db")
    out = mxo("sources", "--registry", f"sqlite://{tmp_path}/no/such/dir/x.db")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.count("\n") == 1 and "does not exist" in out.stderr
    assert not (tmp_path / "no").exists()  # nothing was created


def test_the_default_registry_directory_is_created_private(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import stat

    from mx_orchestrator.registry import open_registry

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    async def touch() -> None:
        registry = open_registry("sqlite://")
        await registry.list()
        await registry.aclose()

    anyio.run(touch)
    (db,) = (tmp_path / "cache").rglob("registry.db")
    assert stat.S_IMODE(db.parent.stat().st_mode) == 0o700 and stat.S_IMODE(db.stat().st_mode) == 0o600
