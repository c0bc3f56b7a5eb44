"""The serving side: hold weights in memory in a chosen layout and offer them to peers.

:func:`load_weights` reads a directory of safetensors (or takes an engine's
tensors) into memory as ``arena``, ``tensor`` or ``chunked:SIZE`` through the
one buffer allocator and builds the manifest, with a per-tensor checksum
computed once. :class:`WeightSource`
registers that memory with NIXL, publishes the record and manifest to the
registry, keeps UCX progressing for readers, heartbeats, and unpublishes on
shutdown (cancellation, SIGTERM/SIGINT through :func:`serve_until_signal`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import structlog

from ._backends import EdgeFailure
from ._backends.rdma import RdmaAgent
from .buffers import Buffers, allocate
from .checkpoint import read_tensors, safetensors_files
from .config import check_count, check_max_lease, check_seconds, check_source_id
from .errors import ConfigError
from .holdings import Holdings, encode_holdings
from .layout import LayoutSpec, parse_layout, plan_layout
from .models import DEFAULT_MAX_LEASE, ModelIdentity, SourceRecord, dtype_name
from .pullplan import encode_advert
from .registry.base import SourceRegistry, is_expired

if TYPE_CHECKING:
    import torch

__all__ = ["DEFAULT_MAX_READERS", "ServedWeights", "WeightSource", "load_weights", "serve_until_signal"]

_log = structlog.get_logger("mx_orchestrator.source")

#: Readers a source admits at once by default: enough for a fan-out tree to grow, few enough that
#: each reader keeps a useful share of the source's memory bandwidth or link.
DEFAULT_MAX_READERS = 8


#: Weights a source serves: the one buffer type of targets and sources.
ServedWeights = Buffers


def load_weights(
    identity: ModelIdentity,
    weights: str | Path | Mapping[str, torch.Tensor],
    layout: str | LayoutSpec = "arena",
    device: str = "cpu",
) -> Buffers:
    """Copy weights into memory laid out as ``layout`` on ``device``; checksums are computed here, once.

    ``weights`` is a checkpoint directory (read with the rules of
    :mod:`~mx_orchestrator.checkpoint`) or an engine's tensors.
    """
    spec = parse_layout(layout) if isinstance(layout, str) else layout
    if isinstance(weights, (str, Path)):
        tensors = dict(read_tensors(safetensors_files(Path(weights))))
    else:
        tensors = dict(weights)
    if not tensors:
        raise ConfigError("no tensors to serve")
    rows = [(name, dtype_name(t.dtype), tuple(t.shape)) for name, t in tensors.items()]
    buffers = allocate(plan_layout(identity, rows, spec), device, prefault=False)
    for name, tensor in tensors.items():
        buffers.tensors[name].copy_(tensor)
    return buffers.with_checksums()


def source_id_or_default(source_id: str | None) -> str:
    """``source_id`` checked, or when none is given this host and process."""
    return check_source_id(f"{socket.gethostname()}-{os.getpid()}" if source_id is None else source_id)


class WeightSource:
    """Offers :class:`ServedWeights` to peers until cancelled.

    >>> async with anyio.create_task_group() as tg:
    ...     source = WeightSource(registry, weights)
    ...     await tg.start(source.run)
    """

    def __init__(
        self,
        registry: SourceRegistry,
        weights: Buffers,
        *,
        source_id: str | None = None,
        ttl: float = 15.0,
        labels: Mapping[str, str] | None = None,
        agent: RdmaAgent | None = None,
        poll_interval: float = 0.001,
        metrics: Any = None,
        drain_timeout: float = 5.0,
        interfaces: Sequence[str] = (),
        max_readers: int = DEFAULT_MAX_READERS,
        max_lease: float = DEFAULT_MAX_LEASE,
        hops: int = 0,
        reader_watch: float = 0.05,
        holdings: Holdings | None = None,
    ) -> None:
        check_seconds("ttl", ttl)
        check_seconds("drain_timeout", drain_timeout)
        check_seconds("poll_interval", poll_interval)
        self.registry = registry
        self.weights = weights
        self.source_id = source_id_or_default(source_id)
        self.generation = uuid.uuid4().hex
        self.ttl = ttl
        self.labels = dict(labels or {"host": socket.gethostname()})
        self._agent = agent
        self._poll_interval = poll_interval
        self._metrics = metrics  # a mx_orchestrator.metrics.SourceMetrics, or None
        self.drain_timeout = drain_timeout
        self.interfaces = tuple(interfaces)
        #: targets reading at once; a new one beyond it is refused before any byte moves (0: no cap)
        self.max_readers = check_count("max_readers", max_readers, minimum=0)
        #: the longest reader lease this source grants (a crashed reader holds a slot this long at most)
        self.max_lease = check_max_lease(max_lease)
        #: 0 for a seed; a republished target is one more than the source it loaded from
        self.hops = check_count("hops", hops, minimum=0, maximum=1 << 16)
        #: with metrics, how often the source samples its readers' leases
        self.reader_watch = check_seconds("reader_watch", reader_watch)
        self.record: SourceRecord | None = None
        #: a target still loading: serves what ``holdings`` marks, publishes whole once complete
        self.holdings = holdings
        if holdings is not None and holdings.manifest is None:
            raise ConfigError("a partial source starts once its holdings began (its memory exists)")

    def _build_record(self, agent: RdmaAgent, extra: Mapping[str, str]) -> SourceRecord:
        w = self.weights
        return SourceRecord(
            source_id=self.source_id,
            identity_key=w.manifest.identity.key,
            generation=self.generation,
            endpoint=f"nixl://{agent.name}",
            heartbeat_at=time.time(),
            ttl=self.ttl,
            labels=self.labels,
            max_readers=self.max_readers,
            max_lease=self.max_lease,
            hops=self.hops,
            partial=self.holdings is not None and not self.holdings.complete.is_set(),
            transport={
                **encode_advert(agent.name, agent.metadata(), w.mem_type, w.spans, w.device_id),
                **extra,
            },
        )

    def _export_ipc(self, log: Any) -> dict[str, str] | None:
        """GPU weights: their CUDA IPC handles for same-host targets (``cuda_ipc``); ``None`` on the host."""
        if self.weights.device == "cpu":
            return None
        from ._backends import cuda_ipc

        try:
            return cuda_ipc.export(self.weights, f"{self.source_id}-{self.generation}")
        except (EdgeFailure, RuntimeError, OSError) as exc:  # the NIXL strategies still serve
            log.warning("source.cuda_ipc_unavailable", error=str(exc))
            return None

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[SourceRecord] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        if self._agent is not None:
            agent = self._agent
        else:
            from ._backends.nixl import get_agent

            # interfaces: what the transport listens on and advertises (e.g. loopback only)
            agent = get_agent(interfaces=self.interfaces)
        w = self.weights
        holdings = self.holdings
        try:
            deregister = agent.register([(a, n, w.device_id) for a, n in w.spans], w.mem_type)
            if holdings is not None:
                release_holdings = agent.register([(*holdings.block, 0)], "DRAM")
        except EdgeFailure as exc:  # nothing was published: the weights cannot be offered at all
            raise ConfigError(f"cannot offer the weights: {exc.detail}") from exc
        log = _log.bind(source=self.source_id, model=w.manifest.identity.key)
        # a partial GPU source offers no CUDA IPC until whole (that strategy reads the whole model)
        ipc = self._export_ipc(log) if holdings is None else None
        try:
            extra = {"cuda_ipc": json.dumps(ipc)} if ipc else {}
            if holdings is not None:
                extra.update(encode_holdings(holdings.block))
            self.record = self._build_record(agent, extra)
            await self.registry.publish(self.record, w.manifest)
            log.info("source.published", regions=len(w.spans), bytes=w.manifest.total_bytes)
            if self._metrics is not None:
                self._metrics.published.set(1)
                self._metrics.bytes.set(w.manifest.total_bytes)
                self._metrics.regions.set(len(w.spans))
                self._metrics.readers_cap.set(self.max_readers)
            task_status.started(self.record)
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._heartbeat, log)
                if self._metrics is not None:
                    tg.start_soon(self._watch_readers)
                if self.record.partial and holdings is not None:
                    tg.start_soon(self._whole_when_complete, holdings, log)
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
                if holdings is not None:
                    release_holdings()
                if ipc is not None:
                    from ._backends import cuda_ipc

                    cuda_ipc.unexport(ipc)
                if self._metrics is not None:
                    self._metrics.published.set(0)

    async def _whole_when_complete(self, holdings: Holdings, log: Any) -> None:
        """Every tensor landed verified: publish once more, whole (readers stop asking holdings)."""
        await holdings.complete.wait()
        assert self.record is not None
        self.record = replace(self.record, partial=False, heartbeat_at=time.time())
        await self.registry.publish(self.record, self.weights.manifest)
        log.info("source.whole", bytes=self.weights.manifest.total_bytes)

    async def _drain(self, agent: RdmaAgent, log: Any) -> None:
        """DRAINING: no new readers are sent here; wait (bounded) for the ones reading now, driving UCX."""
        if self.record is None:
            return
        deadline = anyio.current_time() + self.drain_timeout
        try:
            with anyio.fail_after(2):
                record = await self.registry.drain(self.source_id, self.generation)
            # live leases only: a reader that crashed stops renewing and no longer holds us up
            while (
                record is not None
                and record.live_readers(time.time()) > 0
                and anyio.current_time() < deadline
            ):
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
                        await self._republish(log)
                if self._metrics is not None:
                    self._metrics.heartbeats.labels(ok="true").inc()
            except ConfigError:  # another live process serves under our id: stop
                raise
            except Exception as exc:  # an outage must not kill the source; keep trying
                log.warning("source.heartbeat_failed", error=str(exc))
                if self._metrics is not None:
                    self._metrics.heartbeats.labels(ok="false").inc()

    async def _republish(self, log: Any) -> None:
        """The registry lost our record (it restarted, or the record expired during an outage):
        publish again, unless another live process now serves under our id (two processes given
        one id would overwrite each other's record every heartbeat): then we stop, loudly."""
        current = await self.registry.get(self.source_id)
        if (
            current is not None
            and current.generation != self.generation
            and not is_expired(current, time.time())
        ):
            raise ConfigError(
                f"source id {self.source_id!r} was taken over by another live process (its record "
                f"{current.endpoint!r}): this one stops serving; give each process its own --source-id"
            )
        assert self.record is not None
        await self.registry.publish(self.record, self.weights.manifest)
        log.info("source.republished")

    async def _watch_readers(self) -> None:
        """With metrics: the live reader leases on our record, sampled every ``reader_watch`` seconds
        (reads are one-sided: the leases are what a source can know of its readers)."""
        assert self._metrics is not None
        while True:
            with contextlib.suppress(Exception):  # an outage: the next sample will tell
                record = await self.registry.get(self.source_id)
                if record is not None and record.generation == self.generation:
                    self._metrics.saw_readers(record.live_readers(time.time()))
            await anyio.sleep(self.reader_watch)

    async def _progress(self, agent: RdmaAgent) -> None:
        # readers hang unless the source side drives UCX (no NIXL progress thread)
        while True:
            arrived = agent.poll_notifications()
            if arrived and self._metrics is not None:
                self._metrics.notifications.inc(arrived)
            await anyio.sleep(self._poll_interval)


async def serve_until_signal(
    source: WeightSource, on_ready: Callable[[SourceRecord], None] | None = None
) -> None:
    """Run ``source`` until SIGINT or SIGTERM, then unpublish and return.

    The signals are caught before ``on_ready`` announces the source: whoever
    reacts to the announcement with a SIGTERM gets a clean unpublish, not the
    default handler's kill.
    """
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with anyio.create_task_group() as tg:
            record = await tg.start(source.run)
            if on_ready is not None:
                on_ready(record)
            async for _ in signals:
                break
            tg.cancel_scope.cancel()
