"""The peer attempt: a pure :func:`check` of everything decidable before I/O, then a short :func:`transfer`.

:func:`check` reads the candidate's advertisement (untrusted: its transport
fields are validated against its manifest: region count and sizes, memory
type, metadata size), asks the target which manifest it will have, and plans
the descriptors with the strategy's pure read planner. It returns a
:class:`PullPlan` or the outcome that ends the attempt (``LayoutMismatch``,
``ManifestMismatch``, ``SourceUnreachable``, ``NotApplicable``), having moved
and allocated nothing.

:func:`transfer` carries a plan out through an :class:`~._backends.rdma.RdmaAgent`:
connect, allocate (if the target has no memory yet), register, READ under the
attempt's deadline, verify. Every failure arrives as an
:class:`~._backends.EdgeFailure` already mapped to its outcome type; the
registration and the remote agent are released on every path.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import contextlib
import hashlib
import json
import time
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, replace
from typing import Any

import anyio

from ._backends import EdgeFailure
from ._backends.rdma import RdmaAgent, descriptor_rows
from .buffers import Buffers
from .errors import ConfigError
from .layout import Descriptors
from .models import Candidate, Manifest
from .outcomes import (
    Corrupt,
    LayoutMismatch,
    Loaded,
    LocalFailure,
    ManifestMismatch,
    NotApplicable,
    Outcome,
    SourceFailed,
    SourceUnreachable,
    Superseded,
    TimedOut,
)
from .strategy import AttemptContext
from .target import Target, TargetMismatch

__all__ = [
    "ConnectionPool",
    "PeerAdvert",
    "PartReader",
    "PeerStrategy",
    "PullPlan",
    "ReadPlanner",
    "allocate",
    "check",
    "parse_advert",
    "pool_for",
    "release_connections",
    "transfer",
    "verify_landed",
]

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
    return PeerAdvert(str(name), metadata, mem, spans, device_ids.pop() if device_ids else 0)


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


class ConnectionPool:
    """Remote agents kept across attempts and loads, so a second pull from a source skips the connect.

    Keyed by the source's id, process generation and metadata: a source that
    restarts or re-publishes is a new key, and connecting to it drops the old
    generation's entry. An entry is dropped when an attempt through it fails
    (the caller says so), when it sat unused for ``idle_seconds`` (the source
    may have expired), and the least recently used one goes when more than
    ``limit`` are held. :meth:`close` drops them all.
    """

    def __init__(self, agent: RdmaAgent, *, limit: int = 64, idle_seconds: float = 120.0) -> None:
        self.agent = agent
        self.limit = limit
        self.idle_seconds = idle_seconds
        self._entries: OrderedDict[tuple[str, str, bytes], tuple[str, float]] = OrderedDict()
        self._in_use: dict[tuple[str, str, bytes], int] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def acquire(self, source_id: str, generation: str, metadata: bytes) -> tuple[tuple[str, str, bytes], str]:
        """The remote agent's name for this source, connecting only when none is held (EdgeFailure)."""
        key = (source_id, generation, hashlib.sha256(metadata).digest())
        now = time.monotonic()
        for other in [k for k in self._entries if k[0] == source_id and k != key]:
            self._disconnect(other)  # an older generation, or metadata that changed
        for other, (_, used) in list(self._entries.items()):
            if now - used > self.idle_seconds and not self._in_use.get(other):
                self._disconnect(other)
        if key in self._entries:
            name, _ = self._entries.pop(key)
        else:
            name = self.agent.connect(metadata)
        self._entries[key] = (name, now)
        self._in_use[key] = self._in_use.get(key, 0) + 1
        while len(self._entries) > self.limit:
            oldest = next((k for k in self._entries if not self._in_use.get(k)), None)
            if oldest is None:
                break
            self._disconnect(oldest)
        return key, name

    def release(self, key: tuple[str, str, bytes], *, failed: bool) -> None:
        """Done with ``key``; ``failed`` drops the connection (the source failed or lied)."""
        count = self._in_use.get(key, 0) - 1
        if count <= 0:
            self._in_use.pop(key, None)
        else:
            self._in_use[key] = count
        if failed:
            self._disconnect(key)

    def _disconnect(self, key: tuple[str, str, bytes]) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.agent.disconnect(entry[0])

    def close(self) -> None:
        for key in list(self._entries):
            self._disconnect(key)


