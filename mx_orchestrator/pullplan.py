"""The peer pull plan, decided: the advert format and everything checkable before any I/O.

A source advertises its transport in its registry record (:func:`encode_advert`,
written by :mod:`mx_orchestrator.source`); a target parses it
(:func:`parse_advert`: untrusted, every field validated against the record's
manifest: region count and sizes, memory type, metadata size) and decides a
peer read with :func:`check`: the target's manifest for this source, the
descriptors from the strategy's pure read planner, or the outcome that ends
the attempt (``LayoutMismatch``, ``ManifestMismatch``, ``SourceUnreachable``,
``NotApplicable``), having moved and allocated nothing. :class:`PullPlan` is
the result, and :meth:`PullPlan.restricted` cuts it down to one part.

Used by the serving side, the peer attempt (:mod:`mx_orchestrator.peer`) and
``cuda_ipc``. Nothing here performs I/O.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import json
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, replace
from typing import Any

from .errors import ManifestError
from .holdings import parse_holdings
from .layout import Descriptors
from .models import Candidate, Manifest
from .outcomes import LayoutMismatch, ManifestMismatch, NotApplicable, Outcome, SourceUnreachable
from .target import Target, TargetMismatch

__all__ = ["PeerAdvert", "PullPlan", "ReadPlanner", "check", "encode_advert", "parse_advert"]

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
    #: a partial source's holdings array ``(address, bytes)`` in its host memory (``None``: a whole
    #: source), see :mod:`~mx_orchestrator.holdings`
    holdings: tuple[int, int] | None = None


def encode_advert(
    agent_name: str, metadata: bytes, mem_type: str, spans: Collection[tuple[int, int]], device_id: int
) -> Mapping[str, str]:
    """The record's transport fields for an agent serving ``spans`` (what :func:`parse_advert` reads)."""
    return {
        "nixl_agent": agent_name,
        "nixl_metadata": base64.b64encode(metadata).decode(),
        "nixl_mem": mem_type,
        "nixl_regions": json.dumps([[a, n, device_id] for a, n in spans]),
    }


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
    holdings = parse_holdings(transport, manifest)
    if isinstance(holdings, str):
        return holdings
    return PeerAdvert(str(name), metadata, mem, spans, device_ids.pop() if device_ids else 0, holdings)


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

    def restricted(self, tensors: Collection[int]) -> PullPlan:
        """The same plan cut down to the bytes of the local manifest's tensors ``tensors`` (indices).

        A part of a striped load: every descriptor is clipped to those tensors'
        byte ranges, so the part moves their bytes and nothing else (a subset of
        descriptors already checked against the target's buffers).
        """
        specs = self.local_manifest.tensors
        wanted: dict[int, list[tuple[int, int]]] = {}
        for i in sorted(tensors, key=lambda i: (specs[i].region, specs[i].offset)):
            spec = specs[i]
            runs = wanted.setdefault(spec.region, [])
            if runs and runs[-1][1] == spec.offset:
                runs[-1] = (runs[-1][0], spec.offset + spec.nbytes)
            elif spec.nbytes:
                runs.append((spec.offset, spec.offset + spec.nbytes))
        local: list[tuple[int, int, int]] = []
        remote: list[tuple[int, int]] = []
        for (region, offset, n), (address, _) in zip(self.local, self.remote, strict=True):
            runs = wanted.get(region, [])
            if not runs:
                continue
            i = bisect.bisect_right(runs, (offset, 1 << 62)) - 1
            i = max(i, 0)
            while i < len(runs) and runs[i][0] < offset + n:
                lo, hi = max(runs[i][0], offset), min(runs[i][1], offset + n)
                if lo < hi:
                    local.append((region, lo, hi - lo))
                    remote.append((address + lo - offset, hi - lo))
                i += 1
        return replace(self, local=tuple(local), remote=tuple(remote))


def check(
    candidate: Candidate | None,
    target: object,
    planner: ReadPlanner,
    *,
    strategy: str,
    refusal_is_layout: bool,
    expect: str | None = None,
) -> PullPlan | Outcome:
    """Decide a peer attempt without I/O: the plan, or the outcome that ends it (0 bytes moved).

    With ``expect``, a manifest that does not commit to the pinned content is a
    ``ManifestMismatch`` (another revision, or a liar: either way never read).
    """
    sid = candidate.source_id if candidate is not None else None
    if candidate is None or candidate.manifest is None:
        return SourceUnreachable(strategy=strategy, source_id=sid, detail="no manifest from evaluation")
    if not isinstance(target, Target):
        return NotApplicable(
            strategy=strategy, source_id=sid, detail="the target is not a mx_orchestrator Target"
        )
    source = candidate.manifest
    if expect is not None and source.content_fingerprint != expect:
        found = source.content_fingerprint or "no content fingerprint (no digests)"
        return ManifestMismatch(strategy=strategy, source_id=sid, detail=f"not the pinned content: {found}")
    advert = parse_advert(candidate.record.transport, source)
    if isinstance(advert, str):
        return SourceUnreachable(strategy=strategy, source_id=sid, detail=advert)
    try:
        local_manifest = target.plan_for(source)
    except TargetMismatch as exc:
        return ManifestMismatch(strategy=strategy, source_id=sid, detail=str(exc))
    except ManifestError as exc:  # it cannot be laid out in this target: a property of the pair
        return ManifestMismatch(strategy=strategy, source_id=sid, detail=f"cannot be laid out here: {exc}")
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
