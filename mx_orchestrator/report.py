"""The load report: every probe and attempt of one load, serialisable to JSON.

The JSON shape is a public contract (``mxo pull --json``, ``mxo demo --json``):
keys are only ever added, never renamed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .models import ModelIdentity
from .outcomes import Loaded, Outcome
from .parts import Part
from .policy import Action
from .strategy import PHASES, Phases

__all__ = ["AttemptRecord", "LoadObserver", "LoadReport", "ProbeRecord", "attempt_started", "gbps"]


def gbps(nbytes: int, seconds: float) -> float:
    return round(nbytes / seconds / 1e9, 3) if seconds > 0 else 0.0


@dataclass(frozen=True)
class AttemptRecord:
    """One attempt: its outcome, what the policy made of it, and where its time went.

    ``seconds`` is the attempt's whole wall time (``None``: the outcome's own
    figure); ``phases`` the seconds of each phase the strategy timed.
    """

    outcome: Outcome
    action: Action
    marked_stale: bool
    attempt_number: int = 1
    seconds: float | None = None
    phases: Mapping[str, float] = field(default_factory=dict)
    #: striped loads: the part this attempt read (its index) and its byte range in the model
    part: int | None = None
    byte_range: tuple[int, int] | None = None
    #: striped loads: the byte ranges of the part that landed verified (the whole range when
    #: ``Loaded``, the good tensors of a ``Corrupt`` part, nothing otherwise)
    landed: tuple[tuple[int, int], ...] = ()
    #: ``(phase, began, ended)`` of each timed phase, on the load's clock
    spans: tuple[tuple[str, float, float], ...] = ()
    #: when the attempt ended (unix time): parts of loads in several processes put on one timeline
    ended_at: float = field(default_factory=time.time)

    @classmethod
    def of_part(
        cls,
        outcome: Outcome,
        action: Action,
        marked_stale: bool,
        attempt_number: int,
        seconds: float,
        phases: Phases,
        part: Part | None,
        landed: tuple[tuple[int, int], ...],
    ) -> AttemptRecord:
        """The record of one attempt on ``part`` (``None``: it ended before reading any part)."""
        return cls(
            outcome,
            action,
            marked_stale,
            attempt_number,
            seconds,
            phases.as_dict(),
            part.index if part is not None else None,
            (part.start, part.end) if part is not None else None,
            landed,
            tuple(phases.spans),
        )

    @property
    def wall_seconds(self) -> float:
        return self.outcome.seconds if self.seconds is None else self.seconds

    @property
    def transfer_seconds(self) -> float:
        """The transfer phase when the strategy timed it, else the outcome's own figure."""
        return self.phases.get("transfer") or self.outcome.seconds

    def log_fields(self) -> dict[str, Any]:
        """What the ``attempt.done`` event says."""
        o = self.outcome
        return {
            "strategy": o.strategy,
            "source": o.source_id,
            "part": self.part,
            "outcome": o.name,
            "bytes": o.bytes_moved,
            "seconds": round(self.wall_seconds, 4),
            "action": self.action.label,
            "marked_stale": self.marked_stale,
            "detail": o.detail,
        }

    def to_dict(self) -> dict[str, Any]:
        o = self.outcome
        data: dict[str, Any] = {
            "strategy": o.strategy,
            "source": o.source_id,
            "outcome": o.name,
            "bytes": o.bytes_moved,
            "seconds": round(self.wall_seconds, 6),
            "gbps": gbps(o.bytes_moved, self.transfer_seconds),
            "phases": {**{p: 0.0 for p in PHASES}, **self.phases},
            "action": self.action.label,
            "marked_stale": self.marked_stale,
            "attempt_number": self.attempt_number,
            "detail": o.detail,
            "part": self.part,
            "range": list(self.byte_range) if self.byte_range is not None else None,
            "landed": [list(r) for r in self.landed],
            "ended_at": round(self.ended_at, 6),
        }
        return data


