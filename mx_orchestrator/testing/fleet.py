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

:class:`FleetSimulation` puts it together: seeds, a thousand targets started at
once, fan-out, faults, and a summary (``bench/fleet.py`` prints it).
"""

from __future__ import annotations

import heapq
import math
import random
from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import anyio
import anyio.abc

from ..buffers import Buffers
from ..holdings import Holdings, encode_holdings, held_tensors
from ..layout import plan_region_reads
from ..manifests import ManifestCache
from ..models import Manifest, ModelIdentity, SourceRecord
from ..outcomes import Loaded, Outcome, SourceFailed, SourceUnreachable, Superseded
from ..peer import Settle, TargetRegistrations
from ..pipeline import Orchestrator
from ..policy import Policy
from ..pullplan import PullPlan, check, encode_advert
from ..report import LoadReport
from ..strategy import AttemptContext
from ..target import Target
from . import make_manifest
from .clock import virtual_wall_clock

__all__ = [
    "Fabric",
    "FabricConnection",
    "FabricHub",
    "FabricPartPeer",
    "FabricPeer",
    "FleetConfig",
    "FleetSimulation",
    "Flow",
    "SimulatedTarget",
    "SourceDied",
]

#: the fabric's finest step of time: every wake-up moves the clock at least this far
_TICK = 1e-6


def _source_of(link: str) -> str | None:
    """The source a ``src:ID`` link belongs to (``None`` for a target's link or the Hub's)."""
    return link[4:] if link.startswith("src:") else None


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
    #: when ``remaining`` was last brought up to date (the flow ran at ``rate`` since)
    updated: float = 0.0
    #: bumped whenever the rate changes: older entries of the completion heap are stale
    version: int = 0


class Fabric:
    """Links with capacities (bytes/s) and the flows through them; see the module docstring.

    ``capacity(link)`` names a link's capacity: ``src:ID``, ``tgt:ID`` and
    ``hub`` links get ``source_bps``, ``target_bps`` and ``hub_bps``.

    Event-driven: a flow's rate depends only on how many flows share each of its
    links, so a flow that starts or ends changes the rates of the flows on its
    own links and no others; each flow's progress is brought up to date only
    when its rate changes, and completions come off a heap. A fleet of a thousand
    targets reading parts from a thousand partial sources costs each event a
    few dozen flows, not every flow of the fleet.
    """

    def __init__(self, *, source_bps: float, target_bps: float, hub_bps: float) -> None:
        self.source_bps = source_bps
        self.target_bps = target_bps
        self.hub_bps = hub_bps
        self._flows: set[Flow] = set()
        self._on: dict[str, set[Flow]] = {}
        self._heap: list[tuple[float, int, int, Flow]] = []
        self._sequence = 0
        self._changed = anyio.Event()
        self.dead: set[str] = set()
        self.frozen: set[str] = set()
        #: the most flows a source link ever carried at once
        self.peak_readers: dict[str, int] = {}
        #: bytes that went through each link (``hub``: what the Hub served)
        self.bytes_through: dict[str, float] = {}
        self._first_reader: dict[str, anyio.Event] = {}
        #: how often :meth:`run` woke up (each wake-up ends a flow, starts one, or moves the clock)
        self.wakeups = 0

    async def first_reader(self, source: str) -> None:
        """Return once ``source`` has had a reader (at once if it had one already)."""
        await self._first_reader.setdefault(source, anyio.Event()).wait()

    def capacity(self, link: str) -> float:
        if link == "hub":
            return self.hub_bps
        return self.source_bps if _source_of(link) is not None else self.target_bps

    # -- faults ------------------------------------------------------------------

    def kill(self, source: str) -> None:
        """The source process dies: its flows fail now, new ones are refused."""
        self.dead.add(source)
        for flow in list(self._on.get(f"src:{source}", ())):
            flow.failed = True
            self._remove(flow)
            flow.done.set()
        self._poke()

    def freeze(self, source: str) -> None:
        """The source process stops (SIGSTOP): its flows stall, they neither end nor fail."""
        self.frozen.add(source)
        self._rerate(set(self._on.get(f"src:{source}", ())))
        self._poke()

    # -- flows ---------------------------------------------------------------------

    async def transfer(self, links: tuple[str, ...], nbytes: int) -> None:
        """Move ``nbytes`` through ``links``; raises :class:`SourceDied` if a source link dies."""
        if any(_source_of(link) in self.dead for link in links):
            raise SourceDied(links[0])
        flow = Flow(links, float(nbytes), nbytes, updated=anyio.current_time())
        self._flows.add(flow)
        touched: set[Flow] = {flow}
        for link in links:
            on = self._on.setdefault(link, set())
            on.add(flow)
            touched |= on
            source = _source_of(link)
            if source is not None:
                self.peak_readers[source] = max(self.peak_readers.get(source, 0), len(on))
                self._first_reader.setdefault(source, anyio.Event()).set()
        self._rerate(touched)
        self._poke()
        try:
            await flow.done.wait()
        finally:
            if flow in self._flows:  # cancelled (a deadline): the flow leaves the links
                self._remove(flow)
                self._poke()
        if flow.failed:
            raise SourceDied(links[0])

    def _advance(self, flow: Flow, now: float) -> None:
        flow.remaining = max(0.0, flow.remaining - flow.rate * (now - flow.updated))
        flow.updated = now

    def _rerate(self, flows: set[Flow]) -> None:
        """New rates for ``flows`` (their links' counts changed), and their completions rescheduled."""
        now = anyio.current_time()
        for flow in flows:
            if flow not in self._flows:
                continue
            self._advance(flow, now)
            if any(_source_of(link) in self.frozen for link in flow.links):
                rate = 0.0
            else:
                rate = min(self.capacity(link) / len(self._on[link]) for link in flow.links)
            if rate == flow.rate and flow.version:
                continue
            flow.rate = rate
            flow.version += 1
            if rate > 0:
                self._sequence += 1
                due = now + flow.remaining / rate
                heapq.heappush(self._heap, (due, self._sequence, flow.version, flow))

    def _remove(self, flow: Flow) -> None:
        self._advance(flow, anyio.current_time())
        self._flows.discard(flow)
        moved = flow.nbytes - flow.remaining
        touched: set[Flow] = set()
        for link in flow.links:
            on = self._on[link]
            on.discard(flow)
            touched |= on
            if not on:
                del self._on[link]
            self.bytes_through[link] = self.bytes_through.get(link, 0.0) + moved
        self._rerate(touched)

    def _poke(self) -> None:
        self._changed.set()

    async def run(self) -> None:
        """The fabric's clock: ends flows when their bytes are through. Run it in a task group."""
        heap = self._heap
        while True:
            self.wakeups += 1
            now = anyio.current_time()
            # done: due now, or so close that a timer would fire without the clock moving
            while heap and (heap[0][3] not in self._flows or heap[0][2] != heap[0][3].version):
                heapq.heappop(heap)  # a stale entry: the flow ended or changed rate since
            while heap and heap[0][0] <= now + _TICK:
                _, _, version, flow = heapq.heappop(heap)
                if flow in self._flows and version == flow.version:
                    flow.remaining = 0.0
                    self._remove(flow)
                    flow.done.set()
                while heap and (heap[0][3] not in self._flows or heap[0][2] != heap[0][3].version):
                    heapq.heappop(heap)
            soonest = max(_TICK, heap[0][0] - now) if heap else math.inf
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


class FabricPartPeer(FabricPeer):
    """:class:`FabricPeer` that reads parts (the driver stripes it), from whole and partial sources.

    Its pull plan is the real one (:func:`~mx_orchestrator.pullplan.check` over
    the record's advert); a part's READ is one flow of the part's bytes; what a
    partial source holds is its :class:`~mx_orchestrator.holdings.Holdings`,
    asked through :attr:`holdings` (the simulation's stand-in for the one-sided
    READ of the array).
    """

    def __init__(
        self, fabric: Fabric, target_id: str, holdings: Mapping[str, Holdings], name: str = "rdma_region"
    ) -> None:
        super().__init__(fabric, target_id, 0, name)
        self.holdings = holdings

    def check_for(self, ctx: AttemptContext) -> PullPlan | Outcome:
        return check(
            ctx.candidate,
            ctx.target,
            plan_region_reads,
            strategy=self.name,
            refusal_is_layout=True,
            expect=ctx.expect,
        )

    async def open(
        self, plan: PullPlan, ctx: AttemptContext, registrations: TargetRegistrations
    ) -> FabricConnection | Outcome:
        source = ctx.source_id
        assert source is not None
        if source in self.fabric.dead:
            return SourceUnreachable(strategy=self.name, source_id=source, detail="connect refused (dead)")
        return FabricConnection(self, source)


class FabricConnection:
    """One target's open source on the fabric (a :class:`~mx_orchestrator.peer.PartConnection`)."""

    def __init__(self, peer: FabricPartPeer, source_id: str) -> None:
        self.peer = peer
        self.source_id = source_id
        self._cache: tuple[int, frozenset[int]] | None = None

    async def held(self, plan: PullPlan, ctx: AttemptContext) -> frozenset[int] | Outcome | None:
        if self.source_id in self.peer.fabric.dead:
            return SourceFailed(
                strategy=self.peer.name, source_id=self.source_id, detail="remote disconnected"
            )
        holdings = self.peer.holdings.get(self.source_id)
        if holdings is None or holdings.complete.is_set() or plan.advert.holdings is None:
            return None
        if self._cache is None or self._cache[0] != holdings.version:
            assert holdings.array is not None
            self._cache = (
                holdings.version,
                held_tensors(holdings.array.data, plan.source, plan.local_manifest),
            )
        return self._cache[1]

    async def read(
        self, plan: PullPlan, ctx: AttemptContext, names: Collection[str] | None, settle: Settle | None
    ) -> Outcome:
        began = anyio.current_time()
        peer, source = self.peer, self.source_id
        ctx.phases.planned_bytes = plan.nbytes
        try:
            with ctx.phases.timed("transfer"):
                await peer.fabric.transfer((f"src:{source}", f"tgt:{peer.target_id}"), plan.nbytes)
        except SourceDied:
            return SourceFailed(
                strategy=peer.name,
                source_id=source,
                seconds=anyio.current_time() - began,
                detail="remote disconnected mid-read",
            )
        if settle is not None and not await settle():
            return Superseded(
                strategy=peer.name, source_id=source, bytes_moved=plan.nbytes, detail="lost the race"
            )
        return Loaded(
            strategy=peer.name,
            source_id=source,
            bytes_moved=plan.nbytes,
            seconds=anyio.current_time() - began,
            verified=True,
        )

    def close(self) -> None:
        pass


class SimulatedTarget(Target):
    """A target whose memory is imaginary: the fabric moves the bytes, nothing is allocated."""

    def __init__(self) -> None:
        super().__init__("arena", "cpu", verify=False, prefault=False)

    def _allocate(self, planned: Manifest) -> Buffers:
        spans = [(i << 44, r.nbytes) for i, r in enumerate(planned.regions)]
        return Buffers(planned, spans, "cpu", [], {})


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


@dataclass(frozen=True)
class FleetConfig:
    """A simulated fleet: one model, its links, its seeds, its faults (rates per source)."""

    targets: int
    fanout: bool = True
    model_bytes: int = 16 * 10**9
    link_bps: float = 25e9
    hub_bps: float = 10e9
    reader_cap: int = 8
    seeds: int = 1
    ttl: float = 15.0
    attempt_timeout: float = 60.0
    #: each source but the first seed dies (or freezes) with this probability, at a random
    #: moment of its first transfer
    fail_rate: float = 0.0
    freeze_rate: float = 0.0
    seed: int = 1
    tensors: int = 291
    #: targets serve what they have landed while they load (partial sources, issue 24) and read
    #: parts from several sources at once, rarest first; else a target serves once loaded
    pipelined: bool = False
    #: with ``pipelined``: sources a target reads from at once, and the largest part
    stripe: int = 8
    max_part_bytes: int = 128 << 20


class FleetSimulation:
    """A fleet of targets loading one model at once through the real orchestrator and registry.

    Sources publish and heartbeat real records (``max_readers`` = the cap); every
    target runs a real :class:`~mx_orchestrator.Orchestrator` with
    :class:`FabricPeer` and :class:`FabricHub`; with ``fanout`` a target that
    loaded publishes itself one hop further than the source it read. Run
    :meth:`run` on :class:`~mx_orchestrator.testing.clock.VirtualClockLoop` with a
    registry wrapped by :func:`~mx_orchestrator.testing.clock.accounted` whose
    clock is :func:`~mx_orchestrator.testing.clock.virtual_wall_clock`.
    """

    def __init__(self, config: FleetConfig, registry: Any, *, policy: Policy | None = None) -> None:
        self.config = config
        self.registry = registry
        self.rng = random.Random(config.seed)
        self.fabric = Fabric(source_bps=config.link_bps, target_bps=config.link_bps, hub_bps=config.hub_bps)
        self.identity = ModelIdentity("fleet/model")
        # the model's real size, in tensors of about equal size: parts are runs of them
        each, extra = divmod(config.model_bytes, config.tensors)
        self.manifest = make_manifest(
            self.identity,
            [(f"layer.{i}.weight", "U8", (each + (i < extra),)) for i in range(config.tensors)],
        )
        #: what each partial source holds (the fabric's stand-in for its holdings array)
        self.holdings: dict[str, Holdings] = {}
        #: a fleet waits for its peers rather than falling back to the Hub
        self.policy = policy or Policy(capacity_waits=100_000)
        self.loaded_at: dict[str, float] = {}
        self.reports: dict[str, LoadReport] = {}
        self.failed_sources: set[str] = set()
        self.frozen_sources: set[str] = set()
        self.sources: list[str] = []

    def _transport(self, source_id: str, holdings: Holdings | None) -> dict[str, str]:
        """The record's advert: the source's regions (imaginary addresses) and, partial, its holdings."""
        spans = [(i << 44, r.nbytes) for i, r in enumerate(self.manifest.regions)]
        transport = dict(encode_advert(f"fabric-{source_id}", b"fabric", "DRAM", spans, 0))
        if holdings is not None:
            transport.update(encode_holdings((0, len(self.manifest.tensors))))
        return transport

    async def source(
        self, source_id: str, hops: int, first_seed: bool = False, holdings: Holdings | None = None
    ) -> None:
        """A serving process: publish, heartbeat; maybe die or freeze during its first transfer.

        With ``holdings``: a target still loading, published once as partial and once more whole
        when its holdings are complete."""
        config = self.config
        record = SourceRecord(
            source_id=source_id,
            identity_key=self.identity.key,
            generation=f"{source_id}-1",
            endpoint=f"fabric://{source_id}",
            heartbeat_at=virtual_wall_clock(),
            ttl=config.ttl,
            max_readers=config.reader_cap,
            hops=hops,
            partial=holdings is not None,
            transport=self._transport(source_id, holdings),
        )
        await self.registry.publish(record, self.manifest)
        self.sources.append(source_id)
        if holdings is not None:
            self.holdings[source_id] = holdings
        fate = self.rng.random()
        doom = None
        if not first_seed and fate < config.fail_rate:
            doom = "kill"
        elif not first_seed and fate < config.fail_rate + config.freeze_rate:
            doom = "freeze"
        async with anyio.create_task_group() as tg:
            if doom is not None:
                tg.start_soon(self._fault, source_id, doom, tg.cancel_scope)
            if holdings is not None:
                tg.start_soon(self._whole_when_complete, record, holdings)
            while True:
                await anyio.sleep(config.ttl / 3)
                await self.registry.heartbeat(source_id, record.generation)

    async def _whole_when_complete(self, record: SourceRecord, holdings: Holdings) -> None:
        await holdings.complete.wait()
        whole = replace(record, partial=False, heartbeat_at=virtual_wall_clock())
        await self.registry.publish(whole, self.manifest)

    async def _fault(self, source_id: str, doom: str, heartbeats: anyio.CancelScope) -> None:
        await self.fabric.first_reader(source_id)
        # the first transfer lasts at least this long (one reader alone on the link): strike within it
        alone = self.config.model_bytes / self.fabric.source_bps
        await anyio.sleep(self.rng.uniform(0.05, 0.95) * alone)
        if doom == "kill":
            self.fabric.kill(source_id)
            self.failed_sources.add(source_id)
        else:
            self.fabric.freeze(source_id)
            self.frozen_sources.add(source_id)
        heartbeats.cancel()  # a dead or stopped process sends none: its record expires with its TTL

    async def target(self, index: int, world: anyio.abc.TaskGroup) -> None:
        target_id = f"t{index:04d}"
        config = self.config
        nbytes = config.model_bytes
        if config.pipelined:
            peer: FabricPeer = FabricPartPeer(self.fabric, target_id, self.holdings)
        else:
            peer = FabricPeer(self.fabric, target_id, nbytes)
        orchestrator = Orchestrator(
            self.registry,
            [peer, FabricHub(self.fabric, target_id, nbytes)],
            target_id=target_id,
            policy=self.policy,
            attempt_timeout=config.attempt_timeout,
            probe_timeout=30.0,
            manifest_cache=ManifestCache(),  # every target is its own process
            stripe=config.stripe if config.pipelined else 1,
            max_part_bytes=config.max_part_bytes if config.pipelined else None,
        )
        holdings = Holdings(served_as=f"{target_id}-copy") if config.pipelined and config.fanout else None
        if holdings is not None:
            world.start_soon(self._serve_partial, f"{target_id}-copy", holdings)
        target = SimulatedTarget() if config.pipelined else None
        report = await orchestrator.load(self.identity, target, holdings=holdings)
        self.reports[target_id] = report
        if report.loaded:
            self.loaded_at[target_id] = anyio.current_time()
            if config.fanout and (holdings is None or not holdings.ready.is_set()):
                hops = 0 if report.source_hops is None else report.source_hops + 1
                world.start_soon(self.source, f"{target_id}-copy", hops)

    async def _serve_partial(self, source_id: str, holdings: Holdings) -> None:
        """A loading target: a partial source from the moment its memory exists."""
        await holdings.ready.wait()
        await self.source(source_id, holdings.hops, holdings=holdings)

    async def run(self) -> dict[str, Any]:
        """Seeds first, then every target at the same moment; returns :meth:`summary`."""
        began = anyio.current_time()
        async with anyio.create_task_group() as world:
            world.start_soon(self.fabric.run)
            for s in range(self.config.seeds):
                world.start_soon(self.source, f"seed-{s}", 0, s == 0)
            await anyio.sleep(0.001)  # the seeds are published before the fleet starts
            async with anyio.create_task_group() as fleet:
                for i in range(self.config.targets):
                    fleet.start_soon(self.target, i, world)
            world.cancel_scope.cancel()
        return self.summary(began)

    def summary(self, began: float) -> dict[str, Any]:
        """What a fleet run showed: times (simulated seconds), caps, faults, where bytes came from."""
        config = self.config
        reports = list(self.reports.values())
        loaded_bytes = Counter(
            {
                t: sum(a.outcome.bytes_moved for a in r.attempts if isinstance(a.outcome, Loaded))
                for t, r in self.reports.items()
            }
        )
        times = sorted(t - began for t in self.loaded_at.values())
        peak = max(self.fabric.peak_readers.values(), default=0)
        hops = Counter(r.source_hops for r in reports if r.loaded)
        return {
            "targets": config.targets,
            "fanout": config.fanout,
            "seconds_to_all_loaded": round(times[-1], 3) if times else None,
            "median_seconds_to_loaded": round(times[len(times) // 2], 3) if times else None,
            "all_loaded": len(self.loaded_at) == config.targets,
            "pipelined": config.pipelined,
            # every byte exactly once: a target whose landed parts add up to more read some twice
            "loaded_twice": sum(1 for n in loaded_bytes.values() if n > config.model_bytes),
            "bytes_read_twice": sum(max(0, n - config.model_bytes) for n in loaded_bytes.values()),
            "partial_sources": len(self.holdings),
            "max_readers_per_source": peak,
            "reader_cap": config.reader_cap,
            "cap_held": config.reader_cap == 0 or peak <= config.reader_cap,
            "hub_bytes": int(self.fabric.bytes_through.get("hub", 0.0)),
            "peer_bytes": int(
                sum(v for k, v in self.fabric.bytes_through.items() if _source_of(k) is not None)
            ),
            "sources_at_end": len(self.sources),
            "failed_sources": len(self.failed_sources),
            "frozen_sources": len(self.frozen_sources),
            "stale_marks": sum(a.marked_stale for r in reports for a in r.attempts),
            "full_sources_marked_stale": sum(
                a.marked_stale for r in reports for a in r.attempts if a.outcome.name == "SourceBusy"
            ),
            "loaded_from_hops": {str(k): hops[k] for k in sorted(h for h in hops if h is not None)}
            | ({"hub": hops[None]} if None in hops else {}),
            "capacity_waits": sum(r.capacity_waits for r in reports),
            # what the fleet cost the registry (the calls an accounted registry counted), per target
            "registry_calls_per_target": {
                name: round(n / max(1, config.targets), 1)
                for name, n in sorted(getattr(self.registry, "calls", {}).items())
            },
            "outcomes": dict(Counter(a.outcome.name for r in reports for a in r.attempts)),
        }
