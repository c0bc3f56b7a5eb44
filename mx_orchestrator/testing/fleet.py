"""A bandwidth model and the scripted strategies that move bytes through it: fleets in simulation.

:class:`Fabric` is a fluid model of links. Every transfer is a flow through the
links it names (the source's, the target's, or the Hub's); a link's capacity is
shared equally among the flows on it and a flow runs at the rate of its
tightest link. Rates are recomputed whenever a flow starts, ends or fails, so
a seed's link divided among N readers shows exactly as it would. Time is
anyio's clock: on :class:`~mx_orchestrator.testing.clock.VirtualClockLoop`,
a 16 GB transfer of five model seconds costs no real time.

:class:`FabricPeer` (a peer strategy) and :class:`FabricHub` (a peerless one)
are the strategies a simulated target loads with; they run inside the real
:class:`~mx_orchestrator.Orchestrator`, so evaluation, ranking, reader leases
and admission, capacity waits, the policy and the registry are the real ones.
Faults are the fabric's: :meth:`Fabric.kill` fails a source's flows in flight
(``SourceFailed``) and refuses new ones (``SourceUnreachable``);
:meth:`Fabric.freeze` stalls them until the attempt's deadline (``TimedOut``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import anyio

from ..outcomes import Loaded, Outcome, SourceFailed, SourceUnreachable
from ..strategy import AttemptContext

__all__ = ["Fabric", "FabricHub", "FabricPeer", "Flow", "SourceDied"]

_EPSILON_BYTES = 1e-3


class SourceDied(Exception):
    """The source of a flow died while the flow was in flight."""


@dataclass(eq=False)
class Flow:
    links: tuple[str, ...]
    remaining: float
    nbytes: int
    rate: float = 0.0
    done: anyio.Event = field(default_factory=anyio.Event)
    failed: bool = False


class Fabric:
    """Links with capacities (bytes/s) and the flows through them; see the module docstring.

    ``capacity(link)`` names a link's capacity: ``src:ID``, ``tgt:ID`` and
    ``hub`` links get ``source_bps``, ``target_bps`` and ``hub_bps``.
    """

    def __init__(self, *, source_bps: float, target_bps: float, hub_bps: float) -> None:
        self.source_bps = source_bps
        self.target_bps = target_bps
        self.hub_bps = hub_bps
        self._flows: set[Flow] = set()
        self._on_link: dict[str, int] = {}
        self._updated = 0.0
        self._changed = anyio.Event()
        self.dead: set[str] = set()
        self.frozen: set[str] = set()
        #: the most flows a source link ever carried at once
        self.peak_readers: dict[str, int] = {}
        #: bytes that went through each link (``hub``: what the Hub served)
        self.bytes_through: dict[str, float] = {}
        self._first_reader: dict[str, anyio.Event] = {}

    async def first_reader(self, source: str) -> None:
        """Return once ``source`` has had a reader (at once if it had one already)."""
        await self._first_reader.setdefault(source, anyio.Event()).wait()

    def capacity(self, link: str) -> float:
        if link == "hub":
            return self.hub_bps
        return self.source_bps if link.startswith("src:") else self.target_bps

    # -- faults ------------------------------------------------------------------

    def kill(self, source: str) -> None:
        """The source process dies: its flows fail now, new ones are refused."""
        self.dead.add(source)
        self._drain()
        link = f"src:{source}"
        for flow in [f for f in self._flows if link in f.links]:
            flow.failed = True
            self._remove(flow)
            flow.done.set()
        self._poke()

    def freeze(self, source: str) -> None:
        """The source process stops (SIGSTOP): its flows stall, they neither end nor fail."""
        self._drain()
        self.frozen.add(source)
        self._poke()

    # -- flows ---------------------------------------------------------------------

    async def transfer(self, links: tuple[str, ...], nbytes: int) -> None:
        """Move ``nbytes`` through ``links``; raises :class:`SourceDied` if a source link dies."""
        if any(link.removeprefix("src:") in self.dead for link in links if link.startswith("src:")):
            raise SourceDied(links[0])
        self._drain()
        flow = Flow(links, float(nbytes), nbytes)
        self._flows.add(flow)
        for link in links:
            self._on_link[link] = self._on_link.get(link, 0) + 1
            if link.startswith("src:"):
                source = link[4:]
                self.peak_readers[source] = max(self.peak_readers.get(source, 0), self._on_link[link])
                self._first_reader.setdefault(source, anyio.Event()).set()
        self._poke()
        try:
            await flow.done.wait()
        finally:
            if flow in self._flows:  # cancelled (a deadline): the flow leaves the links
                self._drain()
                self._remove(flow)
                self._poke()
        if flow.failed:
            raise SourceDied(links[0])

    def _remove(self, flow: Flow) -> None:
        self._flows.discard(flow)
        moved = flow.nbytes - flow.remaining
        for link in flow.links:
            self._on_link[link] -= 1
            self.bytes_through[link] = self.bytes_through.get(link, 0.0) + moved

    def _poke(self) -> None:
        self._changed.set()

    def _rate(self, flow: Flow) -> float:
        if any(link.startswith("src:") and link[4:] in self.frozen for link in flow.links):
            return 0.0
        return min(self.capacity(link) / self._on_link[link] for link in flow.links)

    def _drain(self) -> None:
        """Move every flow forward to now at the rates it has had since the last change."""
        now = anyio.current_time()
        elapsed = now - self._updated
        self._updated = now
        if elapsed <= 0:
            return
        for flow in self._flows:
            flow.remaining = max(0.0, flow.remaining - flow.rate * elapsed)

    async def run(self) -> None:
        """The fabric's clock: ends flows when their bytes are through. Run it in a task group."""
        while True:
            self._drain()
            for flow in [f for f in self._flows if f.remaining <= _EPSILON_BYTES]:
                self._remove(flow)
                flow.done.set()
            soonest = math.inf
            for flow in self._flows:
                flow.rate = self._rate(flow)
                if flow.rate > 0:
                    soonest = min(soonest, flow.remaining / flow.rate)
            self._changed = anyio.Event()
            with anyio.move_on_after(soonest):
                await self._changed.wait()


