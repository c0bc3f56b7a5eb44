"""hf_download: fetch safetensors from the HuggingFace Hub, verify their sha256, load them into the target.

Over the Hub edge (:mod:`mx_orchestrator._backends.hub`): one listing gives the
commit and every LFS file's sha256; one snapshot download fetches exactly the
vetted files; every weight file's sha256 is checked against the listing
(huggingface_hub itself only checks sizes) on one core while the tensors are
copied into the target on the other, filling an engine's preallocated
tensors in place. A blob that fails its sha256 is deleted from the cache, so
the next attempt downloads it again.

With a content pin (``Orchestrator(expect=...)``), the loaded tensors' SHA-256
must add up to the pinned fingerprint, else the attempt is a ``ManifestMismatch``
(the Hub holds another revision).

Listed paths are untrusted: one that is absolute or climbs out of the
snapshot fails the attempt before anything is downloaded. The checkpoint
(the index, the safetensors headers) is read by
:mod:`mx_orchestrator.checkpoint` with the same safety rules as the serving side.
"""

from __future__ import annotations

import fnmatch
import hashlib
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import anyio

from mx_orchestrator._backends import EdgeFailure
from mx_orchestrator._backends.hub import HubClient, hub_available
from mx_orchestrator.checkpoint import (
    INDEX_NAME,
    manifest_from_files,
    read_index,
    read_tensors,
    safe_relative_path,
)
from mx_orchestrator.errors import CheckpointError
from mx_orchestrator.integrity import fingerprint_of
from mx_orchestrator.models import ModelIdentity
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
from mx_orchestrator.strategy import AttemptContext, StrategyOptions
from mx_orchestrator.target import Target, TargetMismatch

__all__ = ["DEFAULT_PATTERNS", "HfDownload", "safe_relative_path"]

DEFAULT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "*.json", "*.txt", "*.model")


class _ByteCounter:
    """Adds up downloaded bytes (from the client's progress updates) for the attempt's callback."""

    def __init__(self, callback: Any) -> None:
        self._callback = callback
        self._done = 0
        self._lock = threading.Lock()

    def __call__(self, n: int) -> None:
        with self._lock:
            self._done += n
            done = self._done
        self._callback(done, 0)


@dataclass
class _Fetched:
    commit: str
    files: dict[str, Path]
    weights: list[str]
    nbytes: int
    verified: bool
    sha256: dict[str, str | None]
    #: weight files the index does not name, and their bytes: listed, never downloaded
    skipped_bytes: int = 0
    skipped: list[str] = field(default_factory=list)


