"""A rich progress display on stderr for loads that take longer than a moment.

It is a :class:`~mx_orchestrator.pipeline.LoadObserver` (attempt names) plus a
progress callback (bytes, GB/s). It only draws on a terminal and appears after
``delay`` seconds, so quick loads and ``--json`` runs print nothing.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from .pipeline import LoadObserver
from .render import printable
from .report import AttemptRecord, LoadReport

__all__ = ["ProgressDisplay"]


class ProgressDisplay(LoadObserver):
    def __init__(self, *, enabled: bool | None = None, delay: float = 0.5, stream: Any = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.delay = delay
        self._progress: Any = None
        self._task: Any = None
        self._started = time.monotonic()
        self._label = "evaluating sources"
        #: striped loads: source -> (bytes landed, transfer seconds)
        self._per_source: dict[str, tuple[int, float]] = {}

    def _ensure(self) -> Any:
        if self._progress is None and self.enabled and time.monotonic() - self._started >= self.delay:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TransferSpeedColumn,
            )

            self._progress = Progress(
                TextColumn("{task.description}", markup=False),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeElapsedColumn(),
                console=Console(file=self.stream),
                transient=True,
            )
            self._progress.start()
            self._task = self._progress.add_task(self._label, total=None)
        return self._progress

    @property
    def label(self) -> str:
        """What the display says the load is doing (the attempt, or each striped source's rate)."""
        return self._label

    def attempt_start(self, strategy: str, source_id: str | None) -> None:
        if self._per_source:  # a striped load's parts: keep the aggregate bar and per-source label
            return
        self._label = printable(f"{strategy} from {source_id or 'the hub'}")
        progress = self._ensure()
        if progress is not None:
            progress.update(self._task, description=self._label, completed=0, total=None)

    def __call__(self, done: int, total: int) -> None:
        """The progress callback handed to ``Orchestrator.load(progress=...)``."""
        progress = self._ensure()
        if progress is not None:
            progress.update(self._task, completed=done, total=total or None)

    def attempt_done(self, record: AttemptRecord) -> None:
        progress = self._ensure()
        outcome = record.outcome
        if record.part is None or outcome.source_id is None or outcome.bytes_moved == 0:
            return
        # a striped load: the bar is the aggregate, the label each source's rate so far
        moved, seconds = self._per_source.get(outcome.source_id, (0, 0.0))
        self._per_source[outcome.source_id] = (moved + outcome.bytes_moved, seconds + record.transfer_seconds)
        rates = ", ".join(
            f"{sid} {n / s / 1e9:.2f} GB/s" if s > 0 else sid
            for sid, (n, s) in sorted(self._per_source.items())
        )
        self._label = printable(f"{len(self._per_source)} sources: {rates}")
        if progress is not None:
            progress.update(self._task, description=self._label)

    def load_done(self, report: LoadReport) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
