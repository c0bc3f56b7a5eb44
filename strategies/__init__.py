"""Pluggable load strategies shipped with mx_orchestrator.

``rdma_region`` and ``rdma_tensor`` read from peers through NIXL; ``hf_download``
fetches from the HuggingFace Hub. Third-party strategies register under the
``mx_orchestrator.strategies`` entry-point group; :func:`load_strategy` finds
both kinds by name.
"""

from __future__ import annotations

from .base import AttemptContext, Strategy, available_strategies, load_strategy

__all__ = ["AttemptContext", "Strategy", "available_strategies", "load_strategy"]
