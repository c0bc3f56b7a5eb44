"""Public fakes for testing code that embeds mx_orchestrator (and for our own pipeline tests).

* :class:`FakeStrategy` plays a script of outcomes per source, with delays, and
  can wedge (never return until cancelled);
* :class:`FakeProber` answers evaluation probes with scripted latencies and failures;
* :class:`FakeRegistry` is the in-memory registry plus a call log and fault switches;
* :class:`FakeRdmaAgent` (on a :class:`FakeRdmaNetwork`) is the RDMA agent contract
  in one process, with real byte copies and scriptable faults (:class:`RdmaFaults`);
* :func:`make_manifest`, :func:`make_record` and :func:`scenario` build inputs;
* :func:`published_whole` waits until a republishing target serves the whole model.

Real components for integration tests, imported from their submodules:
:mod:`mx_orchestrator.testing.hub` (a loopback HuggingFace Hub with fault
switches) and :mod:`mx_orchestrator.testing.peers` (``mxo serve`` processes,
started, frozen, killed and always reaped).

Example::

    registry, prober = await scenario(identity, ["a", "b"])
    strategy = FakeStrategy("rdma_region", {"a": [fail(LayoutMismatch)], "b": [succeed()]})
    report = await Orchestrator(registry, [strategy], prober=prober).load(identity)
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import anyio

from ..errors import RegistryUnavailable
from ..layout import LayoutSpec, TensorShape, plan_layout
from ..models import Candidate, Manifest, ModelIdentity, SourceRecord, SourceState
from ..outcomes import Loaded, NotApplicable, Outcome
from ..registry.base import SourceRegistry
from ..registry.memory import MemoryRegistry
from ..strategy import AttemptContext, ProbeFailure
from .rdma import FakeRdmaAgent, FakeRdmaNetwork, RdmaFaults

__all__ = [
    "FakeProber",
    "FakeRdmaAgent",
    "FakeRdmaNetwork",
    "FakeRegistry",
    "FakeStrategy",
    "RdmaFaults",
    "Step",
    "fail",
    "make_manifest",
    "make_record",
    "publish_junk",
    "published_whole",
    "scenario",
    "succeed",
    "wedge",
]


@dataclass(frozen=True)
class Step:
    """One scripted attempt: wait ``delay`` seconds (forever if ``wedge``), then return ``outcome``."""

    outcome: type[Outcome]
    delay: float = 0.0
    bytes_moved: int = 0
    detail: str = ""
    wedge: bool = False
    extra: tuple[tuple[str, Any], ...] = ()


def succeed(*, delay: float = 0.0, nbytes: int = 1 << 20, verified: bool = True) -> Step:
    return Step(Loaded, delay, nbytes, "scripted success", extra=(("verified", verified),))


def fail(outcome: type[Outcome], *, delay: float = 0.0, detail: str = "", nbytes: int = 0) -> Step:
    return Step(outcome, delay, nbytes, detail or f"scripted {outcome.__name__}")


_NOT_SCRIPTED = Step(NotApplicable, detail="no script for this source")


def wedge() -> Step:
    """An attempt that never finishes on its own: only a deadline or a cancel ends it."""
    return Step(Loaded, wedge=True, detail="wedged")


class FakeStrategy:
    """A strategy that plays a script per source id (``None`` for a peerless strategy).

    Each attempt on a source takes the next step of its script; the last step
    repeats. Sources without a script play ``default``. ``calls`` logs every
    attempt; ``running`` counts attempts in flight (0 after a clean cancel).
    """

    def __init__(
        self,
        name: str,
        script: Mapping[str | None, Sequence[Step]] | None = None,
        *,
        default: Step | None = None,
        uses_peers: bool = True,
    ) -> None:
        self.name = name
        self.uses_peers = uses_peers
        self._script = {k: list(v) for k, v in (script or {}).items()}
        self._default = default or _NOT_SCRIPTED
        self._position: dict[str | None, int] = {}
        self.calls: list[tuple[str | None, int]] = []
        self.running = 0
        self.cancelled = 0

    def _next_step(self, source_id: str | None) -> Step:
        steps = self._script.get(source_id)
        if not steps:
            return self._default
        index = self._position.get(source_id, 0)
        self._position[source_id] = index + 1
        return steps[min(index, len(steps) - 1)]

    async def attempt(self, ctx: AttemptContext) -> Outcome:
        step = self._next_step(ctx.source_id)
        self.calls.append((ctx.source_id, ctx.attempt_number))
        began = anyio.current_time()
        self.running += 1
        try:
            if step.wedge:
                await anyio.sleep_forever()
            elif step.delay:
                await anyio.sleep(step.delay)
        except anyio.get_cancelled_exc_class():
            self.cancelled += 1
            raise
        finally:
            self.running -= 1
        return step.outcome(
            strategy=self.name,
            source_id=ctx.source_id,
            bytes_moved=step.bytes_moved,
            seconds=anyio.current_time() - began,
            detail=step.detail,
            **dict(step.extra),
        )


class FakeProber:
    """Answers probes after ``latency`` seconds (per source or default); ``failures`` fail."""

    def __init__(
        self,
        manifests: Mapping[str, Manifest] | None = None,
        *,
        latency: float | Mapping[str, float] = 0.0,
        failures: Iterable[str] = (),
        default_manifest: Manifest | None = None,
    ) -> None:
        self._manifests = dict(manifests or {})
        self._latency = latency
        self._failures = set(failures)
        self._default = default_manifest
        self.probed: list[str] = []
        self.running = 0

    async def probe(self, record: SourceRecord) -> Candidate | ProbeFailure:
        self.probed.append(record.source_id)
        delay = (
            self._latency.get(record.source_id, 0.0) if isinstance(self._latency, Mapping) else self._latency
        )
        self.running += 1
        try:
            await anyio.sleep(delay)
        finally:
            self.running -= 1
        if record.source_id in self._failures:
            return ProbeFailure(record.source_id, "scripted probe failure")
        return Candidate(record, self._manifests.get(record.source_id, self._default))


class FakeRegistry(MemoryRegistry):
    """The in-memory registry with a log of calls and a switch that makes it unreachable."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        super().__init__(clock=clock)
        self.calls: list[tuple[str, str]] = []
        self.unavailable = False

    def _enter(self, op: str, arg: str = "") -> None:
        self.calls.append((op, arg))
        if self.unavailable:
            raise RegistryUnavailable(f"fake registry is down ({op})")

    async def publish(self, record: SourceRecord, manifest: Manifest | None = None) -> None:
        self._enter("publish", record.source_id)
        await super().publish(record, manifest)

    async def list(
        self, identity_key: str | None = None, state: SourceState | None = SourceState.READY
    ) -> list[SourceRecord]:
        self._enter("list", identity_key or "")
        return await super().list(identity_key, state)

    async def heartbeat(self, source_id: str, generation: str) -> SourceRecord | None:
        self._enter("heartbeat", source_id)
        return await super().heartbeat(source_id, generation)

    async def drain(self, source_id: str, generation: str) -> SourceRecord | None:
        self._enter("drain", source_id)
        return await super().drain(source_id, generation)

    async def report_unreachable(
        self, source_id: str, generation: str, *, reason: str, reporter: str = ""
    ) -> bool:
        self._enter("report_unreachable", source_id)
        return await super().report_unreachable(source_id, generation, reason=reason, reporter=reporter)

    async def lease_reader(self, source_id: str, generation: str, reader: str, seconds: float | None) -> bool:
        self._enter("lease_reader", source_id)
        return await super().lease_reader(source_id, generation, reader, seconds)

    async def release_readers(self, reader: str, leases: Sequence[tuple[str, str]]) -> None:
        self._enter("release_readers", ",".join(source_id for source_id, _ in leases))
        await super().release_readers(reader, leases)

    async def mark_stale(self, source_id: str, generation: str, *, reason: str, reporter: str = "") -> bool:
        self._enter("mark_stale", source_id)
        return await super().mark_stale(source_id, generation, reason=reason, reporter=reporter)

    async def get_manifest(self, source_id: str, generation: str) -> Manifest | None:
        self._enter("get_manifest", source_id)
        return await super().get_manifest(source_id, generation)

    async def get_manifest_blob(self, key: str) -> bytes | None:
        self._enter("get_manifest_blob", key)
        return await super().get_manifest_blob(key)

    def state_of(self, source_id: str) -> SourceState | None:
        record = self._records.get(source_id)
        return record.state if record else None


