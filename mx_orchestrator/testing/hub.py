"""A small HuggingFace-Hub-compatible HTTP server on 127.0.0.1, with fault switches.

It serves repos from local directories well enough for the real
``huggingface_hub`` client (``model_info``, ``list_repo_tree``,
``hf_hub_download``/``snapshot_download``): the revision and tree APIs, and
``resolve`` with ``X-Repo-Commit``, ``ETag``/``X-Linked-Etag`` (the sha256 of
LFS files), ``Content-Length`` and ``Range``. Used by ``mxo demo
--scenario hub-fallback``, by the tests and by ``bench/hf.py``; useful for
testing an integration offline.

Three parts, kept apart: :func:`route` answers a request from the repos alone
(pure: a :class:`Reply`); :class:`HubFaults` holds the switches and decides,
per request, whether a fault answers instead (404s with the hub's error codes,
401 for a gated repo, 500 for the next N requests, a redirect loop) and how a
body is damaged (truncated, corrupted at the same size, trickled one byte every
0.5 s); the handler only moves bytes. Every request is logged in
:attr:`HubServer.requests`.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

__all__ = ["HubFaults", "HubServer", "Reply", "parse_range", "route"]

_LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".h5", ".msgpack", ".onnx")


@dataclass
class _File:
    path: str
    size: int
    sha256: str
    git_sha1: str
    lfs: bool

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.git_sha1

    def sibling(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"rfilename": self.path, "size": self.size, "blobId": self.etag}
        if self.lfs:
            entry["lfs"] = {"sha256": self.sha256, "size": self.size, "pointerSize": 134}
        return entry

    def tree_entry(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"type": "file", "path": self.path, "size": self.size, "oid": self.git_sha1}
        if self.lfs:
            entry["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": 134}
        return entry


class _Repo:
    def __init__(self, repo_id: str, root: Path) -> None:
        self.repo_id = repo_id
        self.root = root
        self.files: dict[str, _File] = {}
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            rel = path.relative_to(root).as_posix()
            data = path.read_bytes()
            git_sha1 = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            self.files[rel] = _File(
                rel, len(data), hashlib.sha256(data).hexdigest(), git_sha1, rel.endswith(_LFS_SUFFIXES)
            )
        digest = hashlib.sha1()
        for f in self.files.values():
            digest.update(f"{f.path}:{f.sha256}".encode())
        self.sha = digest.hexdigest()


@dataclass
class Reply:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    #: the repo file a 200/206 body comes from (fault switches are keyed by it)
    file: str | None = None

    @classmethod
    def json(cls, data: Any) -> Reply:
        return cls(200, {"Content-Type": "application/json"}, json.dumps(data).encode())

    @classmethod
    def error(cls, status: int, code: str | None, message: str) -> Reply:
        headers = {"Content-Type": "application/json"}
        if code:
            headers |= {"X-Error-Code": code, "X-Error-Message": message}
        return cls(status, headers, json.dumps({"error": message}).encode())


def parse_range(header: str | None, size: int) -> tuple[int, int] | Reply | None:
    """One ``bytes=`` range (RFC 9110 14.1.2) as ``(start, end)``, end exclusive.

    ``None`` means "send the whole body" (no header, another unit, several
    ranges); an unsatisfiable range is a 416 :class:`Reply`.
    """
    if not header or not header.startswith("bytes=") or "," in header:
        return None
    first, sep, last = header.removeprefix("bytes=").strip().partition("-")
    if (
        not sep
        or not (first or last)
        or not (first.isdigit() or not first)
        or not (last.isdigit() or not last)
    ):
        return None  # malformed: ignored, as servers do
    if not first:  # suffix: the last N bytes
        start, end = max(0, size - int(last)), size
    else:
        start, end = int(first), min(size, int(last) + 1) if last else size
    if start >= size or start >= end:
        return Reply(416, {"Content-Range": f"bytes */{size}"})
    return start, end


def route(repos: dict[str, _Repo], method: str, path: str, range_header: str | None) -> Reply:
    """What the Hub would answer, from the repos alone (no faults)."""
    if path.startswith("/api/models/"):
        return _api(repos, path.removeprefix("/api/models/"))
    parts = path.lstrip("/").split("/")
    if "resolve" in parts:
        i = parts.index("resolve")
        rest = parts[i + 1 :]
        if len(rest) >= 2:
            return _resolve(repos, "/".join(parts[:i]), rest[0], "/".join(rest[1:]), range_header)
    return Reply.error(404, None, "not found")


def _repo(repos: dict[str, _Repo], repo_id: str, revision: str | None = None) -> _Repo | Reply:
    repo = repos.get(repo_id)
    if repo is None:
        return Reply.error(404, "RepoNotFound", f"repository {repo_id} not found")
    if revision is not None and revision not in ("main", repo.sha):
        return Reply.error(404, "RevisionNotFound", f"revision {revision} not found")
    return repo


def _api(repos: dict[str, _Repo], rest: str) -> Reply:
    for marker in ("/revision/", "/tree/"):
        if marker in rest:
            repo_id, _, tail = rest.partition(marker)
            repo = _repo(repos, repo_id, tail.split("/")[0] or "main")
            if isinstance(repo, Reply):
                return repo
            if marker == "/revision/":
                siblings = [f.sibling() for f in repo.files.values()]
                return Reply.json(
                    {
                        "id": repo.repo_id,
                        "modelId": repo.repo_id,
                        "sha": repo.sha,
                        "private": False,
                        "siblings": siblings,
                    }
                )
            return Reply.json([f.tree_entry() for f in repo.files.values()])
    repo = _repo(repos, rest.rstrip("/"))
    if isinstance(repo, Reply):
        return repo
    return Reply.json(
        {"id": repo.repo_id, "sha": repo.sha, "siblings": [{"rfilename": f} for f in repo.files]}
    )


def _resolve(
    repos: dict[str, _Repo], repo_id: str, revision: str, filename: str, range_header: str | None
) -> Reply:
    repo = _repo(repos, repo_id, revision)
    if isinstance(repo, Reply):
        return repo
    f = repo.files.get(filename)
    if f is None:
        return Reply.error(404, "EntryNotFound", f"{filename} not found in {repo_id}")
    headers = {"X-Repo-Commit": repo.sha, "ETag": f'"{f.etag}"', "Accept-Ranges": "bytes"}
    if f.lfs:
        headers |= {"X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(f.size)}
    span = parse_range(range_header, f.size)
    if isinstance(span, Reply):
        return span
    data = (repo.root / f.path).read_bytes()
    if span is None:
        return Reply(200, headers, data, file=filename)
    start, end = span
    headers["Content-Range"] = f"bytes {start}-{end - 1}/{f.size}"
    return Reply(206, headers, data[start:end], file=filename)


@dataclass
class HubFaults:
    repo_not_found: bool = False
    revision_not_found: bool = False
    gated: bool = False
    entry_not_found: set[str] = field(default_factory=set)
    server_errors: int = 0  # the next N requests answer 500
    truncate: set[str] = field(default_factory=set)  # bodies cut in half, connection closed
    corrupt: set[str] = field(default_factory=set)  # same size, different bytes
    delay: float = 0.0  # seconds before every response
    slow_body: set[str] = field(default_factory=set)  # one byte every 0.5 s
    redirect_loop: set[str] = field(default_factory=set)
    extra_tree_paths: list[str] = field(default_factory=list)  # hostile names added to the listings
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def instead(self, path: str, request_path: str) -> Reply | None:
        """The fault that answers this request instead of the router, if any."""
        if self.delay:
            time.sleep(self.delay)
        with self._lock:
            if self.server_errors > 0:
                self.server_errors -= 1
                return Reply.error(500, None, "injected server error")
        if self.gated:
            return Reply.error(401, "GatedRepo", "access to this repo is restricted")
        if self.repo_not_found:
            return Reply.error(404, "RepoNotFound", "repository not found")
        if self.revision_not_found:
            return Reply.error(404, "RevisionNotFound", "revision not found")
        name = path.partition("/resolve/")[2].partition("/")[2]
        if name in self.redirect_loop:
            return Reply(302, {"Location": request_path})
        if name in self.entry_not_found:
            return Reply.error(404, "EntryNotFound", f"{name} not found")
        return None

    def damage(self, path: str, reply: Reply) -> Reply:
        """Hostile listing entries and corrupted bodies."""
        if self.extra_tree_paths and path.startswith("/api/models/") and reply.status == 200:
            data = json.loads(reply.body)
            lfs = {"size": 4, "pointerSize": 134}
            if isinstance(data, list):
                data += [
                    {"type": "file", "path": p, "size": 4, "oid": "0" * 40, "lfs": {"oid": "0" * 64, **lfs}}
                    for p in self.extra_tree_paths
                ]
            elif "siblings" in data:
                data["siblings"] += [
                    {"rfilename": p, "size": 4, "lfs": {"sha256": "0" * 64, **lfs}}
                    for p in self.extra_tree_paths
                ]
            return Reply(reply.status, reply.headers, json.dumps(data).encode())
        if reply.file in self.corrupt and reply.body:
            body = reply.body
            return Reply(
                reply.status, reply.headers, bytes([body[0] ^ 0xFF]) + body[1:-1] + bytes([body[-1] ^ 0xFF])
            )
        return reply


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HubHTTPServer

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        return

    def do_HEAD(self) -> None:
        self._answer()

    def do_GET(self) -> None:
        self._answer()

    def _answer(self) -> None:
        hub = self.server.hub
        path = unquote(urlsplit(self.path).path)
        hub._log(self.command, path)
        faults = hub.faults
        reply = faults.instead(path, self.path) or route(
            hub.repos, self.command, path, self.headers.get("Range")
        )
        reply = faults.damage(path, reply)
        self.send_response(reply.status)
        for key, value in reply.headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        if self.command == "HEAD" or not reply.body:
            return
        if reply.file in faults.truncate:
            self.wfile.write(reply.body[: len(reply.body) // 2])
            self.wfile.flush()
            self.close_connection = True
        elif reply.file in faults.slow_body:
            for i in range(len(reply.body)):
                if hub._stopping.wait(0.5):
                    self.close_connection = True
                    return
                self.wfile.write(reply.body[i : i + 1])
                self.wfile.flush()
        else:
            self.wfile.write(reply.body)


class _HubHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, hub: HubServer) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.hub = hub


class HubServer:
    """``with HubServer({"org/name": Path(...)}) as hub: ... hub.endpoint ...``"""

    def __init__(self, repos: dict[str, Path]) -> None:
        self.repos = {repo_id: _Repo(repo_id, Path(root)) for repo_id, root in repos.items()}
        self.faults = HubFaults()
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: _HubHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        assert self._server is not None, "server not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def file_gets(self) -> list[str]:
        """Paths of every GET of a file body (``/resolve/``) so far."""
        return [p for m, p in self.requests if m == "GET" and "/resolve/" in p]

    def start(self) -> HubServer:
        self._stopping.clear()
        self._server = _HubHTTPServer(self)
        self._thread = threading.Thread(target=self._server.serve_forever, name="hubserver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # slow responses in flight end, closing their connections
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _log(self, method: str, path: str) -> None:
        with self._lock:
            self.requests.append((method, path))
