"""Shared fixtures. Tests that need real services (NIXL peers, a Hub server, redis) live in their own modules."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import anyio
import pytest

from mx_orchestrator import ModelIdentity
from mx_orchestrator.testing.peers import Peers

#: Runs one async test body to completion on some event loop.
Runner = Callable[[Callable[[], Awaitable[None]]], None]


@pytest.fixture(params=["asyncio", "trio"])
def backend(request: pytest.FixtureRequest) -> Runner:
    """Run the test body under asyncio, then (a second test) under trio."""

    def run(main: Callable[[], Awaitable[None]]) -> None:
        anyio.run(main, backend=request.param)

    return run


@pytest.fixture
def virtual_clock() -> Runner:
    """Run the test body on trio with a virtual clock that jumps whenever every task waits."""
    from trio.testing import MockClock

    def run(main: Callable[[], Awaitable[None]]) -> None:
        anyio.run(main, backend="trio", backend_options={"clock": MockClock(autojump_threshold=0)})

    return run


@pytest.fixture
def identity() -> ModelIdentity:
    return ModelIdentity("acme/tiny-model", "main")


@pytest.fixture
def registry_url(tmp_path: Path) -> str:
    """A fresh SQLite registry file, shared with the source processes a test starts."""
    return f"sqlite://{tmp_path}/registry.db"


@pytest.fixture
def peers(registry_url: str) -> Iterator[Peers]:
    """Real `mxo serve` processes; every one is reaped, which is asserted."""
    with Peers(registry_url) as p:
        yield p
    for proc in p.started:
        assert proc.proc.poll() is not None, "a source process outlived its test"


class RedisServer:
    """A real redis-server on a free loopback port, stoppable and restartable on the same port."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed (.ci/run installs it from Debian's packages)")
        self.proc = subprocess.Popen(
            [
                exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None

    def flush(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as conn:
            conn.sendall(b"FLUSHALL\r\n")
            conn.recv(16)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    if redis_server.proc is None:
        redis_server.start()
    redis_server.flush()
    yield redis_server.url
