"""Partial sources (issue 24): the holdings protocol's pure half, and a target reading a partial
source on the in-process fake fabric (real WeightSource, registry and driver, virtual time)."""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest
import torch

from mx_orchestrator import ModelIdentity, PartNotHeld, SourceState
from mx_orchestrator.holdings import (
    HELD,
    HOLDINGS_FIELD,
    Holdings,
    held_tensors,
    parse_holdings,
    served_manifest,
)
from mx_orchestrator.layout import LayoutSpec, plan_layout
from mx_orchestrator.models import SourceRecord
from mx_orchestrator.partreads import PARTIAL_PATIENCE
from mx_orchestrator.registry.base import apply_publish
from mx_orchestrator.source import WeightSource, load_weights
from mx_orchestrator.target import Target
from mx_orchestrator.testing import make_record, published_whole
from mx_orchestrator.testing.clock import run_on_virtual_time, virtual_wall_clock
from tests.fabric import fabric as shared_fabric

IDENTITY = ModelIdentity("acme/partial")
TENSORS = 12


def weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return {f"layer.{i}.weight": torch.randn(256 + 64 * (i % 3), 16, generator=g) for i in range(TENSORS)}


ROWS = [(n, "F32", tuple(t.shape)) for n, t in weights().items()]


# -- the pure half ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        "not json",
        json.dumps({"a": 1}),
        json.dumps([1]),
        json.dumps([1, 2, 3]),
        json.dumps([-1, TENSORS]),
        json.dumps([1.5, TENSORS]),
        json.dumps([True, TENSORS]),
        json.dumps([0, TENSORS + 1]),  # more bytes than tensors: the reader would read past it
        json.dumps([0, TENSORS - 1]),
        json.dumps([(1 << 64) - 2, TENSORS]),
        json.dumps([0, 10**30]),
    ],
)
def test_a_malformed_or_mis_sized_holdings_advert_is_refused_before_any_read(raw: str) -> None:
    manifest = plan_layout(IDENTITY, ROWS, LayoutSpec("arena"))
    assert isinstance(parse_holdings({HOLDINGS_FIELD: raw}, manifest), str)


def test_a_record_without_holdings_is_a_whole_source_and_a_good_advert_parses() -> None:
    manifest = plan_layout(IDENTITY, ROWS, LayoutSpec("arena"))
    assert parse_holdings({}, manifest) is None
    assert parse_holdings({HOLDINGS_FIELD: json.dumps([4096, TENSORS])}, manifest) == (4096, TENSORS)


def test_holdings_are_matched_by_name_across_layouts_and_a_tensor_being_read_is_not_held() -> None:
    source = plan_layout(IDENTITY, ROWS, LayoutSpec("arena"))
    local = plan_layout(IDENTITY, list(reversed(ROWS)), LayoutSpec("tensor"))  # another order
    raw = bytes([HELD, 2, 0, 7] + [0] * (TENSORS - 4))  # held, being read, no, junk
    held = held_tensors(raw, source, local)
    names = [local.tensors[i].name for i in held]
    assert names == ["layer.0.weight"]
    assert [local.tensors[i].name for i in held.coming] == ["layer.1.weight"]
    assert held_tensors(b"", source, local) == frozenset()  # a short answer claims nothing


def test_holdings_mark_what_landed_complete_once_and_a_withdrawn_source_claims_nothing() -> None:
    manifest = plan_layout(IDENTITY, ROWS, LayoutSpec("arena"))
    holdings = Holdings()
    holdings.mark(["layer.0.weight"])  # before begin: nothing to mark
    holdings.begin(manifest, hops=2)
    names = [s.name for s in manifest.tensors]
    holdings.reading(names[:3], True)
    holdings.mark(names[:2])
    assert holdings.held == 2 and not holdings.complete.is_set() and holdings.hops == 2
    assert holdings.array is not None and list(holdings.array[:3]) == [HELD, HELD, 2]
    holdings.withdraw()
    assert holdings.held == 0 and not holdings.array.any()
    holdings.mark(names)  # a withdrawn source marks nothing more while it loads
    assert holdings.held == 0 and not holdings.complete.is_set()


def test_a_partial_source_serves_its_layout_with_the_contents_checksums() -> None:
    content = load_weights(IDENTITY, weights(), "tensor").with_checksums().manifest
    layout = plan_layout(IDENTITY, ROWS, LayoutSpec("arena"))
    served = served_manifest(layout, content)
    assert [s.region for s in served.tensors] == [s.region for s in layout.tensors]
    by_name = content.by_name()
    assert all(
        s.checksum == by_name[s.name].checksum and s.digest == by_name[s.name].digest for s in served.tensors
    )
    assert served.content_fingerprint == content.content_fingerprint


def test_a_record_says_whether_it_is_partial_and_refuses_anything_but_a_boolean() -> None:
    record = make_record(IDENTITY, "p")
    assert SourceRecord.from_dict({**record.to_dict(), "partial": True}).partial is True
    assert SourceRecord.from_dict(record.to_dict()).partial is False
    for junk in ("yes", 1, None, [True]):
        with pytest.raises(Exception, match="partial"):
            SourceRecord.from_dict({**record.to_dict(), "partial": junk})


