"""Benchmark: fail-over when a source dies mid-transfer (real processes, real NIXL, MiniLM).

The victim is frozen (SIGSTOP) so its READ is posted but cannot complete, then
SIGKILLed 0.3 s into the attempt. Measured: time from the kill to the next
candidate's attempt starting (the first byte follows within it), time from the
kill to the load completing, and the whole load against an undisturbed load
from the healthy source alone, in the same run. Prints one JSON object.

    python bench/failover.py [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))

import anyio  # noqa: E402

from mx_orchestrator import LoadObserver, ModelIdentity, Orchestrator  # noqa: E402
from mx_orchestrator._backends.nixl import get_agent  # noqa: E402
from mx_orchestrator.logs import configure_logging  # noqa: E402
from mx_orchestrator.registry.sqlite import SqliteRegistry  # noqa: E402
from mx_orchestrator.report import LoadReport  # noqa: E402
from mx_orchestrator.target import Target  # noqa: E402
from mx_orchestrator.testing.peers import MODEL_ID, Peers  # noqa: E402
from strategies.rdma_region import RdmaRegion  # noqa: E402

IDENTITY = ModelIdentity(MODEL_ID)


class Clock(LoadObserver):
    def __init__(self, victim: Any) -> None:
        self.victim = victim
        self.killed_at: float | None = None
        self.next_started_at: float | None = None

    def attempt_start(self, strategy: str, source_id: str | None) -> None:
        if source_id == self.victim.source_id:

            def kill() -> None:
                self.victim.proc.send_signal(signal.SIGKILL)
                self.killed_at = time.perf_counter()

            threading.Timer(0.3, kill).start()
        elif self.killed_at is not None and self.next_started_at is None:
            self.next_started_at = time.perf_counter()


async def pull(db: Path, first: str | None, observers: list[LoadObserver]) -> tuple[LoadReport, float]:
    registry = SqliteRegistry(db)
    rank = {first: 0.0} if first else {}
    try:
        target = Target("arena", verify=True)
        began = time.perf_counter()
        report = await Orchestrator(
            registry,
            [RdmaRegion()],
            rank_window=5.0,
            attempt_timeout=20,
            observers=observers,
            selection=lambda _t: lambda c: (rank.get(c.source_id, 1.0),),
        ).load(IDENTITY, target)
        return report, time.perf_counter() - began
    finally:
        await registry.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    configure_logging("warning")
    get_agent()
    to_next, to_loaded, disturbed, undisturbed = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "registry.db"
        with Peers(f"sqlite://{db}") as peers:
            peers.start(("spare", "arena"))
            for i in range(args.repeat):
                report, seconds = anyio.run(pull, db, None, [])
                assert report.loaded
                undisturbed.append(seconds)
                (victim,) = peers.start((f"victim-{i}", "arena"))
                victim.signal(signal.SIGSTOP)
                clock = Clock(victim)
                report, seconds = anyio.run(pull, db, victim.source_id, [clock])
                done = time.perf_counter()
                assert report.loaded and report.attempts[0].outcome.name == "SourceFailed", report.to_json()
                assert clock.killed_at is not None and clock.next_started_at is not None
                to_next.append(clock.next_started_at - clock.killed_at)
                to_loaded.append(done - clock.killed_at)
                disturbed.append(seconds)
    print(
        json.dumps(
            {
                "benchmark": "failover",
                "date": time.strftime("%Y-%m-%d"),
                "repeat": args.repeat,
                "kill_to_next_attempt_ms": round(statistics.median(to_next) * 1e3, 2),
                "kill_to_loaded_ms": round(statistics.median(to_loaded) * 1e3, 2),
                "undisturbed_load_s": round(statistics.median(undisturbed), 4),
                "disturbed_load_s": round(statistics.median(disturbed), 4),
                "disturbed_includes_s": 0.3,
                "target_kill_to_next_attempt_ms": 100,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
