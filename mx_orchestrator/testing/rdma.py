"""A fake RDMA fabric: :class:`FakeRdmaAgent` implements the agent contract in one process.

Agents on one :class:`FakeRdmaNetwork` find each other by metadata, and a READ
really copies bytes (``memmove`` between host addresses of the same process),
after checking, as NIXL does, that every descriptor lies inside memory the
two agents registered and that the lengths pair up. Faults are switches on
the agent whose behaviour they describe (:class:`RdmaFaults`):

* a *target's* ``fail_register``: registration fails (``LocalFailure``);
* a *source's* ``dead``: connecting is refused (``SourceUnreachable``) and reads
  fail (``SourceFailed``);
* a *source's* ``die_mid_read``: half the descriptors land, then the peer
  disconnects (``SourceFailed``);
* a *source's* ``frozen``: a READ never completes, so it ends at its deadline
  (``TimedOut``), like a SIGSTOPped process;
* a *source's* ``die_after_bytes``: it serves that many bytes in all, then dies
  inside the READ that crosses the line (half of that READ lands; every later
  connect and READ fails), like a process SIGKILLed mid-load.

``stats`` counts what is held (handles, remote agents, registrations) exactly
like the NIXL agent's, so leak assertions read the same.
"""

from __future__ import annotations

import bisect
import ctypes
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import numpy as np

from .._backends import EdgeFailure
from .._backends.rdma import AgentStats, Descriptor, Release
from ..outcomes import LocalFailure, SourceFailed, SourceUnreachable, TimedOut

__all__ = ["FakeRdmaAgent", "FakeRdmaNetwork", "RdmaFaults"]

_PREFIX = b"fake-rdma:"


@dataclass
class RdmaFaults:
    fail_register: bool = False
    dead: bool = False
    die_mid_read: bool = False
    frozen: bool = False
    #: seconds every READ from this agent takes (on anyio's clock, so virtual clocks apply)
    read_delay: float = 0.0
    #: bytes this agent serves before it dies mid-READ (``None``: never)
    die_after_bytes: int | None = None


@dataclass
class FakeRdmaNetwork:
    agents: dict[str, FakeRdmaAgent] = field(default_factory=dict)

    def agent(self, name: str, **faults: Any) -> FakeRdmaAgent:
        agent = FakeRdmaAgent(name, self, RdmaFaults(**faults))
        self.agents[name] = agent
        return agent


class FakeRdmaAgent:
    def __init__(
        self, name: str, network: FakeRdmaNetwork | None = None, faults: RdmaFaults | None = None
    ) -> None:
        self.name = name
        self.network = network if network is not None else FakeRdmaNetwork()
        self.network.agents.setdefault(name, self)
        self.faults = faults or RdmaFaults()
        self.stats = AgentStats()
        self.polls = 0
        self.connects = 0
        self.bytes_read = 0
        #: bytes READ from this agent by others (what ``die_after_bytes`` counts)
        self.bytes_served = 0
        self._registered: list[tuple[int, int]] = []  # (address, nbytes), sorted
        self._remotes: dict[str, int] = {}

    # -- contract ---------------------------------------------------------------

    def metadata(self) -> bytes:
        return _PREFIX + self.name.encode()

    def register(self, blocks: Sequence[Descriptor], mem_type: str) -> Release:
        if self.faults.fail_register:
            raise EdgeFailure(LocalFailure, "memory registration failed (scripted)")
        rows = [(int(a), int(n)) for a, n, _ in blocks if n > 0]
        for row in rows:
            bisect.insort(self._registered, row)
        self.stats.registrations += 1
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            for row in rows:
                self._registered.remove(row)
            self.stats.registrations -= 1

        return release

    def connect(self, metadata: bytes) -> str:
        if not metadata.startswith(_PREFIX):
            raise EdgeFailure(SourceUnreachable, "connect failed: metadata is not a fake agent's")
        name = metadata.removeprefix(_PREFIX).decode(errors="replace")
        peer = self.network.agents.get(name)
        if peer is None or peer.faults.dead:
            raise EdgeFailure(SourceUnreachable, f"connect failed: agent {name!r} is not there")
        self.connects += 1
        self._remotes[name] = self._remotes.get(name, 0) + 1
        self.stats.remote_agents = len(self._remotes)
        return name

    def disconnect(self, name: str) -> None:
        count = self._remotes.get(name, 0)
        if count <= 1:
            self._remotes.pop(name, None)
        else:
            self._remotes[name] = count - 1
        self.stats.remote_agents = len(self._remotes)

    def poll_notifications(self) -> int:
        self.polls += 1
        return 0

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
        began = anyio.current_time()
        self.stats.handles_open += 1
        try:
            peer = self.network.agents.get(remote)
            if remote not in self._remotes or peer is None:
                raise EdgeFailure(SourceFailed, f"not connected to {remote!r}")
            pairs = self._pairs(local, remote_blocks, peer)
            if peer.faults.frozen:
                await anyio.sleep(max(0.0, deadline - anyio.current_time()))
                raise EdgeFailure(TimedOut, "transfer still in progress at the deadline")
            if peer.faults.read_delay:
                await anyio.sleep(peer.faults.read_delay)
            if peer.faults.dead:
                raise EdgeFailure(SourceFailed, "remote disconnected")
            limit = peer.faults.die_after_bytes
            dies = peer.faults.die_mid_read or (
                limit is not None and peer.bytes_served + sum(n for _, _, n in pairs) > limit
            )
            half = len(pairs) // 2 if dies else len(pairs)
            for dst, src, n in pairs[:half]:
                ctypes.memmove(dst, src, n)
                self.bytes_read += n
                peer.bytes_served += n
            if dies:
                if limit is not None:
                    peer.faults.dead = True  # killed: nothing more from it
                raise EdgeFailure(SourceFailed, "remote disconnected mid-read")
            self.stats.transfers += 1
            await anyio.lowlevel.checkpoint()
            return anyio.current_time() - began
        finally:
            self.stats.handles_open -= 1

    # -- checks NIXL makes --------------------------------------------------------

    def _pairs(
        self, local: np.ndarray[Any, Any], remote_blocks: np.ndarray[Any, Any], peer: FakeRdmaAgent
    ) -> list[tuple[int, int, int]]:
        if len(local) != len(remote_blocks):
            raise EdgeFailure(SourceFailed, f"{len(local)} local and {len(remote_blocks)} remote descriptors")
        pairs = []
        for i, ((dst, n, _), (src, m, _)) in enumerate(
            zip(local.tolist(), remote_blocks.tolist(), strict=True)
        ):
            if n != m:
                raise EdgeFailure(SourceFailed, f"length mismatch at index {i}")
            if not self._covers(dst, n):
                raise EdgeFailure(LocalFailure, f"local descriptor {i} outside registered memory")
            if not peer._covers(src, n):
                raise EdgeFailure(SourceFailed, f"remote descriptor {i} outside the peer's registered memory")
            pairs.append((int(dst), int(src), int(n)))
        return pairs

    def _covers(self, address: int, nbytes: int) -> bool:
        i = bisect.bisect_right(self._registered, (address, 1 << 64)) - 1
        return i >= 0 and address + nbytes <= self._registered[i][0] + self._registered[i][1]