@dataclass(frozen=True)
class ProbeRecord:
    source: str
    ok: bool
    seconds: float
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "ok": self.ok,
            "seconds": round(self.seconds, 6),
            "detail": self.detail,
        }


@dataclass
class LoadReport:
    run_id: str
    identity: ModelIdentity
    loaded: bool
    seconds: float
    evaluation_seconds: float
    attempts: list[AttemptRecord] = field(default_factory=list)
    probes: list[ProbeRecord] = field(default_factory=list)
    reason: str = ""
    #: why the registry could not be listed, when it could not (the load may still reach the Hub)
    registry_error: str | None = None
    #: when candidates published different content (another model, or another revision of the same
    #: shapes): content key -> their source ids
    manifest_disagreement: dict[str, list[str]] = field(default_factory=dict)
    #: fan-out distance of the source that delivered (``None``: not a peer); a republish is one more
    source_hops: int | None = None
    #: striped loads: how many sources could read at once (1: one source delivers everything)
    stripe: int = 1
    #: seconds from the start of the first part that landed to the last landing (the data plane's time)
    stripe_seconds: float = 0.0
    #: :func:`~mx_orchestrator.module.load_module`: what was filled, tied and left over
    module: dict[str, Any] | None = None
    #: how often every usable source was at its reader cap, so the load waited and listed again
    capacity_waits: int = 0
    #: unreachable and slow reports this load wrote to the registry, and skipped (bounded per load)
    reports: dict[str, int] = field(default_factory=dict)

    @property
    def striped(self) -> bool:
        """The model was delivered in parts (possibly by several sources)."""
        return any(a.part is not None for a in self.attempts)

    def loaded_parts(self) -> list[AttemptRecord]:
        """The part attempts that landed whole."""
        return [a for a in self.attempts if a.part is not None and isinstance(a.outcome, Loaded)]

    def landed_ranges(self) -> list[tuple[int, int]]:
        """Every byte range that landed verified, in model order: a striped load's add up to the
        model exactly once."""
        return sorted(r for a in self.attempts for r in a.landed)

    def bytes_by_source(self) -> dict[str, int]:
        """Bytes that landed (verified, where checked) from each source."""
        totals: dict[str, int] = {}
        for record in self.attempts:
            o = record.outcome
            if o.source_id is None:
                continue
            if record.landed:
                totals[o.source_id] = totals.get(o.source_id, 0) + sum(e - s for s, e in record.landed)
            elif isinstance(o, Loaded):
                totals[o.source_id] = totals.get(o.source_id, 0) + o.bytes_moved
        return totals

    def junk(self) -> dict[str, Any]:
        """What records no source stood behind cost: refused connects (not counted toward the
        attempt limit), their seconds, and the registry reports written and skipped."""
        refused = [a for a in self.attempts if a.outcome.name == "SourceUnreachable"]
        return {
            "refused_connects": len(refused),
            "seconds": round(sum(a.wall_seconds for a in refused), 6),
            "reports_written": self.reports.get("written", 0),
            "reports_skipped": self.reports.get("skipped", 0),
        }

    @property
    def final(self) -> Loaded | None:
        record = self.final_record
        return record.outcome if record is not None and isinstance(record.outcome, Loaded) else None

    @property
    def final_record(self) -> AttemptRecord | None:
        for record in reversed(self.attempts):
            if isinstance(record.outcome, Loaded):
                return record
        return None

    @property
    def verify_seconds(self) -> float:
        """Time the load's attempts spent checking landed bytes."""
        return sum(a.phases.get("verify", 0.0) for a in self.attempts)

    @property
    def verify_overlapped_seconds(self) -> float:
        """The part of :attr:`verify_seconds` during which another attempt's bytes were in flight
        (striped loads check one part while others transfer): what the checks cost the load is
        ``verify_seconds`` less this."""
        overlapped = 0.0
        for i, record in enumerate(self.attempts):
            others = [
                (b, e)
                for j, a in enumerate(self.attempts)
                if j != i
                for p, b, e in a.spans
                if p == "transfer"
            ]
            for phase, began, ended in record.spans:
                if phase == "verify":
                    overlapped += _covered(began, ended, others)
        return overlapped

    @property
    def agent_wait_seconds(self) -> float:
        """Time the load's attempts spent waiting for the transport's agent to exist."""
        return sum(a.phases.get("agent", 0.0) for a in self.attempts)

    @property
    def outcome(self) -> str:
        return "loaded" if self.loaded else "failed"

    def to_dict(self) -> dict[str, Any]:
        final = self.final
        record = self.final_record
        nbytes = final.bytes_moved if final else 0
        transfer = record.transfer_seconds if record is not None else 0.0
        strategy = final.strategy if final else None
        source = final.source_id if final else None
        verified = bool(final and final.verified)
        by_source = self.bytes_by_source()
        if self.striped and self.loaded:
            parts = [a.outcome for a in self.loaded_parts()]
            nbytes = sum(end - start for start, end in self.landed_ranges())
            if len(parts) > 1:  # from the first part's start to the last one's landing
                transfer = self.stripe_seconds
            strategy = "+".join(dict.fromkeys(o.strategy for o in parts))
            source = max(by_source, key=lambda sid: by_source[sid]) if by_source else None
            verified = all(getattr(o, "verified", False) for o in parts)
        return {
            "run_id": self.run_id,
            "model": self.identity.model_id,
            "identity": self.identity.key,
            "outcome": self.outcome,
            "reason": self.reason,
            "strategy": strategy,
            "source": source,
            "sources": sorted(by_source),
            "bytes_by_source": by_source,
            "stripe": self.stripe,
            "parts": len(self.loaded_parts()),
            "bytes": nbytes,
            "seconds": round(self.seconds, 6),
            "gbps": gbps(nbytes, self.seconds),
            "transfer_seconds": round(transfer, 6),
            "transfer_gbps": gbps(nbytes, transfer),
            "agent_wait_seconds": round(self.agent_wait_seconds, 6),
            "verified": verified,
            "verify_seconds": round(self.verify_seconds, 6),
            "verify_overlapped_seconds": round(self.verify_overlapped_seconds, 6),
            "evaluation_seconds": round(self.evaluation_seconds, 6),
            "candidates_evaluated": len(self.probes),
            "attempts": [a.to_dict() for a in self.attempts],
            "probes": [p.to_dict() for p in self.probes],
            "registry_error": self.registry_error,
            "manifest_disagreement": self.manifest_disagreement,
            "source_hops": self.source_hops,
            "capacity_waits": self.capacity_waits,
            "junk": self.junk(),
            "module": self.module,
        }

    def to_json(self, *, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)


class LoadObserver:
    """Hooks for metrics and progress displays; every method is optional to override."""

    def probe_done(self, record: ProbeRecord) -> None:
        """Called once per evaluated candidate."""

    def attempt_start(self, strategy: str, source_id: str | None) -> None:
        """Called as each attempt begins."""

    def attempt_done(self, record: AttemptRecord) -> None:
        """Called once per finished attempt, after its action was carried out."""

    def load_done(self, report: LoadReport) -> None:
        """Called once per load."""


def attempt_started(
    log: Any, observers: Sequence[LoadObserver], strategy: str, source_id: str | None
) -> None:
    """An attempt begins: logged, and told to every observer."""
    log.debug("attempt.start", strategy=strategy, source=source_id)
    for observer in observers:
        observer.attempt_start(strategy, source_id)


def _covered(began: float, ended: float, spans: list[tuple[float, float]]) -> float:
    """How much of ``[began, ended]`` the union of ``spans`` covers."""
    covered, cursor = 0.0, began
    for start, end in sorted(spans):
        start, end = max(start, cursor), min(end, ended)
        if end > start:
            covered += end - start
            cursor = end
    return covered
