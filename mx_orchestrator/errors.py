"""Exception types: for bugs, misconfiguration and untrusted input that fails validation.

Outcomes of load attempts are *not* exceptions (see :mod:`mx_orchestrator.outcomes`);
these types exist so that callers can tell "you misused the library" and "a peer
sent garbage" apart from everything else with one ``except``.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ConfigError",
    "ManifestError",
    "MxoError",
    "RegistryError",
    "RegistryUnavailable",
]


class MxoError(Exception):
    """Base class of every error mx_orchestrator raises on purpose."""


class ConfigError(MxoError, ValueError):
    """The caller configured something that cannot work (bad flag, bad URL, bad layout)."""


class ManifestError(MxoError, ValueError):
    """A manifest (usually from a remote source, hence untrusted) failed validation."""


class RegistryError(MxoError):
    """The source registry refused or failed an operation."""


class RegistryUnavailable(RegistryError):
    """The registry could not be reached (connection refused, timed out, locked)."""


class CheckpointError(ConfigError):
    """A checkpoint on disk cannot be read (truncated file, bad header, broken index); names the file."""
