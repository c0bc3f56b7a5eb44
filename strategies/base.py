"""The strategy contract (re-exported from the core) and discovery by name via entry points."""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

from mx_orchestrator.errors import ConfigError
from mx_orchestrator.strategy import AttemptContext, Strategy

__all__ = ["ENTRY_POINT_GROUP", "AttemptContext", "Strategy", "available_strategies", "load_strategy"]

ENTRY_POINT_GROUP = "mx_orchestrator.strategies"


def available_strategies() -> dict[str, str]:
    """Strategy name -> ``module:attribute`` of every registered strategy factory."""
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def load_strategy(name: str, **options: Any) -> Strategy:
    """Instantiate the strategy registered as ``name`` with ``options``."""
    matches = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    if not matches:
        known = ", ".join(sorted(available_strategies())) or "none"
        raise ConfigError(f"unknown strategy {name!r} (registered: {known})")
    factory = matches[0].load()
    strategy = factory(**options)
    if not isinstance(strategy, Strategy):
        raise ConfigError(f"entry point {name!r} did not produce a Strategy")
    return strategy
