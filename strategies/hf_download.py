"""hf_download: fetch safetensors from the HuggingFace Hub with huggingface_hub, verify, load.

The only module that imports huggingface_hub. It resolves the revision to a
commit, lists the repo tree, downloads the weights (and config files) into
huggingface_hub's normal cache (HF_HOME, HF_ENDPOINT, HF_TOKEN and offline
mode are respected), verifies every LFS file's sha256 against the tree's
``lfs.oid`` (huggingface_hub itself only checks sizes), and copies the tensors
into the target, filling an engine's preallocated tensors in place.

Tree entries are untrusted: a path that is absolute or climbs out of the
snapshot is refused. A blob that fails its sha256 is deleted from the cache,
so the next attempt downloads it again. Transient errors (5xx, connection
errors, truncated bodies) are retried with tenacity's exponential backoff
inside the attempt's deadline.
"""

from __future__ import annotations

import errno
import fnmatch
import glob
import hashlib
import json
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import anyio
import tenacity

from mx_orchestrator.errors import ConfigError
from mx_orchestrator.layout import LayoutSpec, plan_layout
from mx_orchestrator.models import Manifest, ModelIdentity
from mx_orchestrator.outcomes import (
    Corrupt,
    Loaded,
    LocalFailure,
    ManifestMismatch,
    NotApplicable,
    Outcome,
    SourceFailed,
    SourceUnreachable,
    TimedOut,
)
from mx_orchestrator.strategy import AttemptContext
from mx_orchestrator.target import Target, TargetMismatch, dtype_name

__all__ = ["HfDownload", "safe_relative_path"]

DEFAULT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "*.json", "*.txt", "*.model")


def safe_relative_path(path: str) -> str | None:
    """``path`` if it stays inside the snapshot, else ``None`` (absolute, ``..``, backslashes, NUL)."""
    if not path or "\\" in path or "\x00" in path or "//" in path or path.startswith("/"):
        return None
    parts = PurePosixPath(path).parts
    if any(part in ("..", "") for part in parts) or ":" in parts[0]:
        return None
    return path


class _ByteCounter:
    """Adds up downloaded bytes (from huggingface_hub's progress updates) for the attempt's callback."""

    def __init__(self, callback: Any) -> None:
        self._callback = callback
        self._done = 0
        self._lock = threading.Lock()

    def __call__(self, n: int) -> None:
        with self._lock:
            self._done += n
            done = self._done
        self._callback(done, 0)


class _Fail(Exception):
    """Carries the outcome a failure maps to out of the worker thread."""

    def __init__(self, kind: str, detail: str, retry: bool = False, bad: Sequence[str] = ()) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail
        self.retry = retry
        self.bad = tuple(bad)


@dataclass
class _Fetched:
    commit: str
    files: dict[str, Path]
    weights: list[str]
    nbytes: int
    verified: bool
    sha256: dict[str, str | None]