_pools: weakref.WeakKeyDictionary[Any, ConnectionPool] = weakref.WeakKeyDictionary()


def pool_for(agent: RdmaAgent) -> ConnectionPool:
    """The one connection pool of ``agent`` (shared by every strategy that uses it)."""
    pool = _pools.get(agent)
    if pool is None:
        pool = _pools[agent] = ConnectionPool(agent)
    return pool


def release_connections() -> None:
    """Drop every pooled remote agent of this process (shutdown, tests asserting no leaks)."""
    for pool in list(_pools.values()):
        pool.close()


#: Gives the transfer its agent, waiting while it is still being made (EdgeFailure when there is none).
AgentSource = Callable[[], Awaitable[RdmaAgent]]

_FAILED = (SourceFailed, TimedOut, SourceUnreachable)


async def allocate(plan: PullPlan, target: Target, ctx: AttemptContext, strategy: str) -> Buffers | Outcome:
    """The target's memory for ``plan`` (timed as ``allocate``), or the ``LocalFailure`` ending the attempt.

    Pre-faulting a large target takes a while: it runs off the event loop.
    """
    began = anyio.current_time()
    try:
        with ctx.phases.timed("allocate"):
            return await anyio.to_thread.run_sync(target.prepare, plan.local_manifest)
    except (MemoryError, RuntimeError) as exc:  # torch's out-of-memory error is a RuntimeError
        return LocalFailure(
            strategy=strategy,
            source_id=ctx.source_id,
            seconds=anyio.current_time() - began,
            detail=f"allocation failed: {exc}",
        )


async def transfer(
    plan: PullPlan, target: Target, agent_source: AgentSource, ctx: AttemptContext, strategy: str
) -> Outcome:
    """Connect, allocate, register, READ, verify; each phase timed into ``ctx.phases``.

    Cheap checks before expensive ones: the source must answer the connect
    before the target allocates anything for what its record claims (a dead or
    lying record costs no memory). Every acquired resource is released on every
    path.
    """
    began = anyio.current_time()
    ctx.phases.planned_bytes = plan.nbytes
    try:
        with ctx.phases.timed("agent"):
            agent = await agent_source()
    except EdgeFailure as exc:
        return _failed(exc, plan, ctx, strategy, began)

    async def allocate_and_read(remote_name: str) -> Outcome:
        allocated = await allocate(plan, target, ctx, strategy)
        if not isinstance(allocated, Buffers):
            return allocated
        buffers = allocated
        with ctx.phases.timed("register"):
            release = agent.register([(a, n, buffers.device_id) for a, n in buffers.spans], buffers.mem_type)
        try:
            seconds = await _read(agent, remote_name, plan, buffers, ctx)
        finally:
            release()
        return await verify_landed(
            plan, target, ctx, strategy, seconds, began, f"{len(plan.local)} descriptors"
        )

    return await _connected(agent, plan, ctx, strategy, began, allocate_and_read)


def _failed(exc: EdgeFailure, plan: PullPlan, ctx: AttemptContext, strategy: str, began: float) -> Outcome:
    outcome = exc.outcome(strategy, ctx.source_id, anyio.current_time() - began)
    if isinstance(outcome, TimedOut):  # what the policy needs to tell a stall from a short deadline
        outcome = replace(outcome, deadline=ctx.deadline - began, planned_bytes=plan.nbytes)
    return outcome


