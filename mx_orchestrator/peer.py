"""The peer read: connect, allocate, register, READ, verify, over an :class:`~._backends.rdma.RdmaAgent`.

Everything decidable before I/O is decided by :func:`~mx_orchestrator.pullplan.check`
(a :class:`~mx_orchestrator.pullplan.PullPlan`); this module carries a plan out.
A read is split the way the load driver (:mod:`mx_orchestrator.load`) needs it:

* :meth:`PeerStrategy.open` connects to the source (through the agent's pooled
  remote agents) and returns a :class:`PeerConnection`, or the outcome that
  ends the attempt: a source is asked to answer before the target allocates
  anything for what its record claims;
* :meth:`PeerConnection.read` READs one part (the plan cut down to some
  tensors) under the attempt's deadline and verifies what landed;
* :class:`TargetRegistrations` registers the target's memory once per agent for
  a whole load and releases it when the load ends.

:meth:`PeerStrategy.attempt` (the :class:`~mx_orchestrator.strategy.Strategy`
contract) is the same steps for the whole model at once. Every failure arrives
as an :class:`~._backends.EdgeFailure` already mapped to its outcome type; the
connection, registrations and handles are released on every path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Collection
from dataclasses import replace
from typing import Any, Protocol, runtime_checkable

import anyio

from ._backends import EdgeFailure
from ._backends.pool import PoolKey, pool_for, release_connections
from ._backends.rdma import RdmaAgent, Release, descriptor_rows
from .buffers import Buffers
from .errors import ConfigError
from .holdings import held_tensors
from .landing import verify_landed
from .outcomes import (
    Corrupt,
    LocalFailure,
    NotApplicable,
    Outcome,
    PartNotHeld,
    SourceFailed,
    SourceUnreachable,
    Superseded,
    TimedOut,
)
from .pullplan import PullPlan, ReadPlanner, check
from .strategy import AttemptContext
from .target import Target

__all__ = [
    "PartCapable",
    "PartConnection",
    "PeerConnection",
    "PeerStrategy",
    "Settle",
    "TargetRegistrations",
    "allocate",
]

#: Awaited once a part's READ completed, before it is verified: False when another copy won (a hedge).
Settle = Callable[[], Awaitable[bool]]

#: outcomes after which a connection is not trusted again
_FAILED = (SourceFailed, TimedOut, SourceUnreachable, Corrupt)


class TargetRegistrations:
    """The target's memory registered once per agent for one load; :meth:`close` releases it all."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self._registered: dict[int, tuple[RdmaAgent, Release]] = {}

    def ensure(self, agent: RdmaAgent) -> Buffers:
        """The target's buffers, registered with ``agent`` (EdgeFailure when registration fails)."""
        buffers = self.target.buffers
        if buffers is None:
            raise RuntimeError("the target's memory is allocated before any part is read")
        if id(agent) not in self._registered:
            release = agent.register([(a, n, buffers.device_id) for a, n in buffers.spans], buffers.mem_type)
            self._registered[id(agent)] = (agent, release)
        return buffers

    def close(self) -> None:
        for _, release in self._registered.values():
            release()
        self._registered.clear()


