"""The peer attempt: a pure :func:`check` of everything decidable before I/O, then a short :func:`transfer`.

:func:`check` reads the candidate's advertisement (untrusted: its transport
fields are validated against its manifest: region count and sizes, memory
type, metadata size), asks the target which manifest it will have, and plans
the descriptors with the strategy's pure read planner. It returns a
:class:`PullPlan` or the outcome that ends the attempt (``LayoutMismatch``,
``ManifestMismatch``, ``SourceUnreachable``, ``NotApplicable``), having moved
and allocated nothing.

:func:`transfer` carries a plan out through an :class:`~._backends.rdma.RdmaAgent`:
allocate (if the target has no memory yet), register, connect, READ under the
attempt's deadline, verify. Every failure arrives as an
:class:`~._backends.EdgeFailure` already mapped to its outcome type; the
registration and the remote agent are released on every path.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio

from ._backends import EdgeFailure
from ._backends.rdma import RdmaAgent, descriptor_rows
from .errors import ConfigError
from .layout import Descriptors
from .models import Candidate, Manifest
from .outcomes import (
    Corrupt,
    LayoutMismatch,
    Loaded,
    LocalFailure,
    ManifestMismatch,
    NotApplicable,
    Outcome,
    SourceUnreachable,
)
from .strategy import AttemptContext
from .target import Target, TargetMismatch

__all__ = ["PeerAdvert", "PeerStrategy", "PullPlan", "ReadPlanner", "check", "parse_advert", "transfer"]

_MAX_METADATA_BYTES = 1 << 20

#: The pure descriptor planner: (source, remote spans, target, local spans) -> descriptors or a reason.
ReadPlanner = Callable[
    [Manifest, list[tuple[int, int]], Manifest, list[tuple[int, int]]],
    "tuple[Descriptors, Descriptors] | str",
]

# Local descriptors are planned before the target's memory exists, against
# virtual region bases this far apart, and relocated onto the real bases once
# allocated: region i starts at i << _REGION_SHIFT, beyond any region a valid
# manifest can describe (MAX_TOTAL_BYTES is 2**50; Python integers do not overflow).
_REGION_SHIFT = 51


@dataclass(frozen=True)
class PeerAdvert:
    agent_name: str
    metadata: bytes
    mem_type: str
    spans: list[tuple[int, int]]
    device_id: int


def parse_advert(transport: Any, manifest: Manifest) -> PeerAdvert | str:
    """Validate a record's NIXL fields against its manifest; a string says what is wrong."""
    try:
        name = transport["nixl_agent"]
        raw = transport["nixl_metadata"]
        mem = transport.get("nixl_mem", "DRAM")
        regions = json.loads(transport["nixl_regions"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        return f"record does not advertise NIXL ({type(exc).__name__}: {exc})"
    if mem not in ("DRAM", "VRAM"):
        return f"unknown memory type {mem!r}"
    if not isinstance(raw, str) or len(raw) > _MAX_METADATA_BYTES * 4 // 3 + 4:
        return "NIXL metadata missing or oversized"
    try:
        metadata = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        return "NIXL metadata is not base64"
    if not isinstance(regions, list) or len(regions) != len(manifest.regions):
        count = len(regions) if isinstance(regions, list) else "?"
        return f"record advertises {count} regions, manifest has {len(manifest.regions)}"
    spans: list[tuple[int, int]] = []
    device_ids: set[int] = set()
    for i, row in enumerate(regions):
        if (
            not isinstance(row, list)
            or len(row) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in row)
        ):
            return f"region {i} of the advertisement is malformed"
        address, nbytes, device = row
        if nbytes != manifest.regions[i].nbytes or address + nbytes >= 1 << 64:
            return f"region {i}: advertised {nbytes} bytes, manifest says {manifest.regions[i].nbytes}"
        spans.append((address, nbytes))
        device_ids.add(device)
    if len(device_ids) > 1:
        return "regions on several devices are not supported"
    return PeerAdvert(str(name), metadata, mem, spans, device_ids.pop() if device_ids else 0)


@dataclass(frozen=True)
class PullPlan:
    """Everything a transfer needs, decided before any I/O."""

    advert: PeerAdvert
    source: Manifest
    local_manifest: Manifest
    #: ``(local region, offset in it, nbytes)`` per descriptor
    local: tuple[tuple[int, int, int], ...]
    #: ``(remote address, nbytes)`` per descriptor
    remote: tuple[tuple[int, int], ...]

    @property
    def nbytes(self) -> int:
        return sum(n for _, n in self.remote)

    def local_blocks(self, spans: list[tuple[int, int]]) -> Descriptors:
        """The local descriptors on the target's real region bases."""
        return [(spans[region][0] + offset, n) for region, offset, n in self.local]


def check(
    candidate: Candidate | None,
    target: object,
    planner: ReadPlanner,
    *,
    strategy: str,
    refusal_is_layout: bool,
) -> PullPlan | Outcome:
    """Decide a peer attempt without I/O: the plan, or the outcome that ends it (0 bytes moved)."""
    sid = candidate.source_id if candidate is not None else None
    if candidate is None or candidate.manifest is None:
        return SourceUnreachable(strategy=strategy, source_id=sid, detail="no manifest from evaluation")
    if not isinstance(target, Target):
        return NotApplicable(
            strategy=strategy, source_id=sid, detail="the target is not a mx_orchestrator Target"
        )
    source = candidate.manifest
    advert = parse_advert(candidate.record.transport, source)
    if isinstance(advert, str):
        return SourceUnreachable(strategy=strategy, source_id=sid, detail=advert)
    try:
        local_manifest = target.plan_for(source)
    except TargetMismatch as exc:
        return ManifestMismatch(strategy=strategy, source_id=sid, detail=str(exc))
    virtual = [(i << _REGION_SHIFT, r.nbytes) for i, r in enumerate(local_manifest.regions)]
    planned = planner(source, advert.spans, local_manifest, virtual)
    if isinstance(planned, str):
        if refusal_is_layout:
            return LayoutMismatch(
                strategy=strategy,
                source_id=sid,
                detail=planned,
                source_regions=len(source.regions),
                target_regions=len(local_manifest.regions),
            )
        return ManifestMismatch(strategy=strategy, source_id=sid, detail=planned)
    local, remote = planned
    mask = (1 << _REGION_SHIFT) - 1
    return PullPlan(
        advert,
        source,
        local_manifest,
        tuple((a >> _REGION_SHIFT, a & mask, n) for a, n in local),
        tuple(remote),
    )


async def transfer(
    plan: PullPlan, target: Target, agent: RdmaAgent, ctx: AttemptContext, strategy: str
) -> Outcome:
    """Allocate, register, connect, READ, verify; every acquired resource released on every path."""
    began = anyio.current_time()
    sid = ctx.source_id

    def failed(exc: EdgeFailure) -> Outcome:
        return exc.outcome(strategy, sid, anyio.current_time() - began)

    try:
        buffers = target.prepare(plan.local_manifest)
    except (MemoryError, RuntimeError) as exc:  # torch's out-of-memory error is a RuntimeError
        return LocalFailure(
            strategy=strategy,
            source_id=sid,
            seconds=anyio.current_time() - began,
            detail=f"allocation failed: {exc}",
        )
    spans = buffers.spans
    try:
        release = agent.register([(a, n, buffers.device_id) for a, n in spans], buffers.mem_type)
    except EdgeFailure as exc:
        return failed(exc)
    remote_name: str | None = None
    try:
        remote_name = agent.connect(plan.advert.metadata)
        if remote_name != plan.advert.agent_name:
            return SourceUnreachable(
                strategy=strategy,
                source_id=sid,
                seconds=anyio.current_time() - began,
                detail=f"metadata names agent {remote_name!r}, record says {plan.advert.agent_name!r}",
            )
        seconds = await agent.read(
            remote_name,
            descriptor_rows(plan.local_blocks(spans), buffers.device_id),
            descriptor_rows(list(plan.remote), plan.advert.device_id),
            local_mem=buffers.mem_type,
            remote_mem=plan.advert.mem_type,
            deadline=ctx.deadline,
        )
    except EdgeFailure as exc:
        return failed(exc)
    finally:
        if remote_name is not None:
            agent.disconnect(remote_name)
        release()
    total = plan.nbytes
    if ctx.progress is not None:
        ctx.progress(total, total)
    detail = f"{len(plan.local)} descriptors"
    if not target.verify:
        return Loaded(strategy=strategy, source_id=sid, bytes_moved=total, seconds=seconds, detail=detail)
    verify_began = anyio.current_time()
    bad = await anyio.to_thread.run_sync(target.verify_against, plan.source)
    if bad:
        return Corrupt(
            strategy=strategy,
            source_id=sid,
            bytes_moved=total,
            seconds=anyio.current_time() - began,
            bad_tensors=tuple(bad[:32]),
            detail=f"{len(bad)} tensors failed their checksum, e.g. {bad[:3]}",
        )
    detail += f"; checksums verified in {anyio.current_time() - verify_began:.3f}s"
    return Loaded(
        strategy=strategy, source_id=sid, bytes_moved=total, seconds=seconds, verified=True, detail=detail
    )


class PeerStrategy:
    """Base of the RDMA strategies: each names its descriptor planner and what a refused plan means.

    ``agent``: the :class:`~._backends.rdma.RdmaAgent` to transfer with
    (default: the process-wide NIXL agent, created on first use).
    """

    name = "peer"
    uses_peers = True
    #: the pure planner: (source, remote spans, target, local spans) -> descriptors or a reason
    plan: ReadPlanner
    #: whether a refused plan is a LayoutMismatch (else a ManifestMismatch)
    refusal_is_layout = False

    def __init__(self, *, agent: RdmaAgent | None = None) -> None:
        self.agent = agent

    @classmethod
    def from_options(cls, options: Any) -> PeerStrategy:
        """Entry-point factory: the CLI's options do not concern peer strategies."""
        return cls()

    def _agent(self) -> RdmaAgent | str:
        if self.agent is not None:
            return self.agent
        from ._backends.nixl import get_agent

        try:
            return get_agent()
        except ConfigError as exc:
            return str(exc)

    async def attempt(self, ctx: AttemptContext) -> Outcome:
        plan = check(
            ctx.candidate,
            ctx.target,
            type(self).plan,
            strategy=self.name,
            refusal_is_layout=self.refusal_is_layout,
        )
        if not isinstance(plan, PullPlan):
            return plan
        agent = self._agent()
        if isinstance(agent, str):
            return NotApplicable(strategy=self.name, source_id=ctx.source_id, detail=agent)
        assert isinstance(ctx.target, Target)  # check() returned a plan only for a Target
        return await transfer(plan, ctx.target, agent, ctx, self.name)
