"""cuda_ipc: copy a same-host source's GPU memory device to device, past UCX.

On one host without NVLink, UCX stages GPU-to-GPU READs through the host
(~0.5 GB/s on one H200); a native CUDA IPC copy runs at HBM speed. The source
exports IPC handles of its device regions to a file only its user can read
(:mod:`mx_orchestrator._backends.cuda_ipc`); this strategy, for a target on a
GPU of the same host (hostname and boot id) that can read that file, opens the
handles and copies: one copy per region when the two layouts match, else one
per tensor, paired by name exactly as ``rdma_tensor`` pairs them (the same
pure planners and the same check, the same pinning). Elsewhere it is ``NotApplicable``: for the
whole strategy when the target is not on a GPU, for that candidate only when
the source is on another host, so it can rank first and cost nothing when it
does not apply. The bytes are checked on the GPU as they land, piece by piece while the next
pieces copy (``mxsum1``, or the pin's tree digests).
"""

from __future__ import annotations

import bisect
import json
import time
from collections.abc import Iterator
from typing import Any, Literal

import anyio

from mx_orchestrator._backends import EdgeFailure
from mx_orchestrator._backends.cuda_ipc import IpcRegion, host_identity, open_region, read_export
from mx_orchestrator.buffers import Buffers
from mx_orchestrator.layout import plan_region_reads, plan_tensor_reads
from mx_orchestrator.models import Manifest
from mx_orchestrator.outcomes import LayoutMismatch, NotApplicable, Outcome, SourceUnreachable
from mx_orchestrator.peer import allocate, landed_check, landed_outcome
from mx_orchestrator.pullplan import PullPlan, check
from mx_orchestrator.strategy import AttemptContext
from mx_orchestrator.target import Target

__all__ = ["CudaIpc"]


class CudaIpc:
    name = "cuda_ipc"
    uses_peers = True

    @classmethod
    def from_options(cls, options: Any) -> CudaIpc:
        return cls()

    def _applies(self, ctx: AttemptContext) -> Outcome | list[IpcRegion]:
        sid = ctx.source_id
        if not isinstance(ctx.target, Target) or ctx.target.device == "cpu":
            return NotApplicable(strategy=self.name, source_id=sid, detail="the target is not on a GPU")
        if ctx.candidate is None or ctx.candidate.manifest is None:
            return SourceUnreachable(strategy=self.name, source_id=sid, detail="no manifest from evaluation")
        raw = ctx.candidate.record.transport.get("cuda_ipc")
        try:
            advert = json.loads(raw) if raw else None
        except ValueError:
            advert = None
        here = host_identity()
        if not isinstance(advert, dict) or (advert.get("host"), advert.get("boot_id")) != (
            here["host"],
            here["boot_id"],
        ):
            return NotApplicable(
                strategy=self.name,
                source_id=sid,
                candidate_only=True,
                detail="the source is not on this host",
            )
        regions = read_export(advert, ctx.candidate.manifest)
        if isinstance(regions, str):
            return NotApplicable(strategy=self.name, source_id=sid, candidate_only=True, detail=regions)
        return regions

    async def attempt(self, ctx: AttemptContext) -> Outcome:
        regions = self._applies(ctx)
        if not isinstance(regions, list):
            return regions
        pin = ctx.expect
        plan = check(
            ctx.candidate,
            ctx.target,
            plan_region_reads,
            strategy=self.name,
            refusal_is_layout=True,
            expect=pin,
        )
        if isinstance(plan, LayoutMismatch):  # another layout: tensor by tensor
            plan = check(
                ctx.candidate,
                ctx.target,
                plan_tensor_reads,
                strategy=self.name,
                refusal_is_layout=False,
                expect=pin,
            )
        if not isinstance(plan, PullPlan):
            return plan
        assert isinstance(ctx.target, Target)
        return await self._copy(plan, regions, ctx.target, ctx)

    async def _copy(
        self, plan: PullPlan, regions: list[IpcRegion], target: Target, ctx: AttemptContext
    ) -> Outcome:
        began = anyio.current_time()
        sid = ctx.source_id
        phases = ctx.phases
        ctx.phases.planned_bytes = plan.nbytes
        try:  # the source's memory is opened before the target allocates anything for it
            with phases.timed("connect"):
                remote = [open_region(r) for r in regions]
        except EdgeFailure as exc:
            return exc.outcome(self.name, sid, anyio.current_time() - began)
        try:
            buffers = await allocate(plan, target, ctx, self.name)
            if not isinstance(buffers, Buffers):
                return buffers
            return await self._copy_into(plan, buffers, remote, target, ctx, began)
        finally:
            remote.clear()  # closes this process's view of the source's memory

    async def _copy_into(
        self,
        plan: PullPlan,
        buffers: Buffers,
        remote: list[Any],
        target: Target,
        ctx: AttemptContext,
        began: float,
    ) -> Outcome:
        """Copy in pieces on one stream and check each landed group of tensors on a second stream
        while the next pieces copy: the digest kernel is bound by compute, the copy by memory, so
        the check hides under the transfer as far as it is shorter."""
        import torch

        phases = ctx.phases
        spans = plan.advert.spans
        device = torch.device(buffers.device)
        check = landed_check(plan, target, ctx)
        pieces = list(_pieces(plan.local, plan.remote))
        groups = _landed_after(plan.local_manifest, [piece for piece, _ in pieces])

        def copy_and_check() -> tuple[float, float, list[str] | Literal["unchecked"] | None]:
            local_views = [buffers.region_view(i) for i in range(len(buffers.spans))]
            with torch.cuda.device(device):
                copying = torch.cuda.current_stream(device)
                start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
                end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
                start.record(copying)
                landed = []
                for (region, offset, n), (address, m) in pieces:
                    source_region = _region_of(spans, address, m)
                    at = address - spans[source_region][0]
                    src = remote[source_region][at : at + m]
                    local_views[region][offset : offset + n].copy_(src, non_blocking=True)
                    event = torch.cuda.Event()  # type: ignore[no-untyped-call]
                    event.record(copying)
                    landed.append(event)
                end.record(copying)
                bad: list[str] | Literal["unchecked"] | None = "unchecked"
                if check is not None:
                    bad = []
                    checking = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
                    with torch.cuda.stream(checking):
                        for event, names in zip(landed, groups, strict=True):
                            if not names:
                                continue
                            checking.wait_event(event)
                            found = check(names)
                            if found is None:
                                bad = None
                                break
                            bad += found
                end.synchronize()
                transfer = start.elapsed_time(end) / 1e3
            return transfer, time.perf_counter(), bad

        wall = time.perf_counter()
        transfer, done, bad = await anyio.to_thread.run_sync(copy_and_check)
        phases.add("transfer", transfer)
        # what the check added past the copy (the rest ran under it)
        if bad != "unchecked":
            phases.add("verify", max(0.0, done - wall - transfer))
        detail = f"{len(plan.local)} device copies in {len(pieces)} pieces, checked as they landed"
        return landed_outcome(plan, ctx, self.name, transfer, began, detail, bad)


