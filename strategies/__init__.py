"""Pluggable load strategies shipped with mx_orchestrator.

``rdma_region`` and ``rdma_tensor`` read from peers (over the RDMA backend,
NIXL by default); ``hf_download`` fetches from the HuggingFace Hub. Each is
registered under the ``mx_orchestrator.strategies`` entry-point group, exactly
like a third-party strategy; :func:`load_strategy` finds them by name.
"""

from __future__ import annotations

from .base import AttemptContext, Strategy, StrategyOptions, available_strategies, load_strategy

__all__ = ["AttemptContext", "Strategy", "StrategyOptions", "available_strategies", "load_strategy"]
