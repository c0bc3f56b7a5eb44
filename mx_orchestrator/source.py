"""The serving side: hold weights in memory in a chosen layout and offer them to peers.

:func:`load_weights` reads a directory of safetensors (or takes an engine's
tensors) into memory as ``arena``, ``tensor`` or ``chunked:SIZE`` and builds the
manifest, with a per-tensor xxh3 checksum computed once. :class:`WeightSource`
registers that memory with NIXL, publishes the record and manifest to the
registry, keeps UCX progressing for readers, heartbeats, and unpublishes on
shutdown (cancellation, SIGTERM/SIGINT through :func:`serve_until_signal`).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import structlog

from .errors import ConfigError
from .layout import LayoutSpec, parse_layout, plan_layout, regions_from_addresses
from .models import Manifest, ModelIdentity, SourceRecord
from .registry.base import SourceRegistry
from .target import Target, checksum_tensor, dtype_name, torch_dtype

if TYPE_CHECKING:
    import torch

__all__ = ["ServedWeights", "WeightSource", "load_weights", "safetensors_files", "serve_until_signal"]

_log = structlog.get_logger("mx_orchestrator.source")


@dataclass
class ServedWeights:
    """Weights in memory: the manifest, each region's (address, size), and the owning tensors."""

    manifest: Manifest
    spans: list[tuple[int, int]]
    device: str
    owners: list[torch.Tensor] = field(repr=False)
    tensors: dict[str, torch.Tensor] = field(repr=False)

    @property
    def mem_type(self) -> str:
        return "DRAM" if self.device == "cpu" else "VRAM"

    @classmethod
    def from_target(cls, target: Target) -> ServedWeights:
        """Offer what a target loaded (fan-out): same memory, no copy.

        Checksums come from the manifest the target was loaded from; tensors
        without one (an engine's own tensors) are hashed here, once.
        """
        if target.manifest is None:
            raise ConfigError("the target holds no weights yet")
        tensors = target.tensors()
        specs = tuple(
            s if s.checksum is not None else replace(s, checksum=checksum_tensor(tensors[s.name]))
            for s in target.manifest.tensors
        )
        manifest = Manifest(target.manifest.identity, specs, target.manifest.regions)
        return cls(manifest, target.region_spans(), target.device, [], tensors)

    @property
    def device_id(self) -> int:
        return 0 if self.device == "cpu" else int(self.device.partition(":")[2] or 0)


def safetensors_files(directory: Path) -> list[Path]:
    """The checkpoint's files in order: from ``model.safetensors.index.json`` when present."""
    if not directory.is_dir():
        raise ConfigError(f"weights directory {str(directory)!r} does not exist")
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        names = list(dict.fromkeys(weight_map.values()))
        files = []
        for name in names:
            path = (directory / name).resolve()
            if directory.resolve() not in path.parents:
                raise ConfigError(f"index names a file outside the checkpoint: {name!r}")
            files.append(path)
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"no *.safetensors files in {str(directory)!r}")
    return files


def _read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for path in safetensors_files(directory):
        for name, tensor in load_file(str(path)).items():
            if name in tensors:
                raise ConfigError(f"tensor {name!r} appears in more than one file")
            tensors[name] = tensor
    return tensors


def load_weights(
    identity: ModelIdentity,
    weights: str | Path | Mapping[str, torch.Tensor],
    layout: str | LayoutSpec = "arena",
    device: str = "cpu",
) -> ServedWeights:
    """Copy weights into memory laid out as ``layout`` on ``device``; checksums are computed here, once."""
    import torch

    spec = parse_layout(layout) if isinstance(layout, str) else layout
    tensors = _read_safetensors(Path(weights)) if isinstance(weights, (str, Path)) else dict(weights)
    if not tensors:
        raise ConfigError("no tensors to serve")
    sums = {name: checksum_tensor(t) for name, t in tensors.items()}
    rows = [(name, dtype_name(t.dtype), tuple(t.shape)) for name, t in tensors.items()]
    dev = torch.device(device)
    if spec.kind == "tensor":
        placed = {name: t.detach().to(dev, copy=True).contiguous() for name, t in tensors.items()}
        manifest, bases = regions_from_addresses(
            identity,
            [(n, d, s, placed[n].data_ptr(), sums[n]) for n, d, s in rows],
            merge_adjacent=dev.type == "cpu",
        )
        spans = [(b, r.nbytes) for b, r in zip(bases, manifest.regions, strict=True)]
        return ServedWeights(manifest, spans, device, list(placed.values()), placed)
    planned = plan_layout(identity, rows, spec)
    owners = [torch.empty(r.nbytes, dtype=torch.uint8, device=dev) for r in planned.regions]
    views: dict[str, torch.Tensor] = {}
    for s in planned.tensors:
        view = owners[s.region][s.offset : s.end].view(torch_dtype(s.dtype)).view(s.shape)
        view.copy_(tensors[s.name])
        views[s.name] = view
    manifest = Manifest(
        identity,
        tuple(type(s)(s.name, s.dtype, s.shape, s.region, s.offset, sums[s.name]) for s in planned.tensors),
        planned.regions,
    )
    spans = [(int(o.data_ptr()), r.nbytes) for o, r in zip(owners, manifest.regions, strict=True)]
    return ServedWeights(manifest, spans, device, owners, views)