async def _connected(
    agent: RdmaAgent,
    plan: PullPlan,
    ctx: AttemptContext,
    strategy: str,
    began: float,
    body: Callable[[str], Awaitable[Outcome]],
) -> Outcome:
    """``await body(remote agent name)`` over a pooled connection to the plan's source.

    The connection goes back to the pool, or is dropped when the attempt failed
    through it or was cancelled (it is not trusted again); an
    :class:`EdgeFailure` becomes the attempt's outcome.
    """
    pool = pool_for(agent)
    record = ctx.candidate.record if ctx.candidate is not None else None
    key: tuple[str, str, bytes] | None = None
    outcome: Outcome | None = None
    try:
        with ctx.phases.timed("connect"):
            key, remote_name = pool.acquire(
                ctx.source_id or "", record.generation if record else "", plan.advert.metadata
            )
        if remote_name != plan.advert.agent_name:
            outcome = SourceUnreachable(
                strategy=strategy,
                source_id=ctx.source_id,
                seconds=anyio.current_time() - began,
                detail=f"metadata names agent {remote_name!r}, record says {plan.advert.agent_name!r}",
            )
            return outcome
        outcome = await body(remote_name)
        return outcome
    except EdgeFailure as exc:
        outcome = _failed(exc, plan, ctx, strategy, began)
        return outcome
    finally:
        if key is not None:
            pool.release(key, failed=outcome is None or isinstance(outcome, (*_FAILED, Corrupt)))


async def _read(
    agent: RdmaAgent, remote_name: str, plan: PullPlan, buffers: Buffers, ctx: AttemptContext
) -> float:
    """The READ of ``plan`` into ``buffers`` under the attempt's deadline (EdgeFailure on failure)."""
    with ctx.phases.timed("transfer"):
        seconds = await agent.read(
            remote_name,
            descriptor_rows(plan.local_blocks(buffers.spans), buffers.device_id),
            descriptor_rows(list(plan.remote), plan.advert.device_id),
            local_mem=buffers.mem_type,
            remote_mem=plan.advert.mem_type,
            deadline=ctx.deadline,
        )
    if isinstance(ctx.target, Target):
        ctx.target.bytes_written += plan.nbytes
    return seconds


class PartReader:
    """Reads the parts of one striped load into a target whose memory already exists.

    The target's buffers are registered once per agent for the whole load (not
    once per part), connections come from the agent's pool; :meth:`close`
    releases every registration (the driver calls it on every path).
    """

    def __init__(self, target: Target) -> None:
        if target.buffers is None:
            raise RuntimeError("a striped load allocates its target before reading parts")
        self.target = target
        self.buffers: Buffers = target.buffers
        self._registered: dict[int, tuple[RdmaAgent, Callable[[], None]]] = {}

    async def read(
        self,
        strategy: PeerStrategy,
        plan: PullPlan,
        tensors: Collection[int],
        ctx: AttemptContext,
        settle: Callable[[], Awaitable[bool]] | None = None,
    ) -> Outcome:
        """Read the local manifest's ``tensors`` (indices) from ``plan``'s source and verify them.

        ``settle``: awaited once the READ completed, before verification; False
        means another copy of the same bytes won (a hedge), so this one is
        ``Superseded`` and not verified.
        """
        began = anyio.current_time()
        part = plan.restricted(tensors)
        ctx.phases.planned_bytes = part.nbytes
        try:
            with ctx.phases.timed("agent"):
                agent = await strategy._agent()
            with ctx.phases.timed("register"):
                self._register(agent)
        except EdgeFailure as exc:
            return _failed(exc, part, ctx, strategy.name, began)
        names = [plan.local_manifest.tensors[i].name for i in tensors]

        async def read_and_verify(remote_name: str) -> Outcome:
            seconds = await _read(agent, remote_name, part, self.buffers, ctx)
            if settle is not None and not await settle():
                return Superseded(
                    strategy=strategy.name,
                    source_id=ctx.source_id,
                    bytes_moved=part.nbytes,
                    seconds=seconds,
                    detail="another source landed these bytes first",
                )
            return await verify_landed(
                part, self.target, ctx, strategy.name, seconds, began, f"{len(part.local)} descriptors", names
            )

        return await _connected(agent, part, ctx, strategy.name, began, read_and_verify)

    def _register(self, agent: RdmaAgent) -> None:
        if id(agent) not in self._registered:
            buffers = self.buffers
            release = agent.register([(a, n, buffers.device_id) for a, n in buffers.spans], buffers.mem_type)
            self._registered[id(agent)] = (agent, release)

    def close(self) -> None:
        for _, release in self._registered.values():
            release()
        self._registered.clear()