@runtime_checkable
class PartConnection(Protocol):
    """An open source for one load: reads parts of its plan until closed."""

    async def read(
        self, plan: PullPlan, ctx: AttemptContext, names: Collection[str] | None, settle: Settle | None
    ) -> Outcome: ...

    async def held(self, plan: PullPlan, ctx: AttemptContext) -> frozenset[int] | Outcome | None:
        """The target's tensors (indices into the plan's local manifest) the source holds now, by its
        own answer; ``None``: a whole source, it holds all; an outcome: it could not answer."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class PartCapable(Protocol):
    """A strategy that can read any part of a model from one source: the load driver stripes it."""

    name: str
    uses_peers: bool

    def check_for(self, ctx: AttemptContext) -> PullPlan | Outcome: ...

    async def open(
        self, plan: PullPlan, ctx: AttemptContext, registrations: TargetRegistrations
    ) -> PartConnection | Outcome: ...


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


def _failed(exc: EdgeFailure, plan: PullPlan, ctx: AttemptContext, strategy: str, began: float) -> Outcome:
    outcome = exc.outcome(strategy, ctx.source_id, anyio.current_time() - began)
    if isinstance(outcome, TimedOut):  # what the policy needs to tell a stall from a short deadline
        outcome = replace(outcome, deadline=ctx.deadline - began, planned_bytes=plan.nbytes)
    return outcome


class PeerConnection:
    """One source's pooled remote agent, held while a load reads from it (see :meth:`PeerStrategy.open`)."""

    def __init__(
        self,
        strategy: str,
        agent: RdmaAgent,
        key: PoolKey,
        remote_name: str,
        registrations: TargetRegistrations,
    ) -> None:
        self.strategy = strategy
        self.agent = agent
        self.key = key
        self.remote_name = remote_name
        self.registrations = registrations
        #: an attempt through it failed (or was cancelled): the pool drops it on close
        self.failed = False
        self._closed = False
        #: a partial source's holdings land here (host memory registered with our agent)
        self._holdings: Any = None
        self._holdings_release: Release | None = None

    async def held(self, plan: PullPlan, ctx: AttemptContext) -> frozenset[int] | Outcome | None:
        """A partial source's holdings, READ one-sided from its memory (see :mod:`.holdings`)."""
        block = plan.advert.holdings
        if block is None:
            return None
        began = anyio.current_time()
        try:
            local = self._holdings_block(block[1])
            await self.agent.read(
                self.remote_name,
                descriptor_rows([local], 0),
                descriptor_rows([block], 0),
                local_mem="DRAM",
                remote_mem="DRAM",
                deadline=ctx.deadline,
            )
        except EdgeFailure as exc:
            self.failed = True
            return _failed(exc, plan, ctx, self.strategy, began)
        return held_tensors(self._holdings.data, plan.source, plan.local_manifest)

    def _holdings_block(self, nbytes: int) -> tuple[int, int]:
        import numpy as np

        if self._holdings is None or self._holdings.nbytes != nbytes:
            self._release_holdings()
            self._holdings = np.zeros(nbytes, dtype=np.uint8)
            address = int(self._holdings.ctypes.data)
            self._holdings_release = self.agent.register([(address, nbytes, 0)], "DRAM")
        return int(self._holdings.ctypes.data), nbytes

    def _release_holdings(self) -> None:
        if self._holdings_release is not None:
            self._holdings_release()
            self._holdings_release = None
        self._holdings = None

    async def read(
        self, plan: PullPlan, ctx: AttemptContext, names: Collection[str] | None, settle: Settle | None
    ) -> Outcome:
        """READ ``plan`` (the whole plan or a part of it) into the target and verify what landed.

        ``names``: the tensors the part holds (``None``: the plan's whole target
        manifest); ``settle``: see :data:`Settle`.
        """
        began = anyio.current_time()
        ctx.phases.planned_bytes = plan.nbytes
        outcome: Outcome | None = None
        try:
            with ctx.phases.timed("register"):
                buffers = self.registrations.ensure(self.agent)
            with ctx.phases.timed("transfer"):
                seconds = await self.agent.read(
                    self.remote_name,
                    descriptor_rows(plan.local_blocks(buffers.spans), buffers.device_id),
                    descriptor_rows(list(plan.remote), plan.advert.device_id),
                    local_mem=buffers.mem_type,
                    remote_mem=plan.advert.mem_type,
                    deadline=ctx.deadline,
                )
            target = self.registrations.target
            target.bytes_written += plan.nbytes
            taken_back = await self._taken_back(plan, ctx, names)
            if taken_back is not None:
                outcome = taken_back
            elif settle is not None and not await settle():
                outcome = Superseded(
                    strategy=self.strategy,
                    source_id=ctx.source_id,
                    bytes_moved=plan.nbytes,
                    seconds=seconds,
                    detail="another source landed these bytes first",
                )
            else:
                outcome = await verify_landed(
                    plan, target, ctx, self.strategy, seconds, began, f"{len(plan.local)} descriptors", names
                )
        except EdgeFailure as exc:
            outcome = _failed(exc, plan, ctx, self.strategy, began)
        finally:
            if outcome is None or isinstance(outcome, _FAILED):
                self.failed = True
        return outcome

    async def _taken_back(
        self, plan: PullPlan, ctx: AttemptContext, names: Collection[str] | None
    ) -> Outcome | None:
        """A partial source's second look, after the bytes moved: ``PartNotHeld`` when it no longer
        holds a tensor of the part (it took it back: its content proved false), else ``None``."""
        if plan.advert.holdings is None:
            return None
        held = await self.held(plan, ctx)
        if held is None or not isinstance(held, frozenset):
            return held
        wanted = set(names) if names is not None else None
        missing = [
            spec.name
            for i, spec in enumerate(plan.local_manifest.tensors)
            if (wanted is None or spec.name in wanted) and i not in held
        ]
        if not missing:
            return None
        return PartNotHeld(
            strategy=self.strategy,
            source_id=ctx.source_id,
            bytes_moved=plan.nbytes,
            detail=f"the partial source took back {len(missing)} tensors while they were read, "
            f"e.g. {missing[:2]}: not kept",
        )

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._release_holdings()
            pool_for(self.agent).release(self.key, failed=self.failed)