class WeightSource:
    """Offers :class:`ServedWeights` to peers until cancelled.

    >>> async with anyio.create_task_group() as tg:
    ...     source = WeightSource(registry, weights)
    ...     await tg.start(source.run)
    """

    def __init__(
        self,
        registry: SourceRegistry,
        weights: ServedWeights,
        *,
        source_id: str | None = None,
        ttl: float = 15.0,
        labels: Mapping[str, str] | None = None,
        agent: Any = None,
        poll_interval: float = 0.001,
        metrics: Any = None,
        drain_timeout: float = 5.0,
    ) -> None:
        self.registry = registry
        self.weights = weights
        self.source_id = source_id or f"{socket.gethostname()}-{os.getpid()}"
        self.generation = uuid.uuid4().hex
        self.ttl = ttl
        self.labels = dict(labels or {"host": socket.gethostname()})
        self._agent = agent
        self._poll_interval = poll_interval
        self._metrics = metrics  # a mx_orchestrator.metrics.SourceMetrics, or None
        self.drain_timeout = drain_timeout
        self.record: SourceRecord | None = None

    def _build_record(self, agent: Any) -> SourceRecord:
        w = self.weights
        return SourceRecord(
            source_id=self.source_id,
            identity_key=w.manifest.identity.key,
            generation=self.generation,
            endpoint=f"nixl://{agent.name}",
            heartbeat_at=time.time(),
            ttl=self.ttl,
            labels=self.labels,
            transport={
                "nixl_agent": agent.name,
                "nixl_metadata": base64.b64encode(agent.metadata()).decode(),
                "nixl_mem": w.mem_type,
                "nixl_regions": json.dumps([[a, n, w.device_id] for a, n in w.spans]),
            },
        )

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[SourceRecord] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        from strategies._nixl import get_agent

        agent = self._agent or get_agent()
        w = self.weights
        deregister = agent.register([(a, n, w.device_id) for a, n in w.spans], w.mem_type)
        log = _log.bind(source=self.source_id, model=w.manifest.identity.key)
        try:
            self.record = self._build_record(agent)
            await self.registry.publish(self.record, w.manifest)
            log.info("source.published", regions=len(w.spans), bytes=w.manifest.total_bytes)
            if self._metrics is not None:
                self._metrics.published.set(1)
                self._metrics.bytes.set(w.manifest.total_bytes)
                self._metrics.regions.set(len(w.spans))
            task_status.started(self.record)
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._heartbeat, log)
                await self._progress(agent)
        finally:
            with anyio.CancelScope(shield=True):
                await self._drain(agent, log)
                try:
                    with anyio.fail_after(2):
                        await self.registry.remove(self.source_id, self.generation)
                    log.info("source.unpublished")
                except Exception as exc:  # the TTL will retire the record anyway
                    log.warning("source.unpublish_failed", error=str(exc))
                deregister()
                if self._metrics is not None:
                    self._metrics.published.set(0)

    async def _drain(self, agent: Any, log: Any) -> None:
        """DRAINING: no new readers are sent here; wait (bounded) for the ones reading now, driving UCX."""
        if self.record is None:
            return
        deadline = anyio.current_time() + self.drain_timeout
        try:
            with anyio.fail_after(2):
                record = await self.registry.drain(self.source_id, self.generation)
            while record is not None and record.load > 0 and anyio.current_time() < deadline:
                agent.poll_notifications()
                await anyio.sleep(0.01)
                record = await self.registry.get(self.source_id)
        except Exception as exc:  # shutting down anyway
            log.warning("source.drain_failed", error=str(exc))

    async def _heartbeat(self, log: Any) -> None:
        while True:
            await anyio.sleep(self.ttl / 3)
            try:
                with anyio.fail_after(max(1.0, self.ttl / 3)):
                    alive = await self.registry.heartbeat(self.source_id, self.generation)
                    if alive is None and self.record is not None:
                        # the registry lost us (restarted, or our record expired
                        # during an outage): publish again
                        await self.registry.publish(self.record, self.weights.manifest)
                        log.info("source.republished")
                if self._metrics is not None:
                    self._metrics.heartbeats.labels(ok="true").inc()
            except Exception as exc:  # an outage must not kill the source; keep trying
                log.warning("source.heartbeat_failed", error=str(exc))
                if self._metrics is not None:
                    self._metrics.heartbeats.labels(ok="false").inc()

    async def _progress(self, agent: Any) -> None:
        # readers hang unless the source side drives UCX (no NIXL progress thread)
        while True:
            arrived = agent.poll_notifications()
            if arrived and self._metrics is not None:
                self._metrics.notifications.inc(arrived)
            await anyio.sleep(self._poll_interval)


async def serve_until_signal(
    source: WeightSource, on_ready: Callable[[SourceRecord], None] | None = None
) -> None:
    """Run ``source`` until SIGINT or SIGTERM, then unpublish and return."""
    async with anyio.create_task_group() as tg:
        record = await tg.start(source.run)
        if on_ready is not None:
            on_ready(record)
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                break
        tg.cancel_scope.cancel()
