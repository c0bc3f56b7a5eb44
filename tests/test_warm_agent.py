"""The warm agent: made in the background from the moment a peer strategy exists; prewarm is cancellation-safe.

Each test runs in a fresh interpreter, where no agent exists yet.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.nixl


def run_fresh(code: str) -> dict[str, object]:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_a_cancelled_prewarm_leaves_the_agent_to_finish_and_no_thread_behind() -> None:
    out = run_fresh(
        """
        import json, threading, time
        import anyio
        from mx_orchestrator import Orchestrator
        from mx_orchestrator._backends import nixl
        from mx_orchestrator.testing import FakeRegistry
        from strategies.rdma_region import RdmaRegion

        async def main():
            orchestrator = Orchestrator(FakeRegistry(), [RdmaRegion()])
            started = any(t.name == "mxo-nixl-agent" for t in threading.enumerate())
            with anyio.move_on_after(0.001) as scope:
                await orchestrator.prewarm()
            cancelled = scope.cancelled_caught
            deadline = time.monotonic() + 60
            while any(t.name == "mxo-nixl-agent" for t in threading.enumerate()) and time.monotonic() < deadline:
                await anyio.sleep(0.05)
            alive = [t.name for t in threading.enumerate() if t.name == "mxo-nixl-agent"]
            began = time.perf_counter()
            await orchestrator.prewarm()  # already made: returns at once
            again = time.perf_counter() - began
            agent = nixl.get_agent()
            print(json.dumps({"started": started, "cancelled": cancelled, "alive": alive,
                              "again": again, "name": agent.name}))

        anyio.run(main)
        """
    )
    assert out["started"] is True and out["cancelled"] is True
    assert out["alive"] == []
    assert float(out["again"]) < 0.05  # type: ignore[arg-type]
    assert str(out["name"]).startswith("mxo-")


def test_a_first_load_reports_the_wait_for_the_agent_and_allocates_nothing_for_an_unreachable_record() -> (
    None
):
    out = run_fresh(
        """
        import json, time
        import anyio, torch
        from mx_orchestrator import ModelIdentity, Orchestrator
        from mx_orchestrator.source import WeightSource, load_weights
        from mx_orchestrator.target import Target
        from mx_orchestrator.testing import FakeRdmaNetwork, FakeRegistry
        from strategies.rdma_region import RdmaRegion

        identity = ModelIdentity("acme/warm")

        async def main():
            registry = FakeRegistry()
            served = load_weights(identity, {"w": torch.arange(1 << 20, dtype=torch.float32)}, "arena")
            source_agent = FakeRdmaNetwork().agent("src")
            async with anyio.create_task_group() as tg:
                await tg.start(WeightSource(registry, served, source_id="s", agent=source_agent).run)
                # the strategy uses the process's own (NIXL) agent, made in the background from here on;
                # the fake source's metadata is not NIXL's, so the attempt ends at connect: after the wait
                report = await Orchestrator(registry, [RdmaRegion()]).load(identity, Target("arena"))
                tg.cancel_scope.cancel()
            data = report.to_dict()
            print(json.dumps({"phases": data["attempts"][0]["phases"], "wait": data["agent_wait_seconds"],
                              "outcome": data["attempts"][0]["outcome"]}))

        anyio.run(main)
        """
    )
    phases = out["phases"]
    assert isinstance(phases, dict)
    assert out["outcome"] == "SourceUnreachable"
    assert phases["agent"] > 0  # the load waited for the agent still being made, and says so
    assert phases["allocate"] == 0  # nothing allocated for a record that did not answer the connect
    assert out["wait"] == phases["agent"]
