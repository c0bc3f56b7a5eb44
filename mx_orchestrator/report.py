"""The load report: every probe and attempt of one load, serialisable to JSON.

The JSON shape is a public contract (``mxo pull --json``, ``mxo demo --json``):
keys are only ever added, never renamed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .models import ModelIdentity
from .outcomes import Loaded, Outcome
from .policy import Action

__all__ = ["AttemptRecord", "LoadReport", "ProbeRecord", "gbps"]


def gbps(nbytes: int, seconds: float) -> float:
    return round(nbytes / seconds / 1e9, 3) if seconds > 0 else 0.0


@dataclass(frozen=True)
class AttemptRecord:
    outcome: Outcome
    action: Action
    marked_stale: bool
    attempt_number: int = 1

    def to_dict(self) -> dict[str, Any]:
        o = self.outcome
        data: dict[str, Any] = {
            "strategy": o.strategy,
            "source": o.source_id,
            "outcome": o.name,
            "bytes": o.bytes_moved,
            "seconds": round(o.seconds, 6),
            "gbps": gbps(o.bytes_moved, o.seconds),
            "action": self.action.label,
            "marked_stale": self.marked_stale,
            "attempt_number": self.attempt_number,
            "detail": o.detail,
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

    @property
    def final(self) -> Loaded | None:
        for record in reversed(self.attempts):
            if isinstance(record.outcome, Loaded):
                return record.outcome
        return None

    @property
    def outcome(self) -> str:
        return "loaded" if self.loaded else "failed"

    def to_dict(self) -> dict[str, Any]:
        final = self.final
        nbytes = final.bytes_moved if final else 0
        return {
            "run_id": self.run_id,
            "model": self.identity.model_id,
            "identity": self.identity.key,
            "outcome": self.outcome,
            "reason": self.reason,
            "strategy": final.strategy if final else None,
            "source": final.source_id if final else None,
            "bytes": nbytes,
            "seconds": round(self.seconds, 6),
            "gbps": gbps(nbytes, self.seconds),
            "transfer_seconds": round(final.seconds, 6) if final else 0.0,
            "transfer_gbps": gbps(nbytes, final.seconds) if final else 0.0,
            "verified": bool(final and final.verified),
            "evaluation_seconds": round(self.evaluation_seconds, 6),
            "candidates_evaluated": len(self.probes),
            "attempts": [a.to_dict() for a in self.attempts],
            "probes": [p.to_dict() for p in self.probes],
            "registry_error": self.registry_error,
        }

    def to_json(self, *, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)
