"""Shared fixtures. Tests that need real services (NIXL peers, a Hub server, redis) live in their own modules."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
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
    """A real redis-server on a free loopback port, stoppable and restartable on the same port.

    With ``secure``: TLS only (certificates made here by openssl, a CA the client
    is given) and ACL (the default user off; user ``mxo`` with a password, on
    ``mxo:*`` keys only).
    """

    PASSWORD = "s3cret-pa55"

    def __init__(self, workdir: Path, *, secure: bool = False) -> None:
        self.workdir = workdir
        self.secure = secure
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc: subprocess.Popen[bytes] | None = None
        if secure:
            self._make_certificates()

    def _make_certificates(self) -> None:
        d = self.workdir

        def openssl(*args: str) -> None:
            subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
                "-days", "2", "-subj", "/CN=mxo-test-ca")  # fmt: skip
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
                "-subj", "/CN=127.0.0.1")  # fmt: skip
        (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
        openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", "server.crt", "-days", "2", "-extfile", "ext.cnf")  # fmt: skip

    def url_with(self, user: str, password: str) -> str:
        return f"rediss://{user}:{password}@127.0.0.1:{self.port}/0?ssl_ca_certs={self.workdir / 'ca.crt'}"

    @property
    def url(self) -> str:
        if self.secure:
            return self.url_with("mxo", self.PASSWORD)
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed (.ci/run installs it from Debian's packages)")
        args = [exe, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(self.workdir)]
        if self.secure:
            d = self.workdir
            args += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(d / "server.crt"),
                     "--tls-key-file", str(d / "server.key"), "--tls-ca-cert-file", str(d / "ca.crt"),
                     "--tls-auth-clients", "no",
                     "--user", "default", "off",
                     "--user", "mxo", "on", f">{self.PASSWORD}", "~mxo:*", "+@all"]  # fmt: skip
        else:
            args += ["--port", str(self.port)]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as conn:
                    if self.secure:
                        return  # listening; TLS clients do their own handshake
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
        if self.secure:
            import redis

            client = redis.Redis.from_url(self.url)
            for key in client.scan_iter("mxo:*"):
                client.delete(key)
            client.close()
            return
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


@pytest.fixture(scope="session")
def secure_redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis-tls"), secure=True)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def secure_redis_url(secure_redis_server: RedisServer) -> Iterator[str]:
    """A TLS + ACL redis-server: the URL carries the ACL user, its password and the CA certificate."""
    secure_redis_server.flush()
    yield secure_redis_server.url


@pytest.fixture
def no_nixl_leaks() -> Iterator[None]:
    """After the test: no open transfer handles, remote agents or registrations in this process."""
    from mx_orchestrator._backends.nixl import get_agent
    from mx_orchestrator._backends.pool import release_connections

    agent = get_agent()
    release_connections()  # pooled connections of earlier tests are not this test's
    before = (agent.stats.handles_open, agent.stats.remote_agents, agent.stats.registrations)
    yield
    release_connections()  # kept on purpose across loads; what must not leak is everything else
    assert (agent.stats.handles_open, agent.stats.remote_agents, agent.stats.registrations) == before


async def publish_a_lie(registry_url: str, source_id: str, tensor: int) -> str:
    """Make ``source_id``'s published manifest promise other bytes than it serves for one tensor
    (its checksum zeroed), as a lying source would publish it; returns that tensor's name."""
    from dataclasses import replace

    from mx_orchestrator.registry.sqlite import SqliteRegistry

    registry = SqliteRegistry(registry_url.removeprefix("sqlite://"))
    try:
        record = await registry.get(source_id)
        assert record is not None
        manifest = await registry.get_manifest(source_id, record.generation)
        assert manifest is not None
        specs = list(manifest.tensors)
        specs[tensor] = replace(specs[tensor], checksum="0" * 16)
        await registry.publish(record, replace(manifest, tensors=tuple(specs)))
        return specs[tensor].name
    finally:
        await registry.aclose()


class Mxo:
    """Runs the ``mxo`` command line in a child process (the shared CLI fixture's type);
    ``quiet``: it logs warnings only."""

    def __init__(self, *, quiet: bool = False) -> None:
        self.quiet = quiet

    def __call__(
        self, *args: str, timeout: float = 180, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """``mxo ARGS``: its exit code, stdout and stderr as text (undecodable bytes kept as escapes)."""
        environment = dict(os.environ if env is None else env)
        if self.quiet:
            environment["MXO_LOG_LEVEL"] = "warning"
        return subprocess.run(
            [sys.executable, "-m", "mx_orchestrator", *args],
            capture_output=True,
            text=True,
            errors="surrogateescape",
            timeout=timeout,
            env=environment,
        )


@pytest.fixture
def mxo() -> Mxo:
    """The ``mxo`` command line, run as a user would run it."""
    return Mxo()


#: fixtures that start real processes or servers: a test using one is in the slow lane
_SLOW_FIXTURES = frozenset(
    {"peers", "mxo", "redis_server", "redis_url", "secure_redis_server", "secure_redis_url"}
)
_SLOW_MARKERS = frozenset({"nixl", "hub", "redis", "cli"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test that starts a process, a server or a real NIXL agent is ``slow``: ``-m "not slow"``
    is the fast lane (the pure core, the fakes and the driver on virtual time)."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        marked = {mark.name for mark in item.iter_markers()}
        if fixtures & _SLOW_FIXTURES or marked & _SLOW_MARKERS:
            item.add_marker(pytest.mark.slow)
