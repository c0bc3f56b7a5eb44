"""rdma_tensor: read a peer's weights one NIXL descriptor per tensor, paired by name.

Works whatever the two layouts are. Every tensor's dtype, shape and size are
checked against the target before anything is posted; a different tensor set
is a ``ManifestMismatch`` (never STALE). Tensors adjacent on both sides share
a descriptor.
"""

from __future__ import annotations

from mx_orchestrator.layout import plan_tensor_reads
from mx_orchestrator.outcomes import Outcome
from mx_orchestrator.strategy import AttemptContext

from ._nixl import NixlAgent
from ._peer import run_pull

__all__ = ["RdmaTensor"]


class RdmaTensor:
    name = "rdma_tensor"
    uses_peers = True

    def __init__(self, *, verify: bool = True, agent: NixlAgent | None = None) -> None:
        self.verify = verify
        self.agent = agent

    async def attempt(self, ctx: AttemptContext) -> Outcome:
        return await run_pull(ctx, self.name, plan_tensor_reads, agent=self.agent, verify=self.verify)
