"""What people read: the load report as a table, the registry's records as rows and a table.

Pure functions over the public JSON shapes (:meth:`LoadReport.to_dict`,
:func:`source_row`); the CLI and the demo both print through here. Every
string that came from a record, a manifest or a peer is untrusted: it reaches
the terminal through :func:`printable` as plain text (control characters
escaped, rich markup shown as written, never interpreted).
"""

from __future__ import annotations

import re
import sys
import time
from collections import Counter
from collections.abc import Iterable
from typing import Any, TextIO

from .models import SourceRecord
from .registry.base import is_expired
from .report import LoadReport

__all__ = ["phases_text", "printable", "print_report", "print_sources", "source_row", "source_rows"]


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def printable(text: object) -> str:
    """``text`` with every control and bidi-override character escaped (``\\x1b``), safe on a terminal."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode(), str(text))


def _plain(text: object) -> Any:
    """A table cell that rich prints literally: no markup, no escapes."""
    from rich.text import Text

    return Text(printable(text))


def _console(out: TextIO) -> Any:
    from rich.console import Console

    return Console(file=out, highlight=False, width=None if out.isatty() else 200)


#: attempts printed one per row; a registry flood's thousands are summed up in one more
_MAX_ROWS = 200


def print_report(report: LoadReport, *, file: TextIO | None = None) -> None:
    from rich.table import Table

    console = _console(file or sys.stdout)
    data = report.to_dict()
    table = Table(title=_plain(f"load of {data['identity']} (run {data['run_id']})"))
    columns = (
        "#",
        "strategy",
        "source",
        "outcome",
        "bytes",
        "seconds",
        "GB/s",
        "phases",
        "action",
        "STALE",
        "detail",
    )
    for column in columns:
        table.add_column(column, overflow="fold")
    attempts = data["attempts"]
    shown = attempts if len(attempts) <= _MAX_ROWS else attempts[: _MAX_ROWS - 1]
    for i, a in enumerate(shown, 1):
        table.add_row(
            str(i),
            _plain(a["strategy"]),
            _plain(a["source"] or "-"),
            a["outcome"],
            f"{a['bytes']:,}",
            f"{a['seconds']:.3f}",
            f"{a['gbps']:.2f}",
            phases_text(a["phases"]),
            _plain(a["action"]),
            "yes" if a["marked_stale"] else "",
            _plain(a["detail"][:120]),
        )
    if len(shown) < len(attempts):
        rest = Counter(a["outcome"] for a in attempts[len(shown) :])
        summary = ", ".join(f"{n} {outcome}" for outcome, n in rest.most_common())
        table.add_row("...", "", "", f"{len(attempts) - len(shown)} more", "", "", "", "", "", "", summary)
    console.print(table)
    from rich.text import Text

    if report.loaded:
        console.print(
            Text.assemble(
                ("loaded", "bold green"),
                printable(
                    f" {data['bytes']:,} bytes via {data['strategy']} from {data['source'] or 'the hub'} in "
                    f"{data['seconds']:.3f}s (transfer {data['transfer_gbps']:.2f} GB/s, "
                    f"verified: {data['verified']})"
                ),
            )
        )
    else:
        console.print(Text.assemble(("failed", "bold red"), printable(f": {data['reason']}")))


_PHASE_NAMES = {
    "agent": "agent",
    "connect": "conn",
    "allocate": "alloc",
    "register": "reg",
    "transfer": "xfer",
}


def phases_text(phases: dict[str, float]) -> str:
    """The phases that took time, e.g. ``alloc 0.021 xfer 0.153 verify 0.040``."""
    return " ".join(f"{_PHASE_NAMES.get(p, p)} {s:.3f}" for p, s in phases.items() if s >= 0.0005) or "-"


def source_row(record: SourceRecord, now: float) -> dict[str, Any]:
    """A record as ``mxo sources --json`` shows it: no transport data, ages and the effective state."""
    data = record.to_dict()
    data.pop("transport", None)
    data.pop("readers", None)
    data["load"] = record.live_readers(
        now
    )  # a lease that ran out is no reader, even before the next heartbeat
    data["heartbeat_age_s"] = round(now - record.heartbeat_at, 3)
    data["ejected_for_s"] = round(max(0.0, record.ejected_until - now), 3)
    data["effective_state"] = "EXPIRED" if is_expired(record, now) else record.state.value
    return data


def source_rows(records: Iterable[SourceRecord], now: float | None = None) -> list[dict[str, Any]]:
    """Every record as a row, sorted by model then source id."""
    at = time.time() if now is None else now
    return [source_row(r, at) for r in sorted(records, key=lambda r: (r.identity_key, r.source_id))]


def print_sources(rows: list[dict[str, Any]], *, file: TextIO | None = None) -> None:
    from rich.table import Table

    table = Table(title=f"{len(rows)} sources")
    columns = (
        "source",
        "model",
        "state",
        "serves",
        "hops",
        "generation",
        "load",
        "heartbeat age",
        "ejections",
    )
    for column in (*columns, "reason"):
        table.add_column(column, overflow="fold")
    for r in rows:
        table.add_row(
            _plain(r["source_id"]),
            _plain(r["identity_key"]),
            r["effective_state"],
            "partial" if r.get("partial") else "whole",  # partial: a target still loading
            str(r.get("hops", 0)),
            _plain(r["generation"][:8]),
            str(r["load"]),
            f"{r['heartbeat_age_s']:.1f}s",
            str(r["times_ejected"]),
            _plain(r["stale_reason"][:60]),
        )
    _console(file or sys.stdout).print(table)
