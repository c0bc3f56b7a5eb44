"""The strategy contract and discovery by name, re-exported from the core for strategy authors."""

from __future__ import annotations

from mx_orchestrator.strategy import (
    ENTRY_POINT_GROUP,
    AttemptContext,
    Strategy,
    StrategyOptions,
    available_strategies,
    load_strategy,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "AttemptContext",
    "Strategy",
    "StrategyOptions",
    "available_strategies",
    "load_strategy",
]
