"""rdma_tensor: read a peer's weights one NIXL descriptor per tensor, paired by name.

Works whatever the two layouts are. Every tensor's dtype, shape and size are
checked against the target before anything is posted; a different tensor set
is a ``ManifestMismatch`` (never STALE). Tensors adjacent on both sides share
a descriptor.
"""

from __future__ import annotations

from mx_orchestrator.layout import plan_tensor_reads
from mx_orchestrator.peer import PeerStrategy

__all__ = ["RdmaTensor"]


class RdmaTensor(PeerStrategy):
    name = "rdma_tensor"
    plan = staticmethod(plan_tensor_reads)