def test_republishing_the_same_generation_keeps_the_readers_leases() -> None:
    """A partial source publishing itself whole must not forget who reads it (the cap would let
    them in again); a new generation starts clean."""
    previous = apply_publish(None, make_record(IDENTITY, "p"), 100.0)
    leased = previous.__class__(**{**previous.__dict__, "readers": {"t1": 200.0}, "load": 1})
    again = apply_publish(leased, previous.__class__(**{**previous.__dict__, "partial": False}), 101.0)
    assert again.readers == {"t1": 200.0} and again.load == 1
    fresh = apply_publish(leased, make_record(IDENTITY, "p"), 101.0)
    assert fresh.readers == {} and fresh.load == 0


# -- a target reading a partial source ---------------------------------------------------------


def fabric(*specs: Any, **faults: Any) -> Any:
    return shared_fabric(IDENTITY, weights, *specs, clock=virtual_wall_clock, **faults)


async def _with_partial(f: Any, tg: Any, held: list[str], complete_after: float | None) -> Holdings:
    """A partial source "partial" on the fake network, ranked first, holding ``held``."""
    agent = f.network.agent("partial")
    served = load_weights(IDENTITY, weights(), "arena").with_checksums()
    holdings = Holdings()
    holdings.begin(served.manifest, hops=1)
    holdings.mark(held)
    f.sources = {"partial": (agent, served), **f.sources}
    source = WeightSource(
        f.registry, served, source_id="partial", agent=agent, holdings=holdings, poll_interval=0.01
    )
    await tg.start(source.run)
    if complete_after is not None:

        async def complete() -> None:
            await anyio.sleep(complete_after)
            holdings.mark_all()

        tg.start_soon(complete)
    return holdings


