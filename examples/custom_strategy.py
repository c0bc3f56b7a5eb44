"""Write your own strategy and register it through an entry point.

This one loads safetensors from a local directory (a shared filesystem, a
baked-in image layer): no peer, so ``uses_peers = False`` and it gets one
attempt with no candidate. Register it in your package's ``pyproject.toml``::

    [project.entry-points."mx_orchestrator.strategies"]
    local_dir = "my_package.strategies:LocalDirectory"

and it is available by name: ``load_strategy("local_dir", directory=...)``
or ``mxo pull --strategies rdma_region,local_dir``.

Rules a strategy follows: return exactly one typed outcome (exceptions are for
bugs); do blocking work in a worker thread; release what you acquire even when
cancelled (the pipeline enforces deadlines by cancelling).
"""

from __future__ import annotations

from pathlib import Path

import anyio

from mx_orchestrator import ConfigError, Loaded, LocalFailure, ManifestMismatch, NotApplicable, Outcome
from mx_orchestrator.checkpoint import manifest_from_files, read_tensors, safetensors_files
from mx_orchestrator.strategy import AttemptContext
from mx_orchestrator.target import Target, TargetMismatch


class LocalDirectory:
    name = "local_dir"
    uses_peers = False

    def __init__(self, directory: str | Path | None = None) -> None:
        self.directory = Path(directory) if directory is not None else None

    async def attempt(self, ctx: AttemptContext) -> Outcome:
        if self.directory is None or not self.directory.is_dir():
            return NotApplicable(strategy=self.name, detail=f"no directory {self.directory}")
        if not isinstance(ctx.target, Target):
            return NotApplicable(strategy=self.name, detail="needs a mx_orchestrator Target")
        began = anyio.current_time()
        try:
            nbytes = await anyio.to_thread.run_sync(self._load, ctx)
        except TargetMismatch as exc:
            return ManifestMismatch(strategy=self.name, detail=str(exc))
        except (OSError, MemoryError, ConfigError) as exc:
            return LocalFailure(strategy=self.name, detail=str(exc))
        return Loaded(strategy=self.name, bytes_moved=nbytes, seconds=anyio.current_time() - began)

    def _load(self, ctx: AttemptContext) -> int:
        assert self.directory is not None
        files = safetensors_files(self.directory)
        target: Target = ctx.target
        buffers = target.prepare(target.plan_for(manifest_from_files(ctx.identity, files)))
        for name, tensor in read_tensors(files):
            buffers.tensors[name].copy_(tensor)
        return target.nbytes
