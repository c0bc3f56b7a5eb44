"""A small HuggingFace-Hub-compatible HTTP server on 127.0.0.1, with fault switches.

It serves repos from local directories well enough for the real
``huggingface_hub`` client (``model_info``, ``list_repo_tree``,
``hf_hub_download``/``snapshot_download``): the revision and tree APIs, and
``resolve`` with ``X-Repo-Commit``, ``ETag``/``X-Linked-Etag`` (the sha256 of
LFS files), ``Content-Length`` and ``Range``. Used by ``mxo demo
--scenario hub-fallback``, by the tests and by ``bench/hf.py``; useful for
testing an integration offline.

Faults (set on :attr:`HubServer.faults`, a :class:`HubFaults`): 404s with the
hub's error codes, 401 (gated), 500 for the next N requests, a truncated body,
a corrupted file of the right size, slow responses, a slow-loris body and a
redirect loop. Every request is logged in :attr:`HubServer.requests`.
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

__all__ = ["HubFaults", "HubServer"]

_LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".h5", ".msgpack", ".onnx")


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
    extra_tree_paths: list[str] = field(default_factory=list)  # hostile names added to the tree listing


@dataclass
class _File:
    path: str
    size: int
    sha256: str
    git_sha1: str
    lfs: bool


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _Repo:
    def __init__(self, repo_id: str, root: Path) -> None:
        self.repo_id = repo_id
        self.root = root
        self.files: dict[str, _File] = {}
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            rel = path.relative_to(root).as_posix()
            data = path.read_bytes()
            self.files[rel] = _File(
                rel,
                len(data),
                hashlib.sha256(data).hexdigest(),
                _git_blob_sha1(data),
                rel.endswith(_LFS_SUFFIXES),
            )
        digest = hashlib.sha1()
        for f in self.files.values():
            digest.update(f"{f.path}:{f.sha256}".encode())
        self.sha = digest.hexdigest()

    def etag(self, f: _File) -> str:
        return f.sha256 if f.lfs else f.git_sha1


class HubServer:
    """``with HubServer({"org/name": Path(...)}) as hub: ... hub.endpoint ...``"""

    def __init__(self, repos: dict[str, Path]) -> None:
        self.repos = {repo_id: _Repo(repo_id, Path(root)) for repo_id, root in repos.items()}
        self.faults = HubFaults()
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        assert self._server is not None, "server not started"
        port = self._server.server_address[1]
        return f"http://127.0.0.1:{port}"

    def file_gets(self) -> list[str]:
        """Paths of every GET of a file body (``/resolve/``) so far."""
        return [p for m, p in self.requests if m == "GET" and "/resolve/" in p]

    def start(self) -> HubServer:
        self._stopping.clear()
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="hubserver", daemon=True)
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

    def _take_server_error(self) -> bool:
        with self._lock:
            if self.faults.server_errors > 0:
                self.faults.server_errors -= 1
                return True
            return False


def _handler_for(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            return

        def _error(self, status: int, code: str | None, message: str) -> None:
            body = json.dumps({"error": message}).encode()
            self.send_response(status)
            if code:
                self.send_header("X-Error-Code", code)
                self.send_header("X-Error-Message", message)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, data: Any) -> None:
            body = json.dumps(data).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_HEAD(self) -> None:
            self._dispatch()

        def do_GET(self) -> None:
            self._dispatch()

        def _dispatch(self) -> None:
            path = unquote(urlsplit(self.path).path)
            hub._log(self.command, path)
            faults = hub.faults
            if faults.delay:
                time.sleep(faults.delay)
            if hub._take_server_error():
                return self._error(500, None, "injected server error")
            if path.startswith("/api/models/"):
                return self._api(path.removeprefix("/api/models/"))
            parts = path.lstrip("/").split("/")
            if "resolve" in parts:
                i = parts.index("resolve")
                repo_id, rest = "/".join(parts[:i]), parts[i + 1 :]
                if len(rest) >= 2:
                    return self._resolve(repo_id, rest[0], "/".join(rest[1:]))
            return self._error(404, None, "not found")

        def _repo(self, repo_id: str) -> _Repo | None:
            if hub.faults.gated:
                self._error(401, "GatedRepo", f"access to {repo_id} is restricted")
                return None
            repo = hub.repos.get(repo_id)
            if repo is None or hub.faults.repo_not_found:
                self._error(404, "RepoNotFound", f"repository {repo_id} not found")
                return None
            return repo

        def _revision_ok(self, repo: _Repo, revision: str) -> bool:
            if hub.faults.revision_not_found or revision not in ("main", repo.sha):
                self._error(404, "RevisionNotFound", f"revision {revision} not found")
                return False
            return True

        def _api(self, rest: str) -> None:
            for marker in ("/revision/", "/tree/"):
                if marker in rest:
                    repo_id, _, tail = rest.partition(marker)
                    repo = self._repo(repo_id)
                    if repo is None:
                        return
                    revision = tail.split("/")[0] or "main"
                    if not self._revision_ok(repo, revision):
                        return
                    if marker == "/revision/":
                        return self._json(
                            {
                                "id": repo.repo_id,
                                "modelId": repo.repo_id,
                                "sha": repo.sha,
                                "private": False,
                                "siblings": [self._sibling(repo, f) for f in repo.files.values()]
                                + [
                                    {
                                        "rfilename": p,
                                        "size": 4,
                                        "lfs": {"sha256": "0" * 64, "size": 4, "pointerSize": 134},
                                    }
                                    for p in hub.faults.extra_tree_paths
                                ],
                            }
                        )
                    tree = [self._tree_entry(repo, f) for f in repo.files.values()]
                    tree += [
                        {
                            "type": "file",
                            "path": p,
                            "size": 4,
                            "oid": "0" * 40,
                            "lfs": {"oid": "0" * 64, "size": 4, "pointerSize": 134},
                        }
                        for p in hub.faults.extra_tree_paths
                    ]
                    return self._json(tree)
            repo = self._repo(rest.rstrip("/"))
            if repo is not None:
                self._json(
                    {
                        "id": repo.repo_id,
                        "sha": repo.sha,
                        "siblings": [{"rfilename": f.path} for f in repo.files.values()],
                    }
                )

        def _sibling(self, repo: _Repo, f: _File) -> dict[str, Any]:
            entry: dict[str, Any] = {"rfilename": f.path, "size": f.size, "blobId": repo.etag(f)}
            if f.lfs:
                entry["lfs"] = {"sha256": f.sha256, "size": f.size, "pointerSize": 134}
            return entry

        @staticmethod
        def _tree_entry(repo: _Repo, f: _File) -> dict[str, Any]:
            entry: dict[str, Any] = {"type": "file", "path": f.path, "size": f.size, "oid": f.git_sha1}
            if f.lfs:
                entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": 134}
            return entry

        def _resolve(self, repo_id: str, revision: str, filename: str) -> None:
            faults = hub.faults
            repo = self._repo(repo_id)
            if repo is None or not self._revision_ok(repo, revision):
                return
            if filename in faults.redirect_loop:
                self.send_response(302)
                self.send_header("Location", self.path)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            f = repo.files.get(filename)
            if f is None or filename in faults.entry_not_found:
                return self._error(404, "EntryNotFound", f"{filename} not found in {repo_id}")
            data = (repo.root / f.path).read_bytes()
            if filename in faults.corrupt and data:
                data = bytes([data[0] ^ 0xFF]) + data[1:-1] + bytes([data[-1] ^ 0xFF])
            start, end = 0, len(data)
            ranged = self.headers.get("Range")
            if ranged and ranged.startswith("bytes="):
                first, _, last = ranged.removeprefix("bytes=").partition("-")
                start = int(first or 0)
                end = int(last) + 1 if last else len(data)
            self.send_response(206 if ranged else 200)
            self.send_header("X-Repo-Commit", repo.sha)
            self.send_header("ETag", f'"{repo.etag(f)}"')
            if f.lfs:
                self.send_header("X-Linked-Etag", f'"{f.sha256}"')
                self.send_header("X-Linked-Size", str(f.size))
            self.send_header("Content-Length", str(end - start))
            self.send_header("Accept-Ranges", "bytes")
            if ranged:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
            self.end_headers()
            if self.command == "HEAD":
                return
            body = data[start:end]
            if filename in faults.truncate:
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            if filename in faults.slow_body:
                for i in range(len(body)):
                    if hub._stopping.wait(0.5):
                        self.close_connection = True
                        return
                    self.wfile.write(body[i : i + 1])
                    self.wfile.flush()
                return
            self.wfile.write(body)

    return Handler
