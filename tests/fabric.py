"""The fake fabric the in-process peer tests share: real sources, registry and target on a fake RDMA network."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import torch

from mx_orchestrator import DEFAULT_POLICY, LoadReport, ModelIdentity, Orchestrator, Policy
from mx_orchestrator._backends.pool import pool_for
from mx_orchestrator.buffers import Buffers
from mx_orchestrator.source import WeightSource, load_weights
from mx_orchestrator.testing import FakeRdmaAgent, FakeRdmaNetwork, FakeRegistry
from strategies.rdma_region import RdmaRegion
from strategies.rdma_tensor import RdmaTensor


class Fabric:
    """One fake network, one registry, the sources started on them and the target's agent."""

    def __init__(self, identity: ModelIdentity, clock: Callable[[], float] = time.time) -> None:
        self.identity = identity
        self.network = FakeRdmaNetwork()
        self.registry = FakeRegistry(clock=clock)
        self.agent = self.network.agent("target")
        self.sources: dict[str, tuple[FakeRdmaAgent, Buffers]] = {}

    def orchestrator(
        self,
        *strategies: Any,
        attempt_timeout: float = 5.0,
        policy: Policy = DEFAULT_POLICY,
        **options: Any,
    ) -> Orchestrator:
        """Sources ranked in the order they were started."""
        chosen = list(strategies) or [RdmaRegion(agent=self.agent), RdmaTensor(agent=self.agent)]
        order = {sid: float(i) for i, sid in enumerate(self.sources)}
        options.setdefault("rank_window", 0.05)
        return Orchestrator(
            self.registry,
            chosen,
            policy=policy,
            attempt_timeout=attempt_timeout,
            selection=lambda _t: lambda c: (order.get(c.source_id, 99.0),),
            **options,
        )

    async def load(self, target: Any, *strategies: Any, **options: Any) -> LoadReport:
        return await self.orchestrator(*strategies, **options).load(self.identity, target)

    def assert_nothing_held(self, *, after_closing_the_pool: bool = True) -> None:
        """Nothing held by any agent; pooled connections are dropped first unless told otherwise."""
        if after_closing_the_pool:
            pool_for(self.agent).close()
        for agent in self.network.agents.values():
            stats = agent.stats
            assert (stats.handles_open, stats.remote_agents) == (0, 0), agent.name
        assert self.agent.stats.registrations == 0


@asynccontextmanager
async def fabric(
    identity: ModelIdentity,
    weights: Callable[[], dict[str, torch.Tensor]],
    *specs: tuple[str, str] | tuple[str, str, dict[str, Any]],
    clock: Callable[[], float] = time.time,
    **faults: dict[str, Any],
) -> AsyncIterator[Fabric]:
    """Sources ``(source_id, layout[, WeightSource options, or "weights": another callable])`` serving
    ``weights()``, in rank order;
    ``faults[sid]`` for their agents; ``clock`` is the registry's (virtual time: ``virtual_wall_clock``)."""
    f = Fabric(identity, clock)
    async with anyio.create_task_group() as tg:
        for sid, layout, *extra in specs:
            options: dict[str, Any] = {"poll_interval": 0.01, **(extra[0] if extra else {})}
            served_weights = options.pop("weights", weights)  # another revision, say
            agent = f.network.agent(sid, **faults.get(sid, {}))
            served = load_weights(identity, served_weights(), layout)
            f.sources[sid] = (agent, served)
            await tg.start(WeightSource(f.registry, served, source_id=sid, agent=agent, **options).run)
        yield f
        tg.cancel_scope.cancel()
    f.assert_nothing_held()
