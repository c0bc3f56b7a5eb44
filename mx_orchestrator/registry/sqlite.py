"""SQLite registry: the embedded default, shared by every process on one machine, no server.

WAL mode lets readers proceed while a writer commits; read-modify-write
operations run in ``BEGIN IMMEDIATE`` transactions so two processes ejecting
or heartbeating the same source cannot lose an update. Blocking calls run in a
worker thread, one at a time per database file in a process: registry objects
of one file share a lock, so a process with a thousand of them queues its
calls instead of a thousand connections busy-waiting on SQLite's write lock
(measured: 1,000 clients in one process got "database is locked" past the
5 s busy timeout; see ``bench/registry.py``).
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

import anyio

from ..errors import ConfigError, RegistryUnavailable
from ..models import Manifest, SourceRecord, SourceState
from .base import (
    Change,
    EjectionPolicy,
    RecordTransitions,
    apply_publish,
    as_listed,
    decode_record,
    encode_record,
    is_listed,
)

__all__ = ["SqliteRegistry", "default_registry_path"]

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sources (
    source_id    TEXT PRIMARY KEY,
    identity_key TEXT NOT NULL,
    generation   TEXT NOT NULL,
    record       TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS sources_by_identity ON sources(identity_key);
CREATE TABLE IF NOT EXISTS manifest_blobs (
    key  TEXT PRIMARY KEY,
    blob BLOB NOT NULL
);
"""
# files made before manifests were content-addressed: their per-source manifests are not read
_MIGRATIONS = (("manifest_key", "ALTER TABLE sources ADD COLUMN manifest_key TEXT NOT NULL DEFAULT ''"),)


def _prepare(conn: sqlite3.Connection) -> None:
    """WAL, the schema and its migrations: each step idempotent, so it may run again after a race."""
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.executescript(_SCHEMA)
    for column, statement in _MIGRATIONS:
        if column not in _columns(conn):
            try:
                conn.execute(statement)
            except sqlite3.OperationalError:
                if column not in _columns(conn):  # not another process migrating it first
                    raise
    conn.execute("CREATE INDEX IF NOT EXISTS sources_by_manifest ON sources(manifest_key)")


def _columns(conn: sqlite3.Connection) -> set[str]:
    return {row[1] for row in conn.execute("PRAGMA table_info(sources)")}


def default_registry_path() -> Path:
    from platformdirs import user_cache_path

    return user_cache_path("mx_orchestrator") / "registry.db"


_FILE_LOCKS: dict[Path, threading.Lock] = {}
_FILE_LOCKS_GUARD = threading.Lock()


def _lock_for(path: Path) -> threading.Lock:
    """The one lock of this process for the database file at ``path``."""
    key = path.resolve()
    with _FILE_LOCKS_GUARD:
        return _FILE_LOCKS.setdefault(key, threading.Lock())


