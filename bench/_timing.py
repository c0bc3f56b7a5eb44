"""Timing helpers shared by bench/nixl.py and bench/gpu.py: raw NIXL and orchestrated pulls, same descriptors."""

from __future__ import annotations

import statistics
import time
from typing import Any

from mx_orchestrator import ModelIdentity, Orchestrator
from mx_orchestrator._backends.nixl import get_agent
from mx_orchestrator._backends.rdma import descriptor_rows
from mx_orchestrator.pullplan import parse_advert
from mx_orchestrator.registry.sqlite import SqliteRegistry
from mx_orchestrator.target import Target


async def raw_nixl(
    registry: SqliteRegistry, identity: ModelIdentity, target: Target, plan: Any, repeat: int, warmup: int = 0
) -> tuple[float, float, int]:
    """Median READ seconds through the same agent with the orchestrator's descriptors; setup seconds; count.

    Timed from ``initialize_xfer`` to completion, polling without sleeping.
    """
    (record,) = await registry.list(identity.key)
    manifest = await registry.get_manifest(record.source_id, record.generation)
    assert manifest is not None
    advert = parse_advert(record.transport, manifest)
    assert not isinstance(advert, str), advert
    local_manifest = target.prepare(target.plan_for(manifest)).manifest
    planned = plan(manifest, advert.spans, local_manifest, target.region_spans())
    assert not isinstance(planned, str), planned
    local, remote = planned
    agent = get_agent()
    nixl = agent._agent  # raw NIXL, same agent and settings
    deregister = agent.register([(a, n, target.device_id) for a, n in target.region_spans()], target.mem_type)
    began = time.perf_counter()
    name = agent.connect(advert.metadata)
    local_d = nixl.get_xfer_descs(descriptor_rows(local, target.device_id), target.mem_type)
    remote_d = nixl.get_xfer_descs(descriptor_rows(remote, advert.device_id), advert.mem_type)
    setup = time.perf_counter() - began
    times = []
    try:
        for _ in range(warmup + repeat):
            began = time.perf_counter()
            handle = nixl.initialize_xfer("READ", local_d, remote_d, name)
            state = nixl.transfer(handle)
            while state == "PROC":
                state = nixl.check_xfer_state(handle)
            times.append(time.perf_counter() - began)
            assert state == "DONE", state
            nixl.release_xfer_handle(handle)
    finally:
        agent.disconnect(name)
        deregister()
    return statistics.median(times[warmup:]), setup, len(local)


async def orchestrated(
    registry: SqliteRegistry,
    identity: ModelIdentity,
    target: Target,
    strategy: Any,
    repeat: int,
    warmup: int = 0,
    attempt_timeout: float = 60.0,
) -> tuple[float, float]:
    """Median transfer seconds (the winning attempt's) and median whole-load seconds."""
    transfers, loads = [], []
    for _ in range(warmup + repeat):
        orch = Orchestrator(registry, [strategy], rank_window=0.0, attempt_timeout=attempt_timeout)
        began = time.perf_counter()
        report = await orch.load(identity, target)
        loads.append(time.perf_counter() - began)
        assert report.loaded and report.final is not None, report.to_json()
        transfers.append(report.final.seconds)
    return statistics.median(transfers[warmup:]), statistics.median(loads[warmup:])


def ratios(nbytes: int, raw: float, setup: float, orch: float, load: float, ndesc: int) -> dict[str, Any]:
    return {
        "descriptors": ndesc,
        "raw_nixl_ms": round(raw * 1e3, 2),
        "raw_nixl_gbps": round(nbytes / raw / 1e9, 2),
        "orchestrated_ms": round(orch * 1e3, 2),
        "orchestrated_gbps": round(nbytes / orch / 1e9, 2),
        "orchestrated_vs_raw": round(raw / orch, 3),
        "raw_setup_ms": round(setup * 1e3, 2),
        "orchestrated_overhead_ms": round((load - orch) * 1e3, 2),
    }