class PeerStrategy:
    """Base of the RDMA strategies: each names its descriptor planner and what a refused plan means.

    ``agent``: the :class:`~._backends.rdma.RdmaAgent` to transfer with
    (default: the process-wide NIXL agent, created on first use). Part-capable
    (:class:`PartCapable`): the load driver reads parts through :meth:`open`.
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
        """This strategy's :func:`~mx_orchestrator.pullplan.check` of the attempt (no I/O)."""
        return check(
            ctx.candidate,
            ctx.target,
            type(self).plan,
            strategy=self.name,
            refusal_is_layout=self.refusal_is_layout,
            expect=ctx.expect,
        )

    async def open(
        self, plan: PullPlan, ctx: AttemptContext, registrations: TargetRegistrations
    ) -> PeerConnection | Outcome:
        """Connect to the plan's source (a pooled remote agent): the connection, or why not."""
        began = anyio.current_time()
        try:
            with ctx.phases.timed("agent"):
                agent = await self._agent()
            record = ctx.candidate.record if ctx.candidate is not None else None
            with ctx.phases.timed("connect"):
                key, remote_name = pool_for(agent).acquire(
                    ctx.source_id or "",
                    record.generation if record else "",
                    plan.advert.metadata,
                    anyio.current_time(),
                )
        except EdgeFailure as exc:
            return _failed(exc, plan, ctx, self.name, began)
        connection = PeerConnection(self.name, agent, key, remote_name, registrations)
        if remote_name != plan.advert.agent_name:
            connection.failed = True
            connection.close()
            return SourceUnreachable(
                strategy=self.name,
                source_id=ctx.source_id,
                seconds=anyio.current_time() - began,
                detail=f"metadata names agent {remote_name!r}, record says {plan.advert.agent_name!r}",
            )
        return connection

    async def attempt(self, ctx: AttemptContext) -> Outcome:
        """The whole model from one source in one READ: check, connect, allocate, read, verify."""
        plan = self.check_for(ctx)
        if not isinstance(plan, PullPlan):
            return plan
        target = ctx.target
        assert isinstance(target, Target)  # check() returned a plan only for a Target
        registrations = TargetRegistrations(target)
        connection = await self.open(plan, ctx, registrations)
        if not isinstance(connection, PeerConnection):
            return connection
        try:
            allocated = await allocate(plan, target, ctx, self.name)
            if not isinstance(allocated, Buffers):
                return allocated
            return await connection.read(plan, ctx, None, None)
        finally:
            registrations.close()
            connection.close()