def make_manifest(
    identity: ModelIdentity,
    tensors: Sequence[TensorShape] | int = 4,
    *,
    layout: str | LayoutSpec = "arena",
) -> Manifest:
    """A manifest for ``tensors`` (or that many small F32 tensors) in an arena or chunked layout."""
    from ..layout import parse_layout

    spec = parse_layout(layout) if isinstance(layout, str) else layout
    if isinstance(tensors, int):
        tensors = [(f"layer.{i}.weight", "F32", (16, 16)) for i in range(tensors)]
    return plan_layout(identity, tensors, spec)


def make_record(
    identity: ModelIdentity, source_id: str, *, load: int = 0, ttl: float = 60.0, **labels: str
) -> SourceRecord:
    return SourceRecord(
        source_id=source_id,
        identity_key=identity.key,
        generation=uuid.uuid4().hex,
        endpoint=f"fake://{source_id}",
        load=load,
        ttl=ttl,
        heartbeat_at=time.time(),
        labels=labels,
        # ``load`` readers, each holding a lease for an hour
        readers={f"reader-{i}": time.time() + 3600.0 for i in range(load)},
    )


async def published_whole(registry: SourceRegistry, source_id: str, *, poll: float = 0.05) -> SourceRecord:
    """``source_id``'s record once it is published whole (a republishing target whose load ended:
    it publishes itself on its own schedule, so this polls); bound it with ``anyio.fail_after``."""
    while True:
        record = await registry.get(source_id)
        if record is not None and not record.partial:
            return record
        await anyio.sleep(poll)