class FabricPeer:
    """A peer strategy whose READ is one flow from the candidate's link to this target's."""

    uses_peers = True

    def __init__(self, fabric: Fabric, target_id: str, nbytes: int, name: str = "rdma_region") -> None:
        self.fabric = fabric
        self.target_id = target_id
        self.nbytes = nbytes
        self.name = name

    async def attempt(self, ctx: AttemptContext) -> Outcome:
        source = ctx.source_id
        assert source is not None
        began = anyio.current_time()
        if source in self.fabric.dead:
            return SourceUnreachable(strategy=self.name, source_id=source, detail="connect refused (dead)")
        try:
            await self.fabric.transfer((f"src:{source}", f"tgt:{self.target_id}"), self.nbytes)
        except SourceDied:
            return SourceFailed(
                strategy=self.name,
                source_id=source,
                seconds=anyio.current_time() - began,
                detail="remote disconnected mid-read",
            )
        return Loaded(
            strategy=self.name,
            source_id=source,
            bytes_moved=self.nbytes,
            seconds=anyio.current_time() - began,
            verified=True,
        )


class FabricHub:
    """The Hub: a peerless strategy whose download is one flow through the shared ``hub`` link."""

    uses_peers = False
    name = "hf_download"

    def __init__(self, fabric: Fabric, target_id: str, nbytes: int) -> None:
        self.fabric = fabric
        self.target_id = target_id
        self.nbytes = nbytes

    async def attempt(self, ctx: AttemptContext) -> Outcome:
        began = anyio.current_time()
        await self.fabric.transfer(("hub", f"tgt:{self.target_id}"), self.nbytes)
        return Loaded(
            strategy=self.name,
            bytes_moved=self.nbytes,
            seconds=anyio.current_time() - began,
            verified=True,
        )
