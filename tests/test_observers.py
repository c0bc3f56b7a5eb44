"""Metrics, progress and logging around a load: what operators see."""

from __future__ import annotations

import io
import json

import pytest
import structlog
from prometheus_client import CollectorRegistry

from mx_orchestrator import LayoutMismatch, ModelIdentity, Orchestrator, SourceFailed
from mx_orchestrator.logs import configure_logging, redact_secrets
from mx_orchestrator.metrics import PrometheusObserver
from mx_orchestrator.progress import ProgressDisplay
from mx_orchestrator.testing import FakeStrategy, fail, scenario, succeed


async def test_prometheus_counts_attempts_bytes_probes_and_stale_marks(identity: ModelIdentity) -> None:
    registry, prober = await scenario(identity, ["a", "b", "c"])
    order = {"a": 0.0, "b": 1.0, "c": 2.0}
    strategy = FakeStrategy(
        "rdma_region", {"a": [fail(LayoutMismatch)], "b": [fail(SourceFailed)], "c": [succeed(nbytes=1000)]}
    )
    prom = CollectorRegistry()
    observer = PrometheusObserver(prom)
    await Orchestrator(
        registry,
        [strategy],
        prober=prober,
        observers=[observer],
        selection=lambda _t: lambda c: (order[c.source_id],),
    ).load(identity)

    def value(name: str, **labels: str) -> float | None:
        return prom.get_sample_value(name, labels)

    assert value("mxo_attempts_total", strategy="rdma_region", outcome="LayoutMismatch") == 1
    assert value("mxo_attempts_total", strategy="rdma_region", outcome="Loaded") == 1
    assert value("mxo_bytes_total", strategy="rdma_region") == 1000
    assert value("mxo_candidates_evaluated_total", ok="true") == 3
    assert value("mxo_sources_marked_stale_total") == 1
    assert value("mxo_loads_total", outcome="loaded") == 1
    assert value("mxo_attempt_seconds_count", strategy="rdma_region") == 3


async def test_progress_display_draws_on_a_terminal_and_stays_silent_otherwise(
    identity: ModelIdentity,
) -> None:
    registry, prober = await scenario(identity, ["a"])
    for enabled, expect_output in ((True, True), (False, False)):
        stream = io.StringIO()
        display = ProgressDisplay(enabled=enabled, delay=0.0, stream=stream)
        strategy = FakeStrategy("rdma_region", {"a": [succeed(delay=0.05)]})
        await Orchestrator(registry, [strategy], prober=prober, observers=[display]).load(
            identity, progress=display
        )
        display(512, 1024)
        assert bool(stream.getvalue()) is expect_output


def test_secrets_are_redacted_from_log_events() -> None:
    event = redact_secrets(
        None,
        "info",
        {
            "event": "x",
            "hf_token": "hf_abcdefghijklmnop",
            "url": "rediss://:s3cret@redis.example:6380/0",
            "detail": f"401 for token hf_{'Z' * 34}",
            "strategy": "hf_download",
            "note": "hf_short is no token, nor is xhf_" + "Q" * 34,
        },
    )
    text = json.dumps(event)
    assert "abcdefghijklmnop" not in text and "s3cret" not in text and "ZZZZZZZZ" not in text
    assert event["hf_token"] == "***"
    assert event["detail"] == "401 for token hf_***"
    # redaction is by the token's exact shape: names that merely start with hf_ are left alone
    assert (
        event["strategy"] == "hf_download" and event["note"] == "hf_short is no token, nor is xhf_" + "Q" * 34
    )


def test_json_log_format_writes_json_lines_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream)
    try:
        structlog.get_logger("mx_orchestrator").info("hello", password="pw", model="m")
    finally:
        structlog.reset_defaults()
    line = json.loads(stream.getvalue().strip())
    assert line["event"] == "hello" and line["password"] == "***" and line["level"] == "info"
    assert capsys.readouterr().out == ""


def test_the_report_counts_the_verify_time_that_ran_while_other_parts_were_in_flight() -> None:
    """A striped load checks one part while others transfer: the report says how much of its
    verify time was hidden that way (an attempt's own transfer never counts)."""
    from mx_orchestrator.outcomes import Loaded
    from mx_orchestrator.policy import Action, ActionKind
    from mx_orchestrator.report import AttemptRecord, LoadReport

    def attempt(spans: tuple[tuple[str, float, float], ...]) -> AttemptRecord:
        phases = {p: sum(e - b for q, b, e in spans if q == p) for p, _, _ in spans}
        outcome = Loaded(strategy="rdma_region", source_id="s", bytes_moved=1, seconds=1.0, verified=True)
        return AttemptRecord(outcome, Action(ActionKind.FINISH), False, phases=phases, spans=spans)

    a = attempt((("transfer", 0.0, 1.0), ("verify", 1.0, 1.5)))
    b = attempt((("transfer", 0.2, 1.2), ("verify", 1.2, 2.0)))
    c = attempt((("transfer", 1.4, 1.9), ("verify", 1.9, 2.2)))
    report = LoadReport(
        run_id="r",
        identity=ModelIdentity("m"),
        loaded=True,
        seconds=2.2,
        evaluation_seconds=0.0,
        attempts=[a, b, c],
    )
    # a's check [1.0, 1.5] under b's transfer to 1.2 and c's from 1.4: 0.3; b's [1.2, 2.0] under c's
    # transfer [1.4, 1.9]: 0.5; c's [1.9, 2.2]: nothing else in flight
    assert report.verify_seconds == pytest.approx(1.6)
    assert report.verify_overlapped_seconds == pytest.approx(0.8)
    data = report.to_dict()
    assert data["verify_overlapped_seconds"] == pytest.approx(0.8)
    # one attempt alone: its own transfer never hides its own check
    alone = LoadReport(
        run_id="r",
        identity=ModelIdentity("m"),
        loaded=True,
        seconds=1.5,
        evaluation_seconds=0.0,
        attempts=[a],
    )
    assert alone.verify_overlapped_seconds == 0.0
