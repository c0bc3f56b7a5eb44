"""The attempt planner's vocabulary: the strategy slots it plans over and the steps it answers with.

:class:`~mx_orchestrator.plan.Planner` hands out an :class:`Attempt`, or says
:class:`Wait`, :class:`Requeue` (every usable source was full), :class:`Relist`
(a striped load could read from more sources) or :class:`Done`; the driver
(:mod:`~mx_orchestrator.load`) carries each out. Plain frozen data, no logic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .models import Candidate

__all__ = ["Attempt", "Done", "Relist", "Requeue", "Step", "StrategySlot", "Wait"]


@dataclass(frozen=True, slots=True)
class StrategySlot:
    name: str
    uses_peers: bool = True
    #: reads parts (:class:`~mx_orchestrator.peer.PartCapable`): attempts of it on several sources may
    #: run at once; a slot that reads the whole model at once runs alone
    parts: bool = False


@dataclass(frozen=True, slots=True)
class Attempt:
    """One (strategy, candidate) pair handed to a worker; ``ticket`` identifies it while in flight."""

    strategy: str
    strategy_index: int
    candidate: Candidate | None
    attempt_number: int = 1
    delay: float = 0.0
    ticket: int = 0

    @property
    def source_id(self) -> str | None:
        return self.candidate.source_id if self.candidate is not None else None


@dataclass(frozen=True, slots=True)
class Wait:
    """Nothing to hand out now: evaluation is still running, or attempts in flight may change the plan;
    ask again by ``until`` at the latest (the caller's clock)."""

    until: float = math.inf


@dataclass(frozen=True, slots=True)
class Requeue:
    """Every usable candidate is at its reader cap: wait ``delay`` seconds, list the sources again
    (feeding them through :meth:`Planner.add_candidate`), then call :meth:`Planner.requeue` first."""

    delay: float
    #: how many capacity waits this load has made, this one included
    wait_number: int


@dataclass(frozen=True, slots=True)
class Relist:
    """Fewer sources are read from than the load may read from at once, and every known one was
    tried: list the sources again now (targets that started serving since, a fleet's partial
    sources), feeding new ones through :meth:`Planner.add_candidate`; nothing tried is tried again."""


@dataclass(frozen=True, slots=True)
class Done:
    loaded: bool
    reason: str


Step = Attempt | Wait | Requeue | Relist | Done
