"""rdma_region: read a peer's weights as a few contiguous regions, one NIXL descriptor each.

The fastest path, and only possible when the source's region layout equals the
target's. That is checked from the fingerprints evaluation already fetched,
before anything is posted; a difference is a ``LayoutMismatch`` that moves zero
bytes and leaves the source READY (ModelExpress PR #246).
"""

from __future__ import annotations

from mx_orchestrator.layout import plan_region_reads
from mx_orchestrator.outcomes import Outcome
from mx_orchestrator.strategy import AttemptContext

from ._nixl import NixlAgent
from ._peer import run_pull

__all__ = ["RdmaRegion"]


class RdmaRegion:
    name = "rdma_region"
    uses_peers = True

    def __init__(self, *, verify: bool = True, agent: NixlAgent | None = None) -> None:
        self.verify = verify
        self.agent = agent

    async def attempt(self, ctx: AttemptContext) -> Outcome:
        return await run_pull(
            ctx, self.name, plan_region_reads, agent=self.agent, verify=self.verify, layout_mismatch=True
        )
