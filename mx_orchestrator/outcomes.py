"""The typed outcomes of one strategy attempt.

Every attempt ends in exactly one of these frozen dataclasses; the policy engine
(:mod:`mx_orchestrator.policy`) decides what each means. Class names are part of
the public JSON report (``attempts[].outcome``), so they never change.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, TypeAlias

__all__ = [
    "ALL_OUTCOME_TYPES",
    "PartNotHeld",
    "SourceBusy",
    "Cancelled",
    "Corrupt",
    "LayoutMismatch",
    "Loaded",
    "LocalFailure",
    "ManifestMismatch",
    "NotApplicable",
    "Outcome",
    "SourceFailed",
    "SourceUnreachable",
    "Superseded",
    "TimedOut",
    "out_of_time",
]


@dataclass(frozen=True, kw_only=True)
class _OutcomeBase:
    """Fields every outcome carries."""

    strategy: str
    source_id: str | None = None
    bytes_moved: int = 0
    seconds: float = 0.0
    detail: str = ""

    @property
    def name(self) -> str:
        return type(self).__name__

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["outcome"] = self.name
        return data


@dataclass(frozen=True, kw_only=True)
class Loaded(_OutcomeBase):
    """The bytes landed in the target; ``verified`` says whether checksums were checked."""

    verified: bool = False


@dataclass(frozen=True, kw_only=True)
class LayoutMismatch(_OutcomeBase):
    """Region count or sizes differ between source and target: a property of the pair."""

    source_regions: int = 0
    target_regions: int = 0


@dataclass(frozen=True, kw_only=True)
class ManifestMismatch(_OutcomeBase):
    """Names, dtypes or shapes differ: another model, or a rolling update in progress."""


@dataclass(frozen=True, kw_only=True)
class NotApplicable(_OutcomeBase):
    """The strategy cannot run here (backend missing, nothing configured).

    ``candidate_only``: it cannot run with *this* candidate (a same-host
    strategy and a source on another host), but may with the next.
    """

    candidate_only: bool = False


@dataclass(frozen=True, kw_only=True)
class SourceUnreachable(_OutcomeBase):
    """Connecting to the source or fetching its metadata failed before any byte moved."""


@dataclass(frozen=True, kw_only=True)
class SourceBusy(_OutcomeBase):
    """The source is at its reader cap: a new reader is refused before any byte moves (capacity, no fault)."""


@dataclass(frozen=True, kw_only=True)
class PartNotHeld(_OutcomeBase):
    """A partial source (a target still loading) holds none of the parts this load still needs, by
    its own answer, before any byte moves: come back later or read elsewhere (no fault)."""


@dataclass(frozen=True, kw_only=True)
class SourceFailed(_OutcomeBase):
    """The transfer failed because of the remote side (disconnect, remote error)."""


@dataclass(frozen=True, kw_only=True)
class TimedOut(_OutcomeBase):
    """The attempt did not finish before its deadline; any bytes that landed are untrusted.

    ``deadline``: the seconds the attempt was given; ``planned_bytes``: what it
    was moving (0 when unknown). The policy blames the source only when that
    deadline is evidence of a stall (:attr:`~mx_orchestrator.policy.Policy.stall_floor`).
    """

    deadline: float = 0.0
    planned_bytes: int = 0
    #: the driver's evidence that the source is slow, short of a stall: another source delivered
    #: the same bytes first, or the read outlived several times its expected time
    slow: bool = False


@dataclass(frozen=True, kw_only=True)
class Corrupt(_OutcomeBase):
    """Bytes arrived but failed verification."""

    bad_tensors: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class LocalFailure(_OutcomeBase):
    """The target side failed (allocation, registration, buffer too small)."""


@dataclass(frozen=True, kw_only=True)
class Superseded(_OutcomeBase):
    """A hedge: another source delivered the same bytes first, so this read was cancelled (no fault)."""


@dataclass(frozen=True, kw_only=True)
class Cancelled(_OutcomeBase):
    """The attempt was cancelled by the caller or by the load's overall deadline."""


Outcome: TypeAlias = (
    Loaded
    | LayoutMismatch
    | ManifestMismatch
    | NotApplicable
    | SourceUnreachable
    | SourceBusy
    | PartNotHeld
    | SourceFailed
    | TimedOut
    | Corrupt
    | LocalFailure
    | Superseded
    | Cancelled
)

ALL_OUTCOME_TYPES: tuple[type[Outcome], ...] = (
    Loaded,
    LayoutMismatch,
    ManifestMismatch,
    NotApplicable,
    SourceUnreachable,
    SourceBusy,
    PartNotHeld,
    SourceFailed,
    TimedOut,
    Corrupt,
    LocalFailure,
    Superseded,
    Cancelled,
)


def out_of_time(
    strategy: str,
    source_id: str | None,
    wall: float,
    deadline: float,
    planned_bytes: int,
    *,
    over: bool,
    slow: bool = False,
) -> TimedOut | Cancelled:
    """What an attempt that ran out of time is: ``Cancelled`` when the load's own deadline passed
    (``over``), else ``TimedOut`` at its ``deadline`` (seconds it was given)."""
    if over:
        return Cancelled(
            strategy=strategy,
            source_id=source_id,
            seconds=wall,
            detail="the load's overall deadline passed during the attempt",
        )
    return TimedOut(
        strategy=strategy,
        source_id=source_id,
        seconds=wall,
        deadline=deadline,
        planned_bytes=planned_bytes,
        slow=slow,
        detail=f"no completion within the attempt deadline of {deadline:.3g}s",
    )
