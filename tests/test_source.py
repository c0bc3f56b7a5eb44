"""The serving side's lifecycle, with the public fake RDMA agent: publish, heartbeat, drain, unpublish."""

from __future__ import annotations

import anyio
import torch

from mx_orchestrator import ModelIdentity, SourceState
from mx_orchestrator.source import WeightSource, load_weights
from mx_orchestrator.testing import FakeRdmaAgent, FakeRegistry


def test_layouts_build_valid_manifests_with_checksums(identity: ModelIdentity) -> None:
    tensors = {f"t{i}": torch.arange(10 * (i + 1), dtype=torch.float32) for i in range(5)}
    for layout in ("arena", "tensor", "chunked:128"):
        weights = load_weights(identity, tensors, layout)
        assert {s.name for s in weights.manifest.tensors} == set(tensors)
        assert all(s.checksum for s in weights.manifest.tensors)
        assert len(weights.spans) == len(weights.manifest.regions)
        for name, tensor in tensors.items():
            assert torch.equal(weights.tensors[name], tensor)
    assert len(load_weights(identity, tensors, "arena").spans) == 1
    assert len(load_weights(identity, tensors, "chunked:128").spans) > 1


async def test_shutdown_drains_in_flight_readers_then_unpublishes(identity: ModelIdentity) -> None:
    registry = FakeRegistry()
    agent = FakeRdmaAgent("src-agent")
    weights = load_weights(identity, {"w": torch.ones(16)}, "arena")
    source = WeightSource(registry, weights, source_id="src", ttl=30, agent=agent, drain_timeout=5)
    async with anyio.create_task_group() as tg:
        record = await tg.start(source.run)
        assert agent.stats.registrations == 1 and (await registry.list(identity.key))[0].source_id == "src"
        await registry.lease_reader("src", record.generation, "t/run", 30)  # a reader is mid-transfer
        tg.cancel_scope.cancel()
        with anyio.CancelScope(shield=True):
            await anyio.sleep(0.2)
            during = await registry.get("src")
            assert during is not None and during.state is SourceState.DRAINING
            await registry.lease_reader("src", record.generation, "t/run", None)  # the reader finishes
            with anyio.fail_after(2):
                while await registry.get("src") is not None:  # noqa: ASYNC110 - polling the registry is the point
                    await anyio.sleep(0.02)
    assert agent.stats.registrations == 0 and agent.polls > 0
    assert ("drain", "src") in registry.calls
