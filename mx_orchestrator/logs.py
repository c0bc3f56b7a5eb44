"""structlog configuration for the CLI, benchmarks and examples (a library never configures logging itself).

Output goes to stderr, so stdout stays clean for ``--json`` reports. Secrets
are redacted by a processor before anything is rendered.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

from .render import printable

__all__ = ["configure_logging", "escape_controls", "redact_secrets"]

_SECRET_KEYS = re.compile(r"(token|password|secret|authorization|api_key)", re.IGNORECASE)
_SECRET_VALUES = [
    # a HuggingFace token is hf_ and 34 letters or digits: `strategy=hf_download` is not one
    re.compile(r"(?<![A-Za-z0-9_])hf_[A-Za-z0-9]{34}(?![A-Za-z0-9_])"),
    re.compile(r"(rediss?://[^:/@\s]*:)[^@\s]+(@)"),
]


def _scrub(text: str) -> str:
    text = _SECRET_VALUES[0].sub("hf_***", text)
    return _SECRET_VALUES[1].sub(r"\1***\2", text)


def redact_secrets(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: hide values of secret-looking keys and tokens/passwords inside strings."""
    for key, value in list(event_dict.items()):
        if _SECRET_KEYS.search(key):
            event_dict[key] = "***"
        elif isinstance(value, str):
            event_dict[key] = _scrub(value)
    return event_dict


def escape_controls(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: control characters in any string (the event too) are shown escaped.

    Values often come from peers (ids, tensor names, reasons); no escape byte
    from them may reach an operator's terminal or a log file's reader.
    """
    for key, value in list(event_dict.items()):
        if isinstance(value, str):
            event_dict[key] = printable(value)
    return event_dict


def configure_logging(level: str | None = None, fmt: str = "console", stream: TextIO | None = None) -> None:
    """Configure structlog: ``fmt`` is ``console`` (human) or ``json`` (JSON lines).

    ``level`` defaults to ``$MXO_LOG_LEVEL`` or ``warning``.
    """
    name = (level or os.environ.get("MXO_LOG_LEVEL") or "warning").upper()
    numeric = logging.getLevelName(name)
    if not isinstance(numeric, int):
        numeric = logging.WARNING
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=(stream or sys.stderr).isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact_secrets,
            escape_controls,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=False,
    )