class HfDownload:
    """``verify`` is the target's switch: the sha256 of every file is checked when the target verifies."""

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
        patterns: Sequence[str] = DEFAULT_PATTERNS,
        max_tries: int = 4,
        request_timeout: float = 10.0,
    ) -> None:
        self.repo_id = repo_id
        self.revision = revision
        self.patterns = tuple(patterns)
        self.client = HubClient(
            endpoint=endpoint,
            token=token,
            cache_dir=Path(cache_dir) if cache_dir is not None else None,
            request_timeout=request_timeout,
            max_tries=max_tries,
        )

    @classmethod
    def from_options(cls, options: StrategyOptions) -> HfDownload:
        return cls(
            options.repo_id,
            revision=options.revision,
            endpoint=options.hub_endpoint,
            cache_dir=options.hub_cache_dir,
        )

    def __repr__(self) -> str:  # never shows the token
        return f"HfDownload(repo_id={self.repo_id!r}, endpoint={self.client.endpoint!r})"

    async def attempt(self, ctx: AttemptContext) -> Outcome:
        began = anyio.current_time()
        repo = self.repo_id or ctx.identity.model_id
        revision = self.revision or ctx.identity.revision
        missing = hub_available()
        if missing is not None:
            return NotApplicable(strategy=self.name, detail=missing)
        target = ctx.target
        if not isinstance(target, Target):
            return NotApplicable(strategy=self.name, detail="the target is not a mx_orchestrator Target")
        stop = threading.Event()
        wall_deadline = time.monotonic() + ctx.remaining
        counter = _ByteCounter(ctx.progress) if ctx.progress is not None else None

        def run() -> _Fetched:
            fetched = self._fetch(repo, revision, target.verify, wall_deadline, stop, counter)
            # hash on one core while the tensors are copied on the other; the
            # copy is only accepted (Loaded) once every hash matched
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mxo-sha256") as pool:
                hashing = pool.submit(_verify, fetched) if target.verify else None
                try:
                    self._load(ctx.identity, fetched, target)
                except CheckpointError as exc:  # a damaged file may not even parse
                    load_error: CheckpointError | None = exc
                else:
                    load_error = None
                corrupt = hashing.result() if hashing is not None else []
            if corrupt:
                raise EdgeFailure(
                    Corrupt,
                    f"sha256 differs from the hub's lfs.oid for {corrupt[:3]}",
                    bad_tensors=tuple(corrupt),
                )
            if load_error is not None:
                raise EdgeFailure(SourceFailed, f"cannot read the downloaded checkpoint: {load_error}")
            return fetched

        try:
            # the client blocks; the thread stops at its next file when told, and
            # each HTTP request has its own timeout, so it cannot outlive us long
            fetched = await anyio.to_thread.run_sync(run, abandon_on_cancel=True)
        except EdgeFailure as failure:
            return failure.outcome(self.name, None, anyio.current_time() - began)
        except TargetMismatch as exc:
            return ManifestMismatch(strategy=self.name, seconds=anyio.current_time() - began, detail=str(exc))
        finally:
            stop.set()
        if ctx.expect is not None:
            with ctx.phases.timed("verify"):
                found = await anyio.to_thread.run_sync(fingerprint_of, target.tensors())
            if found != ctx.expect:  # another revision than the one pinned
                return ManifestMismatch(
                    strategy=self.name,
                    seconds=anyio.current_time() - began,
                    detail=f"the Hub's content is not the pinned content: {found}",
                )
        if ctx.progress is not None:
            ctx.progress(fetched.nbytes, fetched.nbytes)
        return Loaded(
            strategy=self.name,
            source_id=None,
            bytes_moved=target.nbytes,
            seconds=anyio.current_time() - began,
            verified=fetched.verified,
            detail=f"{repo}@{fetched.commit[:12]}: {len(fetched.weights)} safetensors files"
            + ("; sha256 verified" if fetched.verified else "")
            + (
                f"; skipped {fetched.skipped_bytes:,} bytes the index does not use "
                f"({', '.join(fetched.skipped[:3])})"
                if fetched.skipped
                else ""
            ),
        )

    # -- blocking part (worker thread) -------------------------------------------

    def _fetch(
        self,
        repo: str,
        revision: str,
        verify: bool,
        wall_deadline: float,
        stop: threading.Event,
        counter: _ByteCounter | None,
    ) -> _Fetched:
        listing = self.client.listing(repo, revision, wall_deadline)
        wanted: dict[str, str | None] = {}  # path -> sha256 of LFS files
        for entry in listing.files:
            if safe_relative_path(entry.path) is None:
                raise EdgeFailure(SourceFailed, f"the hub listed an unsafe path {entry.path!r:.120}")
            if any(fnmatch.fnmatch(PurePosixPath(entry.path).name, p) for p in self.patterns):
                wanted[entry.path] = entry.sha256
        weights = sorted(p for p in wanted if p.endswith(".safetensors"))
        commit = listing.commit
        if not weights:
            raise EdgeFailure(SourceUnreachable, f"{repo}@{commit[:12]} has no safetensors files")
        if stop.is_set() or time.monotonic() >= wall_deadline:
            raise EdgeFailure(TimedOut, "the attempt's deadline passed before the download")
        # a sharded checkpoint: the index is fetched first and names the only weight files to
        # fetch (a Mistral-style consolidated.safetensors beside the shards is not downloaded)
        index = next((p for p in wanted if PurePosixPath(p).name == INDEX_NAME), None)
        first = [p for p in wanted if not p.endswith(".safetensors")] if index is not None else list(wanted)
        snapshot = self.client.snapshot(repo, commit, first, wall_deadline, counter)
        skipped: list[str] = []
        if index is not None:
            try:
                shard_names = read_index(snapshot / index)
            except CheckpointError as exc:
                raise EdgeFailure(SourceFailed, str(exc)) from None
            base = PurePosixPath(index).parent
            named = sorted(str(base / n) for n in shard_names)
            absent = [w for w in named if w not in wanted]
            if absent:
                raise EdgeFailure(SourceFailed, f"the index names files the repo lacks: {absent[:3]}")
            skipped = [w for w in weights if w not in named]
            weights = named
            for path in skipped:
                del wanted[path]
            snapshot = self.client.snapshot(repo, commit, weights, wall_deadline, counter)
        files: dict[str, Path] = {}
        for path in wanted:
            local = snapshot / path
            if not local.is_file():
                raise EdgeFailure(SourceFailed, f"{path} missing from the downloaded snapshot")
            files[path] = local
        sizes = {entry.path: entry.size for entry in listing.files}
        verified = verify and all(wanted[p] is not None for p in weights)
        return _Fetched(
            commit,
            files,
            weights,
            sum(f.stat().st_size for f in files.values()),
            verified,
            wanted,
            skipped_bytes=sum(sizes.get(p) or 0 for p in skipped),
            skipped=skipped,
        )

    @staticmethod
    def _load(identity: ModelIdentity, fetched: _Fetched, target: Target) -> None:
        paths = [fetched.files[p] for p in fetched.weights]
        planned = target.plan_for(manifest_from_files(identity, paths))
        try:
            buffers = target.prepare(planned)
        except MemoryError as exc:
            raise EdgeFailure(LocalFailure, f"allocation failed: {exc}") from exc
        for name, tensor in read_tensors(paths):
            mine = buffers.tensors.get(name)  # a module target takes only the tensors it has
            if mine is not None:
                mine.copy_(tensor)


def _verify(fetched: _Fetched) -> list[str]:
    """Paths whose sha256 differs from the hub's; their blobs are evicted from the cache."""
    bad = []
    for path, sha in fetched.sha256.items():
        if sha is not None and _sha256(fetched.files[path]) != sha:
            _evict(fetched.files[path])
            bad.append(path)
    return bad


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
