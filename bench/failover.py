"""Benchmark: fail-over when a source dies mid-transfer (real processes, real NIXL).

Two parts, one JSON object:

* **kill at 50 %** (a 1 GiB synthetic checkpoint, ``--stripe 1``): the first
  source is SIGKILLed once half of the model landed from it; the load goes on
  from a second source. Measured: bytes the target read (its own accounting,
  ``Target.bytes_written``) beyond the model, as a fraction of a full re-read
  (what a load that starts over pays: 1.0), and the time, against the same
  load undisturbed in the same run;
* **kill to next** (MiniLM): the victim is frozen (SIGSTOP) so its READ is
  posted but cannot complete, then SIGKILLed 0.3 s into the attempt: time from
  the kill to the next candidate's attempt starting, to the load completing,
  and the whole load against an undisturbed one.

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
from mx_orchestrator.checkpoint import save_checkpoint  # noqa: E402
from mx_orchestrator.logs import configure_logging  # noqa: E402
from mx_orchestrator.registry.sqlite import SqliteRegistry  # noqa: E402
from mx_orchestrator.report import AttemptRecord, LoadReport  # noqa: E402
from mx_orchestrator.target import Target  # noqa: E402
from mx_orchestrator.testing.peers import MODEL_ID, Peers  # noqa: E402
from strategies.rdma_region import RdmaRegion  # noqa: E402

IDENTITY = ModelIdentity(MODEL_ID)
SYNTHETIC = ModelIdentity("acme/failover-1g")
TENSORS, TENSOR_BYTES = 64, 16 << 20  # 1 GiB


class KillAfterHalf(LoadObserver):
    """SIGKILLs the victim once parts holding half of the model landed from it."""

    def __init__(self, victim: Any, total: int) -> None:
        self.victim, self.total, self.landed = victim, total, 0
        self.killed_at: float | None = None

    def attempt_done(self, record: AttemptRecord) -> None:
        if record.outcome.source_id == self.victim.source_id and self.killed_at is None:
            self.landed += sum(end - start for start, end in record.landed)
            if self.landed * 2 >= self.total:
                self.victim.proc.send_signal(signal.SIGKILL)
                self.killed_at = time.perf_counter()


def kill_at_half(repeat: int) -> dict[str, Any]:
    import torch

    extra, in_flight, disturbed, undisturbed = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "weights"
        base = torch.arange(TENSOR_BYTES // 4, dtype=torch.int32)
        save_checkpoint(
            {f"block.{i:02d}.weight": base * (2 * i + 1) + i for i in range(TENSORS)},
            weights / "model.safetensors",
        )
        db = Path(tmp) / "registry.db"
        with Peers(f"sqlite://{db}") as peers:
            peers.start(("spare", "arena"), weights=weights, model_id=SYNTHETIC.model_id, ttl=120.0)
            for i in range(repeat):
                report, target, seconds = anyio.run(pull, db, SYNTHETIC, "spare", [])
                assert report.loaded and target.bytes_written == target.nbytes
                undisturbed.append(seconds)
                (victim,) = peers.start(
                    (f"victim-{i}", "arena"), weights=weights, model_id=SYNTHETIC.model_id, ttl=120.0
                )
                killer = KillAfterHalf(victim, TENSORS * TENSOR_BYTES)
                report, target, seconds = anyio.run(pull, db, SYNTHETIC, victim.source_id, [killer])
                assert report.loaded and killer.killed_at is not None, report.to_json()
                assert all(a.outcome.name != "Corrupt" for a in report.attempts)
                extra.append((target.bytes_written - target.nbytes) / target.nbytes)
                # the part in flight when the source died: its bytes moved (in part) and were dropped
                failed = [a for a in report.attempts if a.byte_range and a.outcome.name != "Loaded"]
                in_flight.append(sum(a.byte_range[1] - a.byte_range[0] for a in failed) / target.nbytes)
                disturbed.append(seconds)
    return {
        "model_bytes": TENSORS * TENSOR_BYTES,
        "extra_read_fraction_of_a_full_re_read": round(statistics.median(extra), 4),
        "in_flight_at_death_fraction_of_a_full_re_read": round(statistics.median(in_flight), 4),
        "target_extra_read_fraction": 0.6,
        "undisturbed_load_s": round(statistics.median(undisturbed), 4),
        "killed_at_half_load_s": round(statistics.median(disturbed), 4),
    }


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


async def pull(
    db: Path, identity: ModelIdentity, first: str | None, observers: list[LoadObserver]
) -> tuple[LoadReport, Target, float]:
    """One verified load of ``identity``, ``first`` ranked first; the report, target and seconds."""
    registry = SqliteRegistry(db)
    rank = {first: 0.0} if first else {}
    try:
        target = Target("arena", verify=True)
        began = time.perf_counter()
        report = await Orchestrator(
            registry,
            [RdmaRegion()],
            rank_window=5.0,
            attempt_timeout=60,
            observers=observers,
            selection=lambda _t: lambda c: (rank.get(c.source_id, 1.0),),
        ).load(identity, target)
        return report, target, time.perf_counter() - began
    finally:
        await registry.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    configure_logging("warning")
    get_agent()
    half = kill_at_half(args.repeat)
    to_next, to_loaded, disturbed, undisturbed = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "registry.db"
        with Peers(f"sqlite://{db}") as peers:
            peers.start(("spare", "arena"))
            for i in range(args.repeat):
                report, _, seconds = anyio.run(pull, db, IDENTITY, None, [])
                assert report.loaded
                undisturbed.append(seconds)
                (victim,) = peers.start((f"victim-{i}", "arena"))
                victim.signal(signal.SIGSTOP)
                clock = Clock(victim)
                report, _, seconds = anyio.run(pull, db, IDENTITY, victim.source_id, [clock])
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
                "kill_at_half_1gib_stripe_1": half,
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
