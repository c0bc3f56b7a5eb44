"""What the two RDMA strategies share: reading a peer's advertisement and running one pull.

A peer's record is untrusted: its transport fields are parsed and checked
against its manifest (region count and sizes, memory type, metadata size)
before anything reaches NIXL. The pull itself registers the target's regions,
connects, READs under the attempt's deadline, verifies checksums, and releases
the registration, the transfer handle and the remote agent on every path.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
import numpy as np

from mx_orchestrator.layout import Descriptors
from mx_orchestrator.models import Manifest
from mx_orchestrator.outcomes import (
    Corrupt,
    LayoutMismatch,
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
from mx_orchestrator.target import Target, TargetMismatch

from ._nixl import NixlAgent, NixlError, get_agent

__all__ = ["PeerAdvert", "PeerStrategy", "parse_advert", "run_pull"]

_MAX_METADATA_BYTES = 1 << 20

Planner = Callable[
    [Manifest, list[tuple[int, int]], Manifest, list[tuple[int, int]]],
    "tuple[Descriptors, Descriptors] | str",
]


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
    except (KeyError, TypeError, ValueError) as exc:
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


def _rows(descs: Descriptors, device_id: int) -> np.ndarray[Any, Any]:
    array = np.empty((len(descs), 3), dtype=np.uint64)
    for i, (address, nbytes) in enumerate(descs):
        array[i] = (address, nbytes, device_id)
    return array


async def run_pull(
    ctx: AttemptContext,
    strategy: str,
    plan: Planner,
    *,
    agent: NixlAgent | None = None,
    verify: bool = True,
    layout_mismatch: bool = False,
) -> Outcome:
    """Check, plan, connect, READ, verify. ``layout_mismatch`` says a refused plan is a layout question."""
    began = anyio.current_time()
    sid = ctx.source_id

    def elapsed() -> float:
        return anyio.current_time() - began

    candidate = ctx.candidate
    if candidate is None or candidate.manifest is None:
        return SourceUnreachable(strategy=strategy, source_id=sid, detail="no manifest from evaluation")
    target = ctx.target
    if not isinstance(target, Target):
        return NotApplicable(
            strategy=strategy, source_id=sid, detail="the target is not a mx_orchestrator Target"
        )
    source = candidate.manifest
    advert = parse_advert(candidate.record.transport, source)
    if isinstance(advert, str):
        return SourceUnreachable(strategy=strategy, source_id=sid, detail=advert)

    def mismatch(detail: str, local_manifest: Manifest) -> Outcome:
        if layout_mismatch:
            return LayoutMismatch(
                strategy=strategy,
                source_id=sid,
                seconds=elapsed(),
                detail=detail,
                source_regions=len(source.regions),
                target_regions=len(local_manifest.regions),
            )
        return ManifestMismatch(strategy=strategy, source_id=sid, seconds=elapsed(), detail=detail)

    # Dry run on the target's planned manifest first: a mismatch is known before
    # an agent exists, memory is allocated or anything is posted. Addresses are
    # irrelevant to that check, so each region is described from address 0.
    try:
        preview = target.preview(source)
    except TargetMismatch as exc:
        return ManifestMismatch(strategy=strategy, source_id=sid, seconds=elapsed(), detail=str(exc))
    if preview is not None:
        dry = plan(source, advert.spans, preview, [(0, r.nbytes) for r in preview.regions])
        if isinstance(dry, str):
            return mismatch(dry, preview)
    try:
        nixl = agent or get_agent()
    except NixlError as exc:
        return NotApplicable(strategy=strategy, source_id=sid, detail=str(exc))
    try:
        local_manifest = target.prepare(source)
    except TargetMismatch as exc:
        return ManifestMismatch(strategy=strategy, source_id=sid, seconds=elapsed(), detail=str(exc))
    except (MemoryError, RuntimeError) as exc:
        return LocalFailure(
            strategy=strategy, source_id=sid, seconds=elapsed(), detail=f"allocation failed: {exc}"
        )
    local_spans = target.region_spans()
    planned = plan(source, advert.spans, local_manifest, local_spans)
    if isinstance(planned, str):
        return mismatch(planned, local_manifest)
    local, remote = planned
    total = sum(n for _, n in local)

    try:
        deregister = nixl.register([(a, n, target.device_id) for a, n in local_spans], target.mem_type)
    except NixlError as exc:
        return LocalFailure(strategy=strategy, source_id=sid, seconds=elapsed(), detail=str(exc))
    remote_name: str | None = None
    try:
        try:
            remote_name = nixl.add_remote(advert.metadata)
        except Exception as exc:
            return SourceUnreachable(
                strategy=strategy,
                source_id=sid,
                seconds=elapsed(),
                detail=f"connect failed: {type(exc).__name__}: {exc}",
            )
        if remote_name != advert.agent_name:
            return SourceUnreachable(
                strategy=strategy,
                source_id=sid,
                seconds=elapsed(),
                detail=f"metadata names agent {remote_name!r}, record says {advert.agent_name!r}",
            )
        result = await nixl.read(
            remote_name,
            _rows(local, target.device_id),
            _rows(remote, advert.device_id),
            local_mem=target.mem_type,
            remote_mem=advert.mem_type,
            deadline=ctx.deadline,
        )
        if result.status == "timeout":
            return TimedOut(
                strategy=strategy,
                source_id=sid,
                seconds=elapsed(),
                deadline=ctx.deadline - began,
                detail=f"READ of {total} bytes ({len(local)} descriptors) not complete at the deadline",
            )
        if result.status == "disconnect":
            return SourceFailed(strategy=strategy, source_id=sid, seconds=elapsed(), detail=result.detail)
        if result.status != "done":
            return SourceFailed(strategy=strategy, source_id=sid, seconds=elapsed(), detail=result.detail)
        if ctx.progress is not None:
            ctx.progress(total, total)
        verified = False
        verify_began = anyio.current_time()
        if verify and target.verify:
            bad = await anyio.to_thread.run_sync(target.verify_against, source)
            if bad:
                return Corrupt(
                    strategy=strategy,
                    source_id=sid,
                    bytes_moved=total,
                    seconds=elapsed(),
                    bad_tensors=tuple(bad[:32]),
                    detail=f"{len(bad)} tensors failed their checksum, e.g. {bad[:3]}",
                )
            verified = True
        detail = f"{len(local)} descriptors"
        if verified:
            detail += f"; checksums verified in {anyio.current_time() - verify_began:.3f}s"
        return Loaded(
            strategy=strategy,
            source_id=sid,
            bytes_moved=total,
            seconds=result.seconds,
            verified=verified,
            detail=detail,
        )
    finally:
        if remote_name is not None:
            nixl.remove_remote(remote_name)
        deregister()


class PeerStrategy:
    """Base of the NIXL strategies: each names its descriptor planner and what a refused plan means."""

    name = "peer"
    uses_peers = True
    #: the pure planner: (source, remote spans, target, local spans) -> descriptors or a reason
    plan: Planner
    #: whether a refused plan is a LayoutMismatch (else a ManifestMismatch)
    refusal_is_layout = False

    def __init__(self, *, verify: bool = True, agent: NixlAgent | None = None) -> None:
        self.verify = verify
        self.agent = agent

    async def attempt(self, ctx: AttemptContext) -> Outcome:
        return await run_pull(
            ctx,
            self.name,
            type(self).plan,
            agent=self.agent,
            verify=self.verify,
            layout_mismatch=self.refusal_is_layout,
        )
