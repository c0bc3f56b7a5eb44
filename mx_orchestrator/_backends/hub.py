"""The HuggingFace Hub edge: the only module that imports huggingface_hub (and its HTTP client).

:class:`HubClient` makes the two calls ``hf_download`` needs: one
``model_info(files_metadata=True)`` (the commit and every file's LFS sha256)
and one ``snapshot_download`` of exactly the files chosen from it, into the
normal cache (HF_HOME, HF_ENDPOINT, HF_TOKEN and offline mode are respected).
Each is retried with tenacity's exponential backoff inside the attempt's
deadline when the failure is transient. Failures are mapped once, by class, to
outcome types (:func:`map_hub_error`).
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import tenacity

from ..outcomes import LocalFailure, SourceFailed, SourceUnreachable, TimedOut
from . import EdgeFailure

__all__ = ["HubClient", "HubFile", "HubListing", "hub_available", "map_hub_error"]

T = TypeVar("T")


def hub_available() -> str | None:
    """``None`` when huggingface_hub can be used, else why not."""
    try:
        import huggingface_hub  # noqa: F401
    except ImportError as exc:
        return f"huggingface_hub is not installed: {exc}"
    return None


@dataclass(frozen=True)
class HubFile:
    path: str  # untrusted: vetted by the caller
    sha256: str | None  # of LFS files, as the Hub lists it
    size: int | None = None


@dataclass(frozen=True)
class HubListing:
    commit: str
    files: tuple[HubFile, ...]


def map_hub_error(exc: BaseException) -> EdgeFailure:
    """The outcome a huggingface_hub / HTTP failure means, and whether retrying may help."""
    import httpx
    from huggingface_hub import errors as hf

    text = str(exc).splitlines()[0] if str(exc) else ""
    detail = f"{type(exc).__name__}: {text}"[:400]
    if isinstance(exc, hf.GatedRepoError):
        return EdgeFailure(SourceUnreachable, f"unauthorized (gated repo or bad token): {detail}")
    if isinstance(exc, (hf.RepositoryNotFoundError, hf.RevisionNotFoundError, hf.EntryNotFoundError)):
        return EdgeFailure(SourceUnreachable, detail)
    if isinstance(exc, hf.RemoteEntryNotFoundError):
        return EdgeFailure(SourceUnreachable, detail)
    if isinstance(exc, (hf.OfflineModeIsEnabled, hf.LocalEntryNotFoundError)):
        return EdgeFailure(SourceUnreachable, f"offline and not cached: {detail}")
    if isinstance(exc, hf.HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            return EdgeFailure(SourceUnreachable, f"unauthorized: {detail}")
        return EdgeFailure(SourceFailed, detail, retry=status is None or status >= 500 or status == 429)
    if isinstance(exc, (httpx.TimeoutException, TimeoutError)):
        return EdgeFailure(TimedOut, detail, retry=True)
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
        return EdgeFailure(LocalFailure, f"cannot write the cache: {detail}")
    # refused connections, resets, truncated bodies (huggingface_hub's "Consistency
    # check failed" is an OSError), protocol errors: the remote side, maybe transient
    return EdgeFailure(SourceFailed, detail, retry=True)


class HubClient:
    def __init__(
        self,
        *,
        endpoint: str | None,
        token: str | None,
        cache_dir: Path | None,
        request_timeout: float,
        max_tries: int,
    ) -> None:
        self.endpoint = endpoint
        self.token = token
        self.cache_dir = cache_dir
        self.request_timeout = request_timeout
        self.max_tries = max_tries

    def __repr__(self) -> str:  # never shows the token
        return f"HubClient(endpoint={self.endpoint!r})"

    def _call(self, fn: Callable[[], T], wall_deadline: float) -> T:
        """``fn()`` with transient failures retried until ``wall_deadline``; failures mapped."""
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(lambda e: isinstance(e, EdgeFailure) and e.retry),
            wait=tenacity.wait_exponential(multiplier=0.1, max=2.0),
            stop=tenacity.stop_after_attempt(self.max_tries)
            | tenacity.stop_before_delay(max(0.0, wall_deadline - time.monotonic())),
            reraise=True,
        )
        for attempt in retrying:
            with attempt:
                try:
                    return fn()
                except EdgeFailure:
                    raise
                except Exception as exc:  # the edge: every third-party failure is mapped here, once
                    raise map_hub_error(exc) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def listing(self, repo: str, revision: str, wall_deadline: float) -> HubListing:
        from huggingface_hub import HfApi

        api = HfApi(endpoint=self.endpoint, token=self.token)
        info = self._call(
            lambda: api.model_info(
                repo, revision=revision, files_metadata=True, timeout=self.request_timeout
            ),
            wall_deadline,
        )
        files = []
        for sibling in info.siblings or []:
            lfs = getattr(sibling, "lfs", None)
            sha = getattr(lfs, "sha256", None) if lfs is not None else None
            size = getattr(sibling, "size", None)
            files.append(
                HubFile(
                    str(getattr(sibling, "rfilename", "")),
                    str(sha) if sha else None,
                    size if isinstance(size, int) and not isinstance(size, bool) and size >= 0 else None,
                )
            )
        return HubListing(str(info.sha or revision), tuple(files))

    def snapshot(
        self,
        repo: str,
        commit: str,
        paths: Sequence[str],
        wall_deadline: float,
        on_bytes: Callable[[int], None] | None = None,
    ) -> Path:
        """Download exactly ``paths`` of ``repo@commit`` (parallel transfers, the normal cache)."""
        import glob

        from huggingface_hub import snapshot_download
        from tqdm.auto import tqdm

        class Silent(tqdm):  # type: ignore[misc]
            """Progress goes through the attempt's callback, not to the terminal."""

            def __init__(self, *args: Any, **kwargs: Any) -> None:
                kwargs["disable"] = True
                super().__init__(*args, **kwargs)

            def update(self, n: float | None = 1) -> bool | None:
                if on_bytes is not None and getattr(self, "unit", "") == "B":
                    on_bytes(int(n or 0))
                return super().update(n)  # type: ignore[no-any-return]

        patterns = [glob.escape(p) for p in paths]
        return Path(
            self._call(
                lambda: snapshot_download(
                    repo,
                    revision=commit,
                    endpoint=self.endpoint,
                    token=self.token,
                    cache_dir=self.cache_dir,
                    allow_patterns=patterns,
                    etag_timeout=self.request_timeout,
                    tqdm_class=Silent,
                ),
                wall_deadline,
            )
        )