def test_a_target_reads_only_what_a_partial_source_holds_then_goes_elsewhere_without_blame() -> None:
    """A partial source ranked first holds half the tensors and lands nothing more: the target
    reads that half from it, waits PARTIAL_PATIENCE for more, gives its slot back (PartNotHeld:
    never STALE, not counted), and reads the rest from the seed; every tensor exactly once."""
    names = list(weights())
    half = names[: TENSORS // 2]

    async def main() -> tuple[Any, Target, SourceState | None, dict[str, int]]:
        async with fabric(("seed", "arena")) as f, anyio.create_task_group() as tg:
            await _with_partial(f, tg, half, None)
            target = Target("arena")
            report = await f.load(target, rank_window=0, min_part_bytes=1)
            state = f.registry.state_of("partial")
            tg.cancel_scope.cancel()
            return report, target, state, {}

    report, target, state, _ = run_on_virtual_time(main)
    assert report.loaded
    for name, tensor in weights().items():
        assert torch.equal(target.tensors()[name], tensor), name
    from_partial = {
        target.manifest.tensors[i].name  # type: ignore[union-attr]
        for a in report.loaded_parts()
        if a.outcome.source_id == "partial"
        for i in range(len(target.manifest.tensors))  # type: ignore[union-attr]
        if any(s <= target.manifest.tensors[i].offset < e for s, e in a.landed)  # type: ignore[union-attr]
    }
    assert from_partial == set(half)
    refusals = [a for a in report.attempts if isinstance(a.outcome, PartNotHeld)]
    assert len(refusals) == 1 and not refusals[0].marked_stale and not refusals[0].action.counted
    assert state is SourceState.READY
    assert sum(e - s for s, e in report.landed_ranges()) == target.nbytes  # nothing read twice
    assert report.seconds >= PARTIAL_PATIENCE


def test_a_partial_source_that_lands_the_rest_meanwhile_serves_the_whole_model_and_publishes_whole() -> None:
    names = list(weights())

    async def main() -> tuple[Any, bool | None]:
        async with fabric(("seed", "arena")) as f, anyio.create_task_group() as tg:
            await _with_partial(f, tg, names[:3], complete_after=0.5)
            report = await f.load(Target("arena"), rank_window=0, min_part_bytes=1)
            await anyio.sleep(0.1)
            record = await f.registry.get("partial")
            tg.cancel_scope.cancel()
            return report, None if record is None else record.partial

    report, partial = run_on_virtual_time(main)
    assert report.loaded and {a.outcome.source_id for a in report.loaded_parts()} == {"partial"}
    assert not any(isinstance(a.outcome, PartNotHeld) for a in report.attempts)
    assert partial is False  # published whole once complete


def test_republish_is_refused_with_one_line_where_it_could_not_serve() -> None:
    """``republish`` serves for as long as an open orchestrator lasts: without a registry, outside
    ``async with``, or through a ``load_module`` that closes its own orchestrator as it returns, it
    is a configuration error, said before anything is allocated."""
    from mx_orchestrator import ConfigError, Orchestrator, load_module
    from mx_orchestrator.testing import FakeRegistry, FakeStrategy

    strategies = [FakeStrategy("peer")]
    with pytest.raises(ConfigError, match="republish needs a registry"):
        Orchestrator(None, [FakeStrategy("hub", uses_peers=False)], republish=True)
    with pytest.raises(ConfigError, match="serve_options are for republish"):
        Orchestrator(FakeRegistry(), strategies, serve_options={"max_readers": 2})
    target = Target()

    async def outside() -> None:
        await Orchestrator(FakeRegistry(), strategies, republish=True).load(ModelIdentity("a/b"), target)

    with pytest.raises(ConfigError, match="async with Orchestrator"):
        anyio.run(outside)
    assert target.buffers is None

    async def no_memory_to_serve() -> None:
        async with Orchestrator(FakeRegistry(), strategies, republish=True) as orchestrator:
            await orchestrator.load(ModelIdentity("a/b"), None)

    with pytest.raises(ConfigError, match="serves a Target's memory"):
        anyio.run(no_memory_to_serve)

    async def no_name() -> None:
        async with Orchestrator(
            FakeRegistry(), strategies, republish=True, serve_options={"source_id": ""}
        ) as o:
            await o.load(ModelIdentity("a/b"), Target())

    with pytest.raises(ConfigError, match="source"):  # an empty id is refused, not replaced by the default
        anyio.run(no_name)
    module = torch.nn.Linear(2, 2)
    with pytest.raises(ConfigError, match="stop serving as it returns"):
        anyio.run(lambda: load_module(module, "a/b", registry=FakeRegistry(), republish=True))

    async def both() -> None:
        async with Orchestrator(FakeRegistry(), strategies) as orchestrator:
            await load_module(module, "a/b", registry=FakeRegistry(), orchestrator=orchestrator)

    with pytest.raises(ConfigError, match="are the orchestrator's"):
        anyio.run(both)


def test_an_open_republishing_orchestrator_serves_what_it_loaded_and_a_failed_load_serves_nothing() -> None:
    """On the fake fabric: a load through ``Orchestrator(republish=True)`` reads only from the seed
    (never from its own partial source, listed meanwhile) and returns its report while its target
    goes on serving (published whole once every tensor landed, one hop from the seed);
    another target reads every byte from it; a second load serves its own target as ``copy-2``;
    closing the orchestrator unpublishes both. A load that
    fails (no source has that model) publishes nothing and raises nothing."""
    from mx_orchestrator import Orchestrator
    from mx_orchestrator.selection import SelectionPolicy
    from strategies.rdma_region import RdmaRegion
    from strategies.rdma_tensor import RdmaTensor

    copy_first: SelectionPolicy = lambda _t: lambda c: (0.0 if c.source_id == "copy" else 1.0,)  # noqa: E731

    async def main() -> tuple[Any, Any, Any, Any, Any]:
        async with fabric(("seed", "arena"), seed={"read_delay": 0.2}) as f:
            serve = {"source_id": "copy", "agent": f.network.agent("copy"), "poll_interval": 0.01}
            # striped, reading from one source: it lists again while it loads, and finds itself listed
            options = {"min_part_bytes": 1, "max_part_bytes": 32 << 10, "stripe": 2}
            async with f.orchestrator(republish=True, serve_options=serve, **options) as orchestrator:
                report = await orchestrator.load(IDENTITY, Target("arena"))
                with anyio.fail_after(5):
                    record = await published_whole(f.registry, "copy", poll=0.01)
                second = Target("tensor")
                strategies = [RdmaRegion(agent=f.agent), RdmaTensor(agent=f.agent)]
                read = await Orchestrator(f.registry, strategies, selection=copy_first).load(IDENTITY, second)
                again = await orchestrator.load(IDENTITY, Target("tensor"))  # a second target served
                assert again.loaded
                with anyio.fail_after(5):  # a source of its own: the first one is still served
                    await published_whole(f.registry, "copy-2", poll=0.01)
                assert (await f.registry.get("copy")) is not None
            after = (await f.registry.get("copy"), await f.registry.get("copy-2"))
            other = ModelIdentity("acme/other")
            async with f.orchestrator(republish=True, serve_options=serve) as orchestrator:
                failed = await orchestrator.load(other, Target("arena"))
                nothing = await f.registry.get("copy")
            return report, record, (read, second), after, (failed, nothing)

    report, record, (read, second), after, (failed, nothing) = run_on_virtual_time(main)
    assert report.loaded and record.hops == 1 and not record.partial
    assert {a.outcome.source_id for a in report.attempts} == {"seed"}  # never its own source
    assert report.seconds > 1.0  # long enough to have listed again (and seen itself) many times
    assert read.loaded and read.bytes_by_source() == {"copy": second.nbytes}
    for name, tensor in weights().items():
        assert torch.equal(second.tensors()[name], tensor), name
    assert after == (None, None)  # unpublished when the orchestrator closed
    assert not failed.loaded and nothing is None
