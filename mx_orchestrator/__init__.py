"""mx_orchestrator: get model weights into a serving process from the best source available.

Peers that already hold the weights are read over RDMA (NVIDIA NIXL); the
HuggingFace Hub is the fallback. Candidates are evaluated concurrently, each
strategy attempt returns a typed outcome, and a pure policy engine decides what
each outcome means. The public surface is re-exported here.
"""

from __future__ import annotations

from .errors import ConfigError, ManifestError, MxoError, RegistryError, RegistryUnavailable
from .layout import LayoutSpec, parse_layout
from .models import Candidate, Manifest, ModelIdentity, Region, SourceRecord, SourceState, TensorSpec
from .module import ModuleTarget, load_module, load_module_sync
from .outcomes import (
    ALL_OUTCOME_TYPES,
    Cancelled,
    Corrupt,
    LayoutMismatch,
    Loaded,
    LocalFailure,
    ManifestMismatch,
    NotApplicable,
    Outcome,
    PartNotHeld,
    SourceBusy,
    SourceFailed,
    SourceUnreachable,
    Superseded,
    TimedOut,
)
from .pipeline import LoadObserver, Orchestrator
from .policy import DEFAULT_POLICY, Action, ActionKind, DecisionState, Policy
from .registry import MemoryRegistry, SourceRegistry, open_registry
from .report import AttemptRecord, LoadReport, ProbeRecord
from .selection import least_loaded, prefer_labels, prefer_seeds, rendezvous, spare_seeds
from .strategy import AttemptContext, ProbeFailure, Prober, RegistryProber, Strategy

__version__ = "0.1.0"

__all__ = [
    "ModuleTarget",
    "load_module",
    "load_module_sync",
    "ALL_OUTCOME_TYPES",
    "DEFAULT_POLICY",
    "Action",
    "ActionKind",
    "AttemptContext",
    "AttemptRecord",
    "Cancelled",
    "Candidate",
    "ConfigError",
    "Corrupt",
    "DecisionState",
    "LayoutMismatch",
    "LayoutSpec",
    "LoadObserver",
    "LoadReport",
    "Loaded",
    "LocalFailure",
    "Manifest",
    "ManifestError",
    "ManifestMismatch",
    "MemoryRegistry",
    "ModelIdentity",
    "MxoError",
    "NotApplicable",
    "Orchestrator",
    "Outcome",
    "Policy",
    "ProbeFailure",
    "ProbeRecord",
    "Prober",
    "Region",
    "RegistryError",
    "RegistryProber",
    "RegistryUnavailable",
    "PartNotHeld",
    "SourceBusy",
    "Superseded",
    "SourceFailed",
    "SourceRecord",
    "SourceRegistry",
    "SourceState",
    "SourceUnreachable",
    "Strategy",
    "TensorSpec",
    "TimedOut",
    "__version__",
    "least_loaded",
    "open_registry",
    "parse_layout",
    "prefer_labels",
    "prefer_seeds",
    "spare_seeds",
    "rendezvous",
]
