"""What a load reads of its orchestrator: the configuration protocols, and what loads learned.

The driver (:mod:`mx_orchestrator.load`) and evaluation
(:mod:`mx_orchestrator.evaluation`) depend on these protocols, not on
:class:`~mx_orchestrator.pipeline.Orchestrator` itself, so the orchestrator
imports its driver and nothing imports it back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from .policy import Policy
from .registry.base import SourceRegistry
from .report import LoadObserver
from .selection import SelectionPolicy
from .strategy import Prober, Strategy

__all__ = ["EvaluationSettings", "Learned", "LoadSettings"]


@dataclass
class Learned:
    """What loads measured, for the loads after them (kept apart from configuration)."""

    #: the best part rate (bytes/s) a load achieved so far: the next load's expected part time
    part_rate: float | None = None


class EvaluationSettings(Protocol):
    """What evaluation reads of the orchestrator's configuration."""

    @property
    def registry(self) -> SourceRegistry | None: ...
    @property
    def prober(self) -> Prober | None: ...
    @property
    def probe_concurrency(self) -> int: ...
    @property
    def probe_timeout(self) -> float: ...
    @property
    def observers(self) -> tuple[LoadObserver, ...]: ...


class LoadSettings(EvaluationSettings, Protocol):
    """What the driver reads of the orchestrator's configuration (and what it learned)."""

    @property
    def strategies(self) -> tuple[Strategy, ...]: ...
    @property
    def policy(self) -> Policy: ...
    @property
    def selection(self) -> SelectionPolicy: ...
    @property
    def target_id(self) -> str: ...
    @property
    def stripe(self) -> int: ...
    @property
    def hedge(self) -> bool: ...
    @property
    def min_part_bytes(self) -> int: ...

    @property
    def max_part_bytes(self) -> int | None: ...

    @property
    def max_rate(self) -> float | None: ...
    @property
    def attempt_timeout(self) -> float: ...
    @property
    def load_timeout(self) -> float | None: ...
    @property
    def rank_window(self) -> float: ...
    @property
    def reader_lease(self) -> float: ...
    @property
    def expect(self) -> str | None: ...
    @property
    def learned(self) -> Learned: ...
    @property
    def uses_peers(self) -> bool: ...
