"""Unit-test your integration with mx_orchestrator's public fakes: no NIXL, no network, milliseconds.

Run with ``pytest examples/test_with_fakes.py``. The code under test is a
service's start-up routine; the fakes script what each source does.
"""

from __future__ import annotations

import anyio

from mx_orchestrator import LayoutMismatch, ModelIdentity, Orchestrator, SourceFailed, SourceState
from mx_orchestrator.testing import FakeStrategy, fail, scenario, succeed, wedge

IDENTITY = ModelIdentity("acme/chat-model")


async def start_service(orchestrator: Orchestrator) -> str:
    """The integration under test: load weights, report where they came from."""
    report = await orchestrator.load(IDENTITY)
    if not report.loaded:
        raise RuntimeError(report.reason)
    final = report.final
    assert final is not None
    return f"{final.strategy}:{final.source_id or 'hub'}"


def test_service_falls_back_to_the_hub_and_keeps_mismatched_peers_ready() -> None:
    async def main() -> None:
        registry, prober = await scenario(IDENTITY, ["peer-a", "peer-b"])
        peers = FakeStrategy(
            "rdma_region", {"peer-a": [fail(LayoutMismatch)], "peer-b": [fail(SourceFailed)]}
        )
        hub = FakeStrategy("hf_download", {None: [succeed()]}, uses_peers=False)
        where = await start_service(Orchestrator(registry, [peers, hub], prober=prober))
        assert where == "hf_download:hub"
        assert registry.state_of("peer-a") is SourceState.READY  # a mismatch is never the peer's fault
        assert registry.state_of("peer-b") is SourceState.STALE

    anyio.run(main)


def test_service_start_survives_a_wedged_peer() -> None:
    async def main() -> None:
        registry, prober = await scenario(IDENTITY, ["stuck"])
        peers = FakeStrategy("rdma_region", {"stuck": [wedge()]})
        hub = FakeStrategy("hf_download", {None: [succeed()]}, uses_peers=False)
        orchestrator = Orchestrator(registry, [peers, hub], prober=prober, attempt_timeout=0.2)
        assert await start_service(orchestrator) == "hf_download:hub"
        assert peers.running == 0

    anyio.run(main)