class SqliteRegistry(RecordTransitions):
    def __init__(
        self,
        path: str | Path,
        *,
        ejection: EjectionPolicy | None = None,
        clock: Callable[[], float] = time.time,
        busy_timeout: float = 5.0,
        create_parent: bool = False,
    ) -> None:
        self.path = Path(path)
        self._create_parent = create_parent
        self._ejection = ejection or EjectionPolicy()
        self._clock = clock
        self._busy_timeout = busy_timeout
        self._conn: sqlite3.Connection | None = None
        self._lock = _lock_for(self.path)
        self._limiter = anyio.CapacityLimiter(1)

    @classmethod
    def from_url(cls, url: str) -> SqliteRegistry:
        """``sqlite://``: the default file (directory made, 0700); an explicit path's directory must exist."""
        path = url.removeprefix("sqlite://")
        if not path or path == "/":
            return cls(default_registry_path(), create_parent=True)
        if not path.startswith("/"):
            raise ConfigError(f"sqlite registry URL needs an absolute path (sqlite:///path), got {url!r}")
        if not Path(path).parent.is_dir():
            raise ConfigError(f"sqlite registry {path}: the directory {Path(path).parent} does not exist")
        return cls(path)

    # -- plumbing -------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            # the registry says where every source's memory can be read: readable by its user alone
            if self._create_parent:
                self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # (SQLite gives its -wal and -shm files the mode of the database file)
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
            if self.path.stat().st_uid == os.getuid():
                self.path.chmod(0o600)
            conn = sqlite3.connect(
                self.path, timeout=self._busy_timeout, isolation_level=None, check_same_thread=False
            )
            # processes opening one new file at once race to switch it to WAL and to create the
            # schema; the switch does not wait on SQLite's busy handler: every step is idempotent,
            # so a step that found the file busy is tried again, within the busy timeout
            deadline = time.monotonic() + self._busy_timeout
            while True:
                try:
                    _prepare(conn)
                    break
                except sqlite3.OperationalError:
                    if time.monotonic() >= deadline:
                        conn.close()
                        raise
                    time.sleep(0.02)
            self._conn = conn
        return self._conn

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            with self._lock:
                try:
                    return fn(self._connect())
                except (sqlite3.Error, OSError) as exc:
                    raise RegistryUnavailable(f"sqlite registry {self.path}: {exc}") from exc

        return await anyio.to_thread.run_sync(call, limiter=self._limiter)

    @staticmethod
    def _update(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(conn)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return result

    def _load(self, conn: sqlite3.Connection, source_id: str) -> SourceRecord | None:
        row = conn.execute("SELECT record FROM sources WHERE source_id=?", (source_id,)).fetchone()
        return decode_record(row[0]) if row else None

    @staticmethod
    def _store(conn: sqlite3.Connection, record: SourceRecord) -> None:
        conn.execute(
            "INSERT OR REPLACE INTO sources(source_id, identity_key, generation, record, manifest_key) "
            "VALUES (?,?,?,?,?)",
            (
                record.source_id,
                record.identity_key,
                record.generation,
                encode_record(record),
                record.manifest_key,
            ),
        )

    @staticmethod
    def _collect(conn: sqlite3.Connection, key: str) -> None:
        """Drop a stored manifest no record names any more."""
        if key:
            conn.execute(
                "DELETE FROM manifest_blobs WHERE key=? AND NOT EXISTS "
                "(SELECT 1 FROM sources WHERE manifest_key=?)",
                (key, key),
            )

    async def manifests_stored(self) -> int:
        """How many manifests the file holds (one per distinct manifest, not per source)."""
        return await self._run(
            lambda conn: int(conn.execute("SELECT COUNT(*) FROM manifest_blobs").fetchone()[0])
        )

    # -- contract -------------------------------------------------------------

    async def publish(self, record: SourceRecord, manifest: Manifest | None = None) -> None:
        now = self._clock()
        stored = manifest.stored if manifest is not None else None

        def tx(conn: sqlite3.Connection) -> None:
            previous = self._load(conn, record.source_id)
            if stored is not None:
                conn.execute(
                    "INSERT OR IGNORE INTO manifest_blobs(key, blob) VALUES (?,?)", (stored.key, stored.blob)
                )
            self._store(conn, apply_publish(previous, record, now, stored))
            if previous is not None:
                self._collect(conn, previous.manifest_key)

        await self._run(lambda conn: self._update(conn, tx))

    async def _change_each(self, changes: Mapping[str, Change]) -> dict[str, SourceRecord | None]:
        def tx(conn: sqlite3.Connection) -> dict[str, SourceRecord | None]:
            written: dict[str, SourceRecord | None] = {}
            for source_id, change in changes.items():
                written[source_id] = updated = change(self._load(conn, source_id))
                if updated is not None:
                    self._store(conn, updated)
            return written

        return await self._run(lambda conn: self._update(conn, tx))

    async def list(
        self, identity_key: str | None = None, state: SourceState | None = SourceState.READY
    ) -> list[SourceRecord]:
        now = self._clock()

        def query(conn: sqlite3.Connection) -> list[SourceRecord]:
            if identity_key is None:
                rows = conn.execute("SELECT record FROM sources").fetchall()
            else:
                rows = conn.execute(
                    "SELECT record FROM sources WHERE identity_key=?", (identity_key,)
                ).fetchall()
            records = (decode_record(row[0]) for row in rows)
            return [as_listed(r, now) for r in records if r is not None and is_listed(r, now, state)]

        return await self._run(query)

    async def get(self, source_id: str) -> SourceRecord | None:
        return await self._run(lambda conn: self._load(conn, source_id))

    async def get_manifest_blob(self, key: str) -> bytes | None:
        def query(conn: sqlite3.Connection) -> bytes | None:
            row = conn.execute("SELECT blob FROM manifest_blobs WHERE key=?", (key,)).fetchone()
            return row[0] if row and isinstance(row[0], bytes) else None

        return await self._run(query)

    async def remove(self, source_id: str, generation: str | None = None) -> bool:
        def tx(conn: sqlite3.Connection) -> bool:
            record = self._load(conn, source_id)
            if record is None or (generation is not None and record.generation != generation):
                return False
            conn.execute("DELETE FROM sources WHERE source_id=?", (source_id,))
            self._collect(conn, record.manifest_key)
            return True

        return await self._run(lambda conn: self._update(conn, tx))

    async def aclose(self) -> None:
        def close() -> None:
            with self._lock:
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None

        await anyio.to_thread.run_sync(close)

    def __repr__(self) -> str:
        return f"SqliteRegistry({str(self.path)!r})"
