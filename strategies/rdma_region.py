"""rdma_region: read a peer's weights as a few contiguous regions, one NIXL descriptor each.

The fastest path, and only possible when the source's region layout equals the
target's. That is checked from the fingerprints evaluation already fetched,
before anything is posted; a difference is a ``LayoutMismatch`` that moves zero
bytes and leaves the source READY (ModelExpress PR #246).
"""

from __future__ import annotations

from mx_orchestrator.layout import plan_region_reads
from mx_orchestrator.peer import PeerStrategy

__all__ = ["RdmaRegion"]


class RdmaRegion(PeerStrategy):
    name = "rdma_region"
    plan = staticmethod(plan_region_reads)
    refusal_is_layout = True
