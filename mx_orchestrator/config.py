"""Numbers that configure a load or a source, checked once where they enter (API and CLI alike).

Every duration must be a finite number of seconds at or above a floor below
which it cannot work: an attempt deadline shorter than connecting can take
only ever times out (and must not blame a source for it), a TTL of zero makes
a source's record expire as it is written. The CLI's argument types call the
same functions, so a bad flag fails before any work starts.
"""

from __future__ import annotations

import math
from typing import Any

from .errors import ConfigError

__all__ = [
    "FLOORS",
    "check_count",
    "check_device",
    "check_max_lease",
    "check_port",
    "check_seconds",
    "check_source_id",
]

#: The least each duration may be, in seconds, and why.
FLOORS = {
    "attempt_timeout": (0.1, "an attempt must have time to connect"),
    "load_timeout": (0.1, "a load must have time to evaluate and connect"),
    "probe_timeout": (0.01, "a probe must have time to read a manifest"),
    "rank_window": (0.0, "it is a wait"),
    "ttl": (1.0, "a source heartbeats every ttl/3"),
    "reader_lease": (0.5, "a target renews its lease every lease/3"),
    "max_lease": (1.5, "a target renews its lease every lease/3 (at least 0.5 s)"),
    "drain_timeout": (0.0, "it is a wait"),
    "poll_interval": (1e-4, "it is a pause between polls"),
    "reader_watch": (1e-3, "it is a pause between samples of the registry"),
}


def check_seconds(name: str, value: Any, *, optional: bool = False) -> float:
    """``value`` as seconds, or :class:`ConfigError` naming ``name`` and what is wrong."""
    if value is None and optional:
        return math.inf
    floor, why = FLOORS[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number of seconds, got {value!r:.40}")
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number of seconds, got {value}")
    if value < floor:
        raise ConfigError(f"{name} must be at least {floor:g} s ({why}), got {value:g}")
    return float(value)


def check_rate(name: str, value: Any) -> float | None:
    """``value`` as bytes/s (``None``: no cap), or :class:`ConfigError`: a positive finite number."""
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(f"{name} must be a positive number of bytes/s, got {value!r:.40}")
    return float(value)


def check_count(name: str, value: Any, *, minimum: int = 1, maximum: int = 1 << 20) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise ConfigError(f"{name} must be a whole number in {minimum}..{maximum}, got {value!r:.40}")
    return value


def check_port(name: str, value: Any) -> int:
    return check_count(name, value, minimum=1, maximum=65535)


def check_source_id(value: Any) -> str:
    """A source id as registries store it: 1..512 printable characters, no white space (the same
    rule a record is held to when read, checked before any work is done)."""
    if not (isinstance(value, str) and 0 < len(value) <= 512 and value.isprintable()) or any(
        c.isspace() for c in value
    ):
        raise ConfigError(f"a source id is 1..512 printable characters without spaces, got {value!r:.80}")
    return value


def check_device(value: Any) -> str:
    """``cpu``, ``cuda`` or ``cuda:N``: the devices targets and sources live on (another accelerator
    is not supported: say so, not that CUDA is missing)."""
    if isinstance(value, str) and (
        value in ("cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit() and len(value) < 12)
    ):
        return value
    raise ConfigError(f"a device is cpu or cuda:N (other accelerators are not supported), got {value!r:.40}")


def check_max_lease(value: Any) -> float:
    """The longest reader lease a source grants: seconds, from the floor to a day (the bound a
    source record is held to when read)."""
    seconds = check_seconds("max_lease", value)
    if seconds > 86400:
        raise ConfigError(f"max_lease must be at most a day (86400 s), got {seconds:g}")
    return seconds
