"""The RDMA agent contract: what the peer attempt and the serving side need from a transport.

Every failure is an :class:`~mx_orchestrator._backends.EdgeFailure` carrying its
outcome type: a failed registration is ``LocalFailure``, a refused connection
``SourceUnreachable``, a read that fails on the remote side ``SourceFailed``,
a read not complete at its deadline ``TimedOut``. Implementations:
:class:`mx_orchestrator._backends.nixl.NixlAgent` (real transfers) and
:class:`mx_orchestrator.testing.FakeRdmaAgent` (in-process, scriptable faults).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = ["AgentStats", "Descriptor", "RdmaAgent", "Release", "descriptor_rows"]

#: ``(address, nbytes, device id)`` of one block of memory.
Descriptor = tuple[int, int, int]
#: Undoes a registration; safe to call more than once.
Release = Callable[[], None]


@dataclass
class AgentStats:
    """What an agent holds right now: tests assert these return to zero (nothing leaks)."""

    handles_open: int = 0
    remote_agents: int = 0
    registrations: int = 0
    transfers: int = 0


@runtime_checkable
class RdmaAgent(Protocol):
    name: str
    stats: AgentStats

    def metadata(self) -> bytes:
        """What a peer needs to connect to this agent (published in the source's record)."""
        ...

    def register(self, blocks: Sequence[Descriptor], mem_type: str) -> Release:
        """Make ``blocks`` readable/writable by transfers; returns the function that undoes it."""
        ...

    def connect(self, metadata: bytes) -> str:
        """Load a peer's metadata; returns the peer's agent name (release with :meth:`disconnect`)."""
        ...

    def disconnect(self, name: str) -> None: ...

    async def read(
        self,
        remote: str,
        local: np.ndarray[Any, Any],
        remote_blocks: np.ndarray[Any, Any],
        *,
        local_mem: str,
        remote_mem: str,
        deadline: float,
    ) -> float:
        """READ ``remote_blocks`` of ``remote`` into ``local`` before ``deadline`` (anyio clock).

        Rows are ``(address, nbytes, device)``. Returns the seconds the transfer
        took. Every handle is released on every path, cancellation included.
        """
        ...

    def poll_notifications(self) -> int:
        """Drive progress on a serving agent; returns how many notifications arrived."""
        ...


def descriptor_rows(blocks: Sequence[tuple[int, int]], device_id: int) -> np.ndarray[Any, Any]:
    """``(address, nbytes)`` blocks as the ``N x 3`` uint64 array transfers take."""
    rows = np.empty((len(blocks), 3), dtype=np.uint64)
    for i, (address, nbytes) in enumerate(blocks):
        rows[i] = (address, nbytes, device_id)
    return rows
