"""Prometheus metrics (optional extra ``[metrics]``): a LoadObserver and the serve-side exporter."""

from __future__ import annotations

from typing import Any

from .errors import ConfigError
from .pipeline import LoadObserver
from .report import AttemptRecord, LoadReport, ProbeRecord

__all__ = ["PrometheusObserver", "SourceMetrics", "start_metrics_server"]


def _client() -> Any:
    try:
        import prometheus_client
    except ImportError as exc:
        raise ConfigError("metrics need the optional extra: pip install 'mx-orchestrator[metrics]'") from exc
    return prometheus_client


class PrometheusObserver(LoadObserver):
    """Counts attempts by strategy and outcome, bytes, transfer seconds, probes and STALE marks."""

    def __init__(self, registry: Any = None) -> None:
        prom = _client()
        kwargs = {"registry": registry} if registry is not None else {}
        self.attempts = prom.Counter(
            "mxo_attempts_total", "Strategy attempts", ["strategy", "outcome"], **kwargs
        )
        self.bytes = prom.Counter("mxo_bytes_total", "Bytes moved by attempts", ["strategy"], **kwargs)
        self.seconds = prom.Histogram(
            "mxo_attempt_seconds",
            "Attempt duration",
            ["strategy"],
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 120),
            **kwargs,
        )
        self.probes = prom.Counter("mxo_candidates_evaluated_total", "Probes", ["ok"], **kwargs)
        self.stale = prom.Counter("mxo_sources_marked_stale_total", "Sources marked STALE", **kwargs)
        self.loads = prom.Counter("mxo_loads_total", "Loads", ["outcome"], **kwargs)

    def probe_done(self, record: ProbeRecord) -> None:
        self.probes.labels(ok=str(record.ok).lower()).inc()

    def attempt_done(self, record: AttemptRecord) -> None:
        o = record.outcome
        self.attempts.labels(strategy=o.strategy, outcome=o.name).inc()
        self.bytes.labels(strategy=o.strategy).inc(o.bytes_moved)
        self.seconds.labels(strategy=o.strategy).observe(o.seconds)
        if record.marked_stale:
            self.stale.inc()

    def load_done(self, report: LoadReport) -> None:
        self.loads.labels(outcome=report.outcome).inc()


def start_metrics_server(port: int, addr: str = "127.0.0.1") -> None:
    _client().start_http_server(port, addr=addr)


class SourceMetrics:
    """Serve-side gauges and counters: what a source offers and whether its registry hears from it."""

    def __init__(self, registry: Any = None) -> None:
        prom = _client()
        kwargs = {"registry": registry} if registry is not None else {}
        self.published = prom.Gauge("mxo_source_published", "1 while the record is published", **kwargs)
        self.bytes = prom.Gauge("mxo_source_bytes", "Bytes of weights offered", **kwargs)
        self.regions = prom.Gauge("mxo_source_regions", "Registered regions", **kwargs)
        self.heartbeats = prom.Counter("mxo_source_heartbeats_total", "Heartbeats", ["ok"], **kwargs)
        self.notifications = prom.Counter("mxo_source_notifications_total", "NIXL notifications", **kwargs)
        self.readers = prom.Gauge("mxo_source_readers", "Readers holding a live lease now", **kwargs)
        self.readers_peak = prom.Gauge(
            "mxo_source_readers_peak", "The most readers seen holding live leases at once", **kwargs
        )
        self.readers_cap = prom.Gauge(
            "mxo_source_readers_cap", "Readers admitted at once (0: no cap)", **kwargs
        )
        self._peak = 0

    def saw_readers(self, live: int) -> None:
        self.readers.set(live)
        if live > self._peak:
            self._peak = live
            self.readers_peak.set(live)