class HfDownload:
    name = "hf_download"
    uses_peers = False

    def __init__(
        self,
        repo_id: str | None = None,
        *,
        revision: str | None = None,
        endpoint: str | None = None,
        token: str | None = None,
        cache_dir: str | Path | None = None,
        verify: bool = True,
        patterns: Sequence[str] = DEFAULT_PATTERNS,
        max_tries: int = 4,
        request_timeout: float = 10.0,
    ) -> None:
        self.repo_id = repo_id
        self.revision = revision
        self.endpoint = endpoint
        self.token = token
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.verify = verify
        self.patterns = tuple(patterns)
        self.max_tries = max_tries
        self.request_timeout = request_timeout

    def __repr__(self) -> str:  # never shows the token
        return f"HfDownload(repo_id={self.repo_id!r}, endpoint={self.endpoint!r})"

    async def attempt(self, ctx: AttemptContext) -> Outcome:
        began = anyio.current_time()
        repo = self.repo_id or ctx.identity.model_id
        revision = self.revision or ctx.identity.revision
        try:
            import huggingface_hub  # noqa: F401
        except ImportError as exc:
            return NotApplicable(strategy=self.name, detail=f"huggingface_hub is not installed: {exc}")
        target = ctx.target
        if not isinstance(target, Target):
            return NotApplicable(strategy=self.name, detail="the target is not a mx_orchestrator Target")
        stop = threading.Event()
        wall_deadline = time.monotonic() + ctx.remaining
        counter = _ByteCounter(ctx.progress) if ctx.progress is not None else None

        def run() -> tuple[_Fetched, float]:
            fetched = self._fetch(repo, revision, wall_deadline, stop, counter)
            copy_began = time.monotonic()
            # hash on one core while the tensors are copied on the other; the
            # copy is only accepted (Loaded) once every hash matched
            load_error: Exception | None = None
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mxo-sha256") as pool:
                bad = pool.submit(self._verify, fetched) if self.verify else None
                try:
                    self._load(ctx.identity, fetched, target)
                except (_Fail, TargetMismatch):
                    raise
                except Exception as exc:  # a damaged file may not even parse
                    load_error = exc
                corrupt = bad.result() if bad is not None else []
            if corrupt:
                raise _Fail(
                    "corrupt", f"sha256 differs from the hub's lfs.oid for {corrupt[:3]}", bad=corrupt
                )
            if load_error is not None:
                raise _Fail("failed", f"cannot read the downloaded safetensors: {load_error}")
            return fetched, time.monotonic() - copy_began

        try:
            # huggingface_hub blocks; the thread stops at its next file when told,
            # and each HTTP request has its own timeout, so it cannot outlive us long
            fetched, _ = await anyio.to_thread.run_sync(run, abandon_on_cancel=True)
        except _Fail as fail:
            return self._outcome(fail, anyio.current_time() - began)
        except TargetMismatch as exc:
            return ManifestMismatch(strategy=self.name, seconds=anyio.current_time() - began, detail=str(exc))
        finally:
            stop.set()
        seconds = anyio.current_time() - began
        if ctx.progress is not None:
            ctx.progress(fetched.nbytes, fetched.nbytes)
        return Loaded(
            strategy=self.name,
            source_id=None,
            bytes_moved=target.nbytes,
            seconds=seconds,
            verified=fetched.verified,
            detail=f"{repo}@{fetched.commit[:12]}: {len(fetched.weights)} safetensors files"
            + ("; sha256 verified" if fetched.verified else ""),
        )

    def _outcome(self, fail: _Fail, seconds: float) -> Outcome:
        kinds: dict[str, Any] = {
            "unreachable": SourceUnreachable,
            "failed": SourceFailed,
            "timeout": TimedOut,
            "corrupt": Corrupt,
            "local": LocalFailure,
            "not_applicable": NotApplicable,
            "mismatch": ManifestMismatch,
        }
        cls = kinds[fail.kind]
        extra: dict[str, Any] = {"bad_tensors": fail.bad} if cls is Corrupt else {}
        return cls(strategy=self.name, seconds=seconds, detail=fail.detail, **extra)  # type: ignore[no-any-return]

    # -- blocking part (worker thread) -------------------------------------------

    def _retrying(self, wall_deadline: float) -> tenacity.Retrying:
        return tenacity.Retrying(
            retry=tenacity.retry_if_exception(lambda e: isinstance(e, _Fail) and e.retry),
            wait=tenacity.wait_exponential(multiplier=0.1, max=2.0),
            stop=tenacity.stop_after_attempt(self.max_tries)
            | tenacity.stop_before_delay(max(0.0, wall_deadline - time.monotonic())),
            reraise=True,
        )

    def _fetch(
        self,
        repo: str,
        revision: str,
        wall_deadline: float,
        stop: threading.Event,
        counter: _ByteCounter | None = None,
    ) -> _Fetched:
        from huggingface_hub import HfApi

        api = HfApi(endpoint=self.endpoint, token=self.token)
        # one call resolves the revision to a commit and lists every file with its sha256
        info = self._call(
            lambda: api.model_info(
                repo, revision=revision, files_metadata=True, timeout=self.request_timeout
            ),
            wall_deadline,
        )
        commit = str(info.sha or revision)
        wanted: dict[str, str | None] = {}  # path -> sha256 of LFS files
        for sibling in info.siblings or []:
            path = str(getattr(sibling, "rfilename", ""))
            if safe_relative_path(path) is None:
                raise _Fail("failed", f"the hub listed an unsafe path {path!r:.120}")
            if not any(fnmatch.fnmatch(PurePosixPath(path).name, p) for p in self.patterns):
                continue
            lfs = getattr(sibling, "lfs", None)
            sha = getattr(lfs, "sha256", None) if lfs is not None else None
            wanted[path] = str(sha) if sha else None
        weights = sorted(p for p in wanted if p.endswith(".safetensors"))
        if not weights:
            raise _Fail("unreachable", f"{repo}@{commit[:12]} has no safetensors files")
        if stop.is_set() or time.monotonic() >= wall_deadline:
            raise _Fail("timeout", "the attempt's deadline passed before the download")
        # one snapshot_download of exactly the vetted files: parallel transfers,
        # the normal cache layout, and nothing the listing did not show us
        snapshot = Path(
            self._call(
                lambda: self._snapshot(repo, commit, [glob.escape(p) for p in wanted], counter), wall_deadline
            )
        )
        files: dict[str, Path] = {}
        for path in wanted:
            local = snapshot / path
            if not local.is_file():
                raise _Fail("failed", f"{path} missing from the downloaded snapshot")
            files[path] = local
        verified = self.verify and all(wanted[p] is not None for p in wanted if p.endswith(".safetensors"))
        index = next((p for p in files if p.endswith("model.safetensors.index.json")), None)
        if index is not None:
            # a sharded checkpoint: the index says which files hold the weights
            try:
                shard_names = set(json.loads(files[index].read_text())["weight_map"].values())
            except (ValueError, KeyError, TypeError) as exc:
                raise _Fail("failed", f"unreadable {index}: {exc}") from None
            base = PurePosixPath(index).parent
            weights = sorted(str(base / n) if str(base) != "." else n for n in shard_names)
            missing = [w for w in weights if w not in files or safe_relative_path(w) is None]
            if missing:
                raise _Fail("failed", f"the index names files the repo lacks: {missing[:3]}")
        return _Fetched(
            commit, files, weights, sum(f.stat().st_size for f in files.values()), verified, wanted
        )

    def _snapshot(self, repo: str, commit: str, patterns: list[str], report: _ByteCounter | None) -> str:
        from huggingface_hub import snapshot_download
        from tqdm.auto import tqdm

        class Silent(tqdm):  # type: ignore[misc]
            """Progress goes through the attempt's callback, not to the terminal."""

            def __init__(self, *args: Any, **kwargs: Any) -> None:
                kwargs["disable"] = True
                super().__init__(*args, **kwargs)

            def update(self, n: float | None = 1) -> bool | None:
                if report is not None and getattr(self, "unit", "") == "B":
                    report(int(n or 0))
                return super().update(n)  # type: ignore[no-any-return]

        return str(
            snapshot_download(
                repo,
                revision=commit,
                endpoint=self.endpoint,
                token=self.token,
                cache_dir=self.cache_dir,
                allow_patterns=patterns,
                etag_timeout=self.request_timeout,
                tqdm_class=Silent,
            )
        )

    def _call(self, fn: Any, wall_deadline: float) -> Any:
        for attempt in self._retrying(wall_deadline):
            with attempt:
                try:
                    return fn()
                except _Fail:
                    raise
                except Exception as exc:
                    raise _classify(exc) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _verify(fetched: _Fetched) -> list[str]:
        """Paths whose sha256 differs from the hub's; their blobs are evicted from the cache."""
        bad = []
        for path, sha in fetched.sha256.items():
            if sha is not None and _sha256(fetched.files[path]) != sha:
                _evict(fetched.files[path])
                bad.append(path)
        return bad

    def _load(self, identity: ModelIdentity, fetched: _Fetched, target: Target) -> None:
        from safetensors import safe_open

        manifest = _manifest_from_files(identity, [fetched.files[p] for p in fetched.weights])
        try:
            target.prepare(manifest)
        except MemoryError as exc:
            raise _Fail("local", f"allocation failed: {exc}") from exc
        tensors = target.tensors()
        for path in fetched.weights:
            with safe_open(str(fetched.files[path]), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    tensors[name].copy_(f.get_tensor(name))


def _manifest_from_files(identity: ModelIdentity, paths: Sequence[Path]) -> Manifest:
    from safetensors import safe_open

    rows = []
    seen: set[str] = set()
    for path in paths:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118
                if name in seen:
                    raise _Fail("failed", f"tensor {name!r} appears in more than one file")
                seen.add(name)
                sl = f.get_slice(name)
                rows.append((name, _st_dtype(sl.get_dtype()), tuple(sl.get_shape())))
    return plan_layout(identity, rows, LayoutSpec("arena"))


def _st_dtype(name: str) -> str:
    # safe_open reports safetensors' names already (F32, BF16, ...); map torch's spelling if it ever differs
    if name.startswith("torch."):
        import torch

        return dtype_name(getattr(torch, name.removeprefix("torch.")))
    return name


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def _evict(snapshot_path: Path) -> None:
    """Remove a bad file from the cache: the blob and the snapshot link to it."""
    blob = snapshot_path.resolve()
    for p in {blob, snapshot_path}:
        p.unlink(missing_ok=True)


def _classify(exc: Exception) -> _Fail:
    from huggingface_hub import errors as hf

    name = type(exc).__name__
    detail = f"{name}: {str(exc).splitlines()[0] if str(exc) else ''}"[:400]
    if isinstance(exc, hf.GatedRepoError):
        return _Fail("unreachable", f"unauthorized (gated repo or bad token): {detail}")
    if isinstance(exc, (hf.RepositoryNotFoundError, hf.RevisionNotFoundError)):
        return _Fail("unreachable", detail)
    if isinstance(exc, (hf.EntryNotFoundError, hf.RemoteEntryNotFoundError)):
        return _Fail("unreachable", detail)
    if isinstance(exc, (hf.OfflineModeIsEnabled, hf.LocalEntryNotFoundError)):
        return _Fail("unreachable", f"offline and not cached: {detail}")
    if isinstance(exc, hf.HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            return _Fail("unreachable", f"unauthorized: {detail}")
        return _Fail("failed", detail, retry=status is None or status >= 500 or status == 429)
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
        return _Fail("local", f"cannot write the cache: {detail}")
    if "timeout" in name.lower() or "timed out" in str(exc).lower():
        return _Fail("timeout", detail, retry=True)
    if (
        isinstance(exc, (ConnectionError, OSError))
        or "connect" in name.lower()
        or "remoteprotocol" in name.lower()
    ):
        # truncated bodies ("Consistency check failed"), refused connections, resets
        return _Fail("failed", detail, retry=True)
    if isinstance(exc, ConfigError):
        raise exc
    return _Fail("failed", detail, retry=True)
