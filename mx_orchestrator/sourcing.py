"""A load's side effects on the registry: reader leases while a source is read, and what the
policy's actions tell the registry (a STALE mark, an unreachable or slow report).

Every call goes through :func:`~mx_orchestrator.evaluation.registry_call`:
bounded in time, a failure logged and returned, never raised into the load.
A lease is held for a whole session on one source (not per part), renewed in
the background and given back on every path, cancellation included; a target
killed mid-read stops renewing and its lease runs out within ``reader_lease``
seconds. The sessions that end because the load was decided (a striped load's
are all in flight then) give theirs back together, in one registry call.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import anyio

from .evaluation import registry_call
from .outcomes import Outcome, SourceBusy
from .plan import Attempt
from .policy import Action
from .settings import LoadSettings

__all__ = ["REPORTS_PER_LOAD", "SourceAccounting"]

#: leases are bookkeeping: a slow registry must not hold a read back for long
_READER_ACCOUNTING_TIMEOUT = 0.5
#: unreachable (and slow) reports one load writes at most: a registry flooded with junk records
#: must not make every load a write storm (STALE marks, evidence of a real fault, are not bounded)
REPORTS_PER_LOAD = 8


class SourceAccounting:
    """The registry side of one load (``reader``: this load's name in the sources' lease tables)."""

    def __init__(self, config: LoadSettings, reader: str, log: Any, tasks: anyio.abc.TaskGroup) -> None:
        self.config = config
        self.reader = reader
        self.log = log
        self.tasks = tasks
        self.reports_written = 0
        self.reports_skipped = 0
        #: set once the load is decided: ending sessions leave their leases to :meth:`give_back_together`
        self.ending = False
        self._held_to_the_end: list[tuple[str, str]] = []

    @contextlib.asynccontextmanager
    async def lease(self, attempt: Attempt) -> AsyncIterator[bool | None]:
        """This load's reader lease on the attempt's source while the block runs: True held, False
        refused (the source is at its reader cap), ``None`` no registry to ask or it failed (best
        effort: the read goes ahead)."""
        leased = await self._lease(attempt, self.config.reader_lease)
        renewals = anyio.CancelScope()
        if leased:
            self.tasks.start_soon(self._renew, attempt, renewals)
        try:
            yield leased
        finally:
            renewals.cancel()
            if leased and self.ending and attempt.candidate is not None:
                record = attempt.candidate.record
                self._held_to_the_end.append((record.source_id, record.generation))
            elif leased:
                with anyio.CancelScope(shield=True):
                    await self._lease(attempt, None)

    async def give_back_together(self) -> None:
        """The leases of the sessions that ended with the load, given back in one call (a failed
        call leaves them to run out within ``reader_lease`` seconds, as a killed target's do)."""
        leases, self._held_to_the_end = self._held_to_the_end, []
        registry = self.config.registry
        if leases and registry is not None:
            await registry_call(
                self.log,
                lambda: registry.release_readers(self.reader, leases),
                "source.reader_lease_failed",
                within=_READER_ACCOUNTING_TIMEOUT,
                sources=[source_id for source_id, _ in leases],
            )

    def refusal(self, strategy: str, attempt: Attempt) -> SourceBusy:
        """What a refused lease is: ``SourceBusy``, capacity, never the source's fault."""
        cap = attempt.candidate.record.max_readers if attempt.candidate is not None else 0
        return SourceBusy(
            strategy=strategy, source_id=attempt.source_id, detail=f"at its cap of {cap} readers"
        )

    async def _lease(self, attempt: Attempt, seconds: float | None) -> bool | None:
        registry = self.config.registry
        if attempt.candidate is None or registry is None:
            return None
        record = attempt.candidate.record
        result = await registry_call(
            self.log,
            lambda: registry.lease_reader(record.source_id, record.generation, self.reader, seconds),
            "source.reader_lease_failed",
            within=_READER_ACCOUNTING_TIMEOUT,
            source=record.source_id,
        )
        return None if isinstance(result, Exception) else result

    async def _renew(self, attempt: Attempt, scope: anyio.CancelScope) -> None:
        with scope:
            while True:
                await anyio.sleep(self.config.reader_lease / 3)
                await self._lease(attempt, self.config.reader_lease)

    async def carry_out(self, action: Action, attempt: Attempt, outcome: Outcome) -> bool:
        """Apply the action's side effect; True when the source was marked STALE (or this report
        was the one that ejected it)."""
        registry = self.config.registry
        if (
            not (action.mark_stale or action.report_unreachable)
            or attempt.candidate is None
            or registry is None
        ):
            return False
        if not action.mark_stale and self.reports_written >= REPORTS_PER_LOAD:
            self.reports_skipped += 1
            return False
        if not action.mark_stale:
            self.reports_written += 1
        record = attempt.candidate.record
        reason = f"{outcome.name}: {outcome.detail}"[:500]
        reporter = self.config.target_id
        report = registry.mark_stale if action.mark_stale else registry.report_unreachable
        marked = await registry_call(
            self.log,
            lambda: report(record.source_id, record.generation, reason=reason, reporter=reporter),
            "source.mark_stale_failed",
            source=record.source_id,
        )
        if marked is True:
            self.log.warning("source.marked_stale", source=record.source_id, reason=reason)
            return True
        return False