async def verify_landed(
    plan: PullPlan,
    target: Target,
    ctx: AttemptContext,
    strategy: str,
    seconds: float,
    began: float,
    detail: str,
    names: Collection[str] | None = None,
) -> Outcome:
    """The outcome of a plan's bytes that landed: against the pin's digests when pinned, else the
    source's checksums; ``names``: only those tensors landed (a part), the rest are not checked.

    A pinned load is never ``verified`` unless every digest was checked (a pin
    is verified even with ``verify=False``: it is the caller's explicit demand).
    """
    source, total = plan.source, plan.nbytes
    if names is None:  # what landed: the target's tensors (a module target may take a subset)
        names = [spec.name for spec in plan.local_manifest.tensors]
    if ctx.progress is not None:
        ctx.progress(total, total)
    sid = ctx.source_id
    if ctx.expect is not None:
        with ctx.phases.timed("verify"):
            bad: list[str] | None = await anyio.to_thread.run_sync(target.verify_pinned, source, names)
        what = "SHA-256 of the pinned content"
    elif not target.verify:
        return Loaded(strategy=strategy, source_id=sid, bytes_moved=total, seconds=seconds, detail=detail)
    else:
        with ctx.phases.timed("verify"):
            bad = await anyio.to_thread.run_sync(target.verify_against, source, names)
        what = "checksums"
    if bad is None:
        detail += f"; unverified: no checksum shared with the source ({source.checksum_algorithm})"
        return Loaded(strategy=strategy, source_id=sid, bytes_moved=total, seconds=seconds, detail=detail)
    if bad:
        return Corrupt(
            strategy=strategy,
            source_id=sid,
            bytes_moved=total,
            seconds=anyio.current_time() - began,
            bad_tensors=tuple(bad),
            detail=f"{len(bad)} tensors failed their {what}, e.g. {bad[:3]}",
        )
    detail += f"; {what} verified in {ctx.phases.seconds.get('verify', 0.0):.3f}s"
    return Loaded(
        strategy=strategy, source_id=sid, bytes_moved=total, seconds=seconds, verified=True, detail=detail
    )


class PeerStrategy:
    """Base of the RDMA strategies: each names its descriptor planner and what a refused plan means.

    ``agent``: the :class:`~._backends.rdma.RdmaAgent` to transfer with
    (default: the process-wide NIXL agent, created on first use).
    """

    name = "peer"
    uses_peers = True
    #: the pure planner: (source, remote spans, target, local spans) -> descriptors or a reason
    plan: ReadPlanner
    #: whether a refused plan is a LayoutMismatch (else a ManifestMismatch)
    refusal_is_layout = False

    def __init__(self, *, agent: RdmaAgent | None = None) -> None:
        self.agent = agent
        if agent is None:
            from ._backends.nixl import start_agent

            start_agent()  # created in the background while the caller gets on with its start-up

    @classmethod
    def from_options(cls, options: Any) -> PeerStrategy:
        """Entry-point factory: the CLI's options do not concern peer strategies."""
        return cls()

    async def _agent(self) -> RdmaAgent:
        if self.agent is not None:
            return self.agent
        from ._backends.nixl import agent_ready

        try:
            return await agent_ready()
        except ConfigError as exc:
            raise EdgeFailure(NotApplicable, str(exc)) from exc

    async def prewarm(self) -> None:
        """Wait until the transport's agent exists (frameworks call this during their own start-up)."""
        with contextlib.suppress(EdgeFailure):  # no transport: the attempts will say NotApplicable
            await self._agent()

    async def aclose(self) -> None:
        """Drop the connections this strategy's agent keeps (shared with other strategies on it)."""
        if self.agent is not None:
            pool_for(self.agent).close()
        else:
            release_connections()

    def check_for(self, ctx: AttemptContext) -> PullPlan | Outcome:
        """This strategy's :func:`check` of the attempt's candidate and target (no I/O)."""
        return check(
            ctx.candidate,
            ctx.target,
            type(self).plan,
            strategy=self.name,
            refusal_is_layout=self.refusal_is_layout,
            expect=ctx.expect,
        )

    async def attempt(self, ctx: AttemptContext) -> Outcome:
        plan = self.check_for(ctx)
        if not isinstance(plan, PullPlan):
            return plan
        assert isinstance(ctx.target, Target)  # check() returned a plan only for a Target
        return await transfer(plan, ctx.target, self._agent, ctx, self.name)