async def publish_junk(
    registry: Any,
    like: str,
    count: int,
    *,
    manifest: Manifest | None = None,
    prefix: str = "junk",
    metadata: str = "Z2FyYmFnZQ==",
) -> list[str]:
    """Publish ``count`` records no source stands behind, as anyone who can write the registry can:
    ``like``'s record and manifest (or ``manifest``: a relabelled one, another size) with garbage
    connection metadata (well-formed base64, refused at connect). Returns their ids, in order."""
    honest = await registry.get(like)
    if honest is None:
        raise ValueError(f"no record {like!r} to copy")
    published = manifest if manifest is not None else await registry.get_manifest(like, honest.generation)
    transport = {**honest.transport, "nixl_metadata": metadata}
    ids = [f"{prefix}-{i:05d}" for i in range(count)]
    for i, sid in enumerate(ids):
        await registry.publish(
            replace(honest, source_id=sid, generation=f"{prefix}{i}", transport=transport), published
        )
    return ids


async def scenario(
    identity: ModelIdentity,
    source_ids: Sequence[str],
    *,
    manifest: Manifest | None = None,
    latency: float | Mapping[str, float] = 0.0,
    probe_failures: Iterable[str] = (),
) -> tuple[FakeRegistry, FakeProber]:
    """A registry with one READY record per source id and a prober that knows them all."""
    registry = FakeRegistry()
    manifest = manifest or make_manifest(identity)
    for source_id in source_ids:
        await registry.publish(make_record(identity, source_id), manifest)
    prober = FakeProber(latency=latency, failures=probe_failures, default_manifest=manifest)
    return registry, prober