#: bytes per copy piece: a check starts as soon as a piece lands (16 GB: 16 pieces)
PIECE_BYTES = 1 << 30


def _pieces(
    local: tuple[tuple[int, int, int], ...], remote: tuple[tuple[int, int], ...]
) -> Iterator[tuple[tuple[int, int, int], tuple[int, int]]]:
    """The plan's descriptors cut into pieces of at most :data:`PIECE_BYTES`, in order."""
    for (region, offset, n), (address, _) in zip(local, remote, strict=True):
        for at in range(0, n, PIECE_BYTES) if n else [0]:
            size = min(PIECE_BYTES, n - at)
            yield (region, offset + at, size), (address + at, size)


def _landed_after(manifest: Manifest, pieces: list[tuple[int, int, int]]) -> list[list[str]]:
    """For each ``(region, offset, nbytes)`` piece, in issue order, the tensors whose bytes have all
    landed once it has: those whose last-issued overlapping piece it is (an empty tensor: the first).

    Pieces write disjoint bytes, so in one region, sorted by offset, the pieces overlapping a
    tensor are one run, found by bisection: O((tensors + pieces) log pieces).
    """
    by_region: dict[int, list[tuple[int, int, int]]] = {}
    for index, (region, offset, n) in enumerate(pieces):
        by_region.setdefault(region, []).append((offset, offset + n, index))
    starts: dict[int, list[int]] = {}
    ends: dict[int, list[int]] = {}
    for region, row in by_region.items():
        row.sort()
        starts[region] = [start for start, _, _ in row]
        ends[region] = [end for _, end, _ in row]
    groups: list[list[str]] = [[] for _ in pieces]
    for spec in manifest.tensors:
        row = by_region.get(spec.region, [])
        low = bisect.bisect_right(ends.get(spec.region, []), spec.offset)
        high = bisect.bisect_left(starts.get(spec.region, []), spec.offset + spec.nbytes)
        overlapping = [index for _, _, index in row[low:high]]
        groups[max(overlapping, default=0)].append(spec.name)
    return groups


def _region_of(spans: list[tuple[int, int]], address: int, nbytes: int) -> int:
    for i, (base, size) in enumerate(spans):
        if base <= address and address + nbytes <= base + size:
            return i
    raise AssertionError("the planner placed a descriptor outside every advertised region")
