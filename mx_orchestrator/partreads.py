"""What a load's part reads share: the target's memory, the content it holds, and the hedge race.

The driver (:mod:`mx_orchestrator.load`) decides who reads which part when;
this module is the state those reads share and the read of one part:

* **allocation, once per load**: the first session whose source answered
  allocates the target for that source's manifest (or finds the memory there
  already) and so fixes the load's *content*; plans made before the memory
  existed are made again against it;
* **one content**: a source whose manifest differs from that content (another
  revision with the same names, dtypes and shapes) is a ``ManifestMismatch``
  before any byte moves, so parts of two revisions are never spliced;
* **the hedge race**: two copies of one part in flight; the first whose READ
  completes wins, its twin is cancelled and awaited (released, no longer
  writing) before the winner is verified;
* what landed (byte runs, rates, hops) for the report and the next load.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import replace

import anyio

from .buffers import Buffers
from .holdings import Holdings, served_manifest
from .models import Manifest, content_differences
from .outcomes import (
    Corrupt,
    Loaded,
    ManifestMismatch,
    Outcome,
    PartNotHeld,
    Superseded,
    TimedOut,
    out_of_time,
)
from .parts import Part, PartPlanner, PartTimes
from .peer import PartCapable, PartConnection, TargetRegistrations, allocate
from .pullplan import PullPlan
from .settings import Learned, LoadSettings
from .strategy import AttemptContext, ProgressCallback
from .target import Target

__all__ = ["HOLDINGS_POLL", "PARTIAL_PATIENCE", "PartReads"]

#: seconds between two looks at a partial source's holdings while it has nothing new for a load
HOLDINGS_POLL = 0.005
#: seconds a session waits on a partial source that holds nothing the load can take before it
#: gives the reader slot back (``PartNotHeld``) and the load reads elsewhere
PARTIAL_PATIENCE = 2.0


class PartReads:
    """The part reads of one load into ``target`` (see the module docstring)."""

    def __init__(
        self,
        target: Target,
        config: LoadSettings,
        progress: ProgressCallback | None = None,
        holdings: Holdings | None = None,
    ) -> None:
        self.target = target
        #: what this target serves while it loads (a partial source), marked as parts land verified
        self.holdings = holdings
        #: the last holdings of each session's source (``None``: a whole source)
        self.seen: dict[str, frozenset[int] | None] = {}
        #: since when a session's partial source has held nothing this load can take
        self._idle_since: dict[str, float] = {}
        #: with a rate cap, when the next part may start
        self._paced_until = 0.0
        self.config = config
        self.progress = progress
        self.registrations = TargetRegistrations(target)
        self.allocation = anyio.Lock()
        self.planner: PartPlanner | None = None
        #: the manifest of the source whose content this load reads; one that proved false; the
        #: sources refused for another content meanwhile
        self.content: Manifest | None = None
        self.discredited: Manifest | None = None
        self.refused: set[str] = set()
        #: id of a source manifest -> it, and the tensors it differs in from the content (reset with it)
        self._differs: dict[int, tuple[Manifest, list[str]]] = {}
        self.scopes: dict[int, anyio.CancelScope] = {}
        self.finished: dict[int, anyio.Event] = {}
        self.won: set[int] = set()
        #: bytes/s of every part that landed (transfer phase), the hops of its source
        self.rates: list[float] = []
        self.hops: list[int] = []
        self.first_part_at: float | None = None
        self.last_landing_at: float | None = None

    # -- content and memory -----------------------------------------------------

    def agrees(self, plan: PullPlan, strategy: str, source_id: str | None) -> PullPlan | Outcome:
        """``plan``, or a ``ManifestMismatch`` when its source's content differs from this load's.

        While the load has no content (none allocated yet, or it was discredited) the plan's source
        is adopted once the memory exists (:meth:`adopt`)."""
        if self.content is None or plan.source is self.content:
            return plan
        known = self._differs.get(id(plan.source))
        if known is not None and known[0] is plan.source:
            differs = known[1]
        else:  # once per source manifest and content (90,000 tensors are compared)
            differs = content_differences(plan.source, self.content)
            self._differs[id(plan.source)] = (plan.source, differs)
        if not differs:
            return plan
        if source_id is not None:
            self.refused.add(source_id)
        return ManifestMismatch(
            strategy=strategy,
            source_id=source_id,
            detail=f"other content than this load reads ({len(differs)} tensors differ, "
            f"e.g. {differs[0]!r}): never mixed in",
        )

    def adopt(self, plan: PullPlan) -> None:
        """Make ``plan``'s source the load's content (none yet, or the last was discredited); landed
        tensors it disagrees with were verified against a content that proved false: read again."""
        if self.content is not None:
            return
        self.content = plan.source
        self._differs.clear()
        if self.discredited is not None and self.planner is not None:
            index = {spec.name: i for i, spec in enumerate(plan.local_manifest.tensors)}
            differing = content_differences(plan.source, self.discredited)
            self.planner.unland([index[n] for n in differing if n in index])

    def discredit(self, source: Manifest) -> set[str]:
        """A source of the load's content served bytes that fail that content's checksums: the
        content is not trusted any more (a liar may have defined it). The next source to read
        decides it again; returns the sources refused for another content, to be tried again."""
        if self.content is None or content_differences(source, self.content):
            return set()
        self.discredited, self.content = self.content, None
        refused, self.refused = self.refused, set()
        if self.holdings is not None:  # what it verified against may be a liar's: serve none of it
            self.holdings.withdraw()
        return refused

    def check(self, strategy: PartCapable, ctx: AttemptContext) -> PullPlan | Outcome:
        """The strategy's pure check of the session's source, and this load's content rule."""
        checked = strategy.check_for(ctx)
        return (
            self.agrees(checked, strategy.name, ctx.source_id) if isinstance(checked, PullPlan) else checked
        )

    async def allocate_for(
        self, plan: PullPlan, strategy: PartCapable, ctx: AttemptContext
    ) -> PullPlan | Outcome:
        """The plan against the target's real memory, allocating it for this source (which
        answered) when there is none; the first session here fixes the load's content."""
        target = self.target
        async with self.allocation:
            if target.buffers is None:
                allocated = await allocate(plan, target, ctx, strategy.name)
                if not isinstance(allocated, Buffers):
                    return allocated
            elif plan.local_manifest is not target.manifest:
                replanned = strategy.check_for(ctx)  # planned before the memory existed: again, for it
                if not isinstance(replanned, PullPlan):
                    return replanned
                plan = replanned
            agreed = self.agrees(plan, strategy.name, ctx.source_id)
            if isinstance(agreed, PullPlan) and self.planner is None:
                manifest = target.manifest
                assert manifest is not None
                self.planner = PartPlanner(
                    [spec.nbytes for spec in manifest.tensors],
                    self.config.stripe,
                    min_part_bytes=self.config.min_part_bytes,
                    max_attempts=self.config.policy.max_attempts,
                    max_part_bytes=self.config.max_part_bytes,
                    rotation=zlib.crc32(self.config.target_id.encode()),
                )
            if isinstance(agreed, PullPlan):
                self.adopt(agreed)
                if self.holdings is not None and self.content is not None and target.manifest is not None:
                    hops = ctx.candidate.record.hops + 1 if ctx.candidate is not None else 0
                    self.holdings.begin(served_manifest(target.manifest, self.content), hops)
            return agreed

    def forget(self, release: bool) -> None:
        """Drop the parts and registrations (a whole-model strategy reads everything next);
        ``release``: the load allocated the memory, so it is dropped too."""
        self.planner, self.content, self.discredited = None, None, None
        self.registrations.close()
        if release:
            self.target.release()

    def close(self) -> None:
        self.registrations.close()

    # -- one part ---------------------------------------------------------------------

    async def read(
        self,
        part: Part,
        ctx: AttemptContext,
        budget: float,
        strategy: str,
        plan: PullPlan,
        connection: PartConnection,
        hops: int,
        began: float,
    ) -> Outcome:
        """Read ``part`` through ``connection`` within ``budget`` seconds from ``began`` (when its
        deadline was set): its outcome, a lost hedge race included; the part planner is told what
        became of it."""
        planner = self.planner
        assert planner is not None
        scope = anyio.CancelScope()
        self.scopes[part.index] = scope
        self.finished[part.index] = anyio.Event()
        names = [plan.local_manifest.tensors[i].name for i in part.tensors]
        if self.holdings is not None:
            self.holdings.reading(names, True)
        outcome: Outcome | None = None
        try:
            with scope, anyio.move_on_after(budget + 1.0):  # the agent keeps the deadline; a backstop
                restricted = plan.restricted(part.tensors)
                outcome = await connection.read(restricted, ctx, names, lambda: self.settle_twin(part))
        finally:
            self.scopes.pop(part.index, None)
            self.finished.pop(part.index).set()
        wall = anyio.current_time() - began
        sid = ctx.source_id
        if outcome is None and scope.cancel_called:
            planner.superseded(part)
            if part.hedge_of is not None:  # the hedge that lost did nothing wrong
                return Superseded(
                    strategy=strategy, source_id=sid, seconds=wall, detail="the original landed first"
                )
            # the original that lost was slower than another source with the same bytes: evidence
            # of slowness (counted toward ejection), and of a stall only if it had the time to show it
            lost = out_of_time(strategy, sid, wall, wall, part.nbytes, over=False, slow=True)
            return replace(lost, detail=f"superseded by a hedge after {wall:.3g}s without completing")
        if outcome is None:
            outcome = out_of_time(strategy, sid, wall, budget, part.nbytes, over=ctx.remaining <= 0)
        if isinstance(outcome, TimedOut):  # the part's own deadline, what stall evidence is judged on
            outcome = replace(outcome, seconds=wall, deadline=budget, planned_bytes=part.nbytes)
        if isinstance(outcome, Superseded):
            planner.superseded(part)
        elif isinstance(outcome, (Loaded, Corrupt)):
            index = {spec.name: i for i, spec in enumerate(plan.local_manifest.tensors)}
            bad = [index[n] for n in outcome.bad_tensors] if isinstance(outcome, Corrupt) else []
            twin = planner.landed(part, bad)
            if twin is not None and (other := self.scopes.get(twin)) is not None:
                other.cancel()  # a hedge started while this part was being verified: it lost
            self.last_landing_at = anyio.current_time()
            transfer = ctx.phases.seconds.get("transfer", 0.0)
            if self.holdings is not None:  # verified: readers of this target may take it now
                good = set(bad)
                self.holdings.mark(n for i, n in zip(part.tensors, names, strict=True) if i not in good)
            if isinstance(outcome, Loaded):  # the data plane's time runs from the first part that landed
                self.first_part_at = began if self.first_part_at is None else min(self.first_part_at, began)
                self.hops.append(hops)
                if transfer > 0:
                    self.rates.append(part.nbytes / transfer)
                if self.progress is not None:
                    self.progress(planner.landed_bytes, planner.total_bytes)
        else:
            planner.failed(part)
        if self.holdings is not None and not isinstance(outcome, Loaded):
            self.holdings.reading(names, planner.twin_of(part) is not None)
        return outcome

    async def settle_twin(self, part: Part) -> bool:
        """Called when ``part``'s READ completed, before its bytes are verified: True when it won."""
        twin = self.planner.twin_of(part) if self.planner is not None else None
        if twin is not None and twin in self.won:
            return False
        # won even without a twin yet: a hedge of it that starts while it is verified loses
        self.won.add(part.index)
        if twin is None:
            return True
        scope, finished = self.scopes.get(twin), self.finished.get(twin)
        if scope is not None and finished is not None:
            scope.cancel()
            await finished.wait()
        return True

    def landed(self, part: Part, outcome: Outcome, plan: PullPlan) -> tuple[tuple[int, int], ...]:
        """The byte runs of ``part`` that landed verified (all of it when ``Loaded``, the good
        tensors of a ``Corrupt`` part, nothing otherwise)."""
        assert self.planner is not None
        if isinstance(outcome, Loaded):
            tensors: list[int] = list(part.tensors)
        elif isinstance(outcome, Corrupt):
            bad = set(outcome.bad_tensors)
            tensors = [i for i in part.tensors if plan.local_manifest.tensors[i].name not in bad]
        else:
            tensors = []
        return tuple(self.planner.byte_runs(tensors))

    # -- partial sources ------------------------------------------------------------------

    def saw(self, source_id: str, held: frozenset[int] | None) -> bool:
        """A session's source answered what it holds; True when a partial source holds more than
        it did (the load's idle sessions may find work)."""
        before = self.seen.get(source_id, frozenset())
        self.seen[source_id] = held
        grew = held is not None and before is not None and len(held) > len(before)
        if grew or held is None:
            self._idle_since.pop(source_id, None)
        return grew

    def unsee(self, source_id: str | None) -> None:
        if source_id is not None:
            self.seen.pop(source_id, None)
            self._idle_since.pop(source_id, None)

    def rarity(self) -> list[int] | None:
        """Per tensor, how many of this load's sources hold it, for rarest-first parts; ``None``
        (read in order) unless the load serves what it lands or reads a partial source."""
        if self.planner is None:
            return None
        partial = [held for held in self.seen.values() if held is not None]
        if self.holdings is None and not partial:
            return None
        # a holder counts 2, a source reading it now 1: left for later by readers of a whole source
        whole = sum(2 for held in self.seen.values() if held is None)
        counts = [whole] * self.planner.tensor_count
        for held in partial:
            for i in held:
                counts[i] += 2
            for i in getattr(held, "coming", ()):
                counts[i] += 1
        return counts

    def waited_out(self, source_id: str, now: float) -> bool:
        """Whether a partial source has held nothing this load can take for long enough that its
        session should give its reader slot back (:data:`PARTIAL_PATIENCE`)."""
        since = self._idle_since.setdefault(source_id, now)
        return now - since >= PARTIAL_PATIENCE

    def not_held(self, strategy: str, source_id: str) -> PartNotHeld:
        self._idle_since.pop(source_id, None)
        return PartNotHeld(
            strategy=strategy,
            source_id=source_id,
            detail=f"a partial source without the parts this load still needs for {PARTIAL_PATIENCE:g}s",
        )

    async def next_part(
        self,
        connection: PartConnection,
        plan: PullPlan,
        ctx: AttemptContext,
        strategy: str,
        hedging: bool,
        news: Callable[[], None],
    ) -> Part | float | Outcome:
        """What a session does next, given what its source holds (its answer, asked now): read a
        part; or wait until the time returned (a part in flight may need a hedge, a partial source
        may land more); or end with the outcome returned (the source could not answer, or has held
        nothing this load can take for :data:`PARTIAL_PATIENCE`). ``news`` is called when a
        partial source holds more than before (the load's idle sessions may find work)."""
        rate = self.config.max_rate
        if rate is not None:  # paced: the next part starts once the last one's share of time passed
            await anyio.sleep(max(0.0, self._paced_until - anyio.current_time()))
        held = await connection.held(plan, ctx)
        source_id, now = ctx.source_id or "", anyio.current_time()
        if held is not None and not isinstance(held, frozenset):
            return held
        if self.saw(source_id, held):
            news()
        parts, times = self.planner, self.times()
        assert parts is not None
        part = parts.take(source_id, now, held, self.rarity()) or (
            parts.hedge(source_id, now, times.hedge_after, held) if hedging else None
        )
        if part is not None:
            if rate is not None:
                self._paced_until = max(now, self._paced_until) + part.nbytes / rate
            return part
        if held is not None and parts.pending() and not parts.holds_any(held):
            if self.waited_out(source_id, now):
                return self.not_held(strategy, source_id)
            return now + HOLDINGS_POLL
        return parts.next_hedge_time(source_id, times.hedge_after) if hedging else math.inf

    def delivery(self) -> tuple[float | None, int | None]:
        """Seconds from the first part's start to the last landing, and the farthest hops a landed
        part came from (``None``, ``None``: no part landed)."""
        if self.first_part_at is None or self.last_landing_at is None or self.planner is None:
            return None, None
        return self.last_landing_at - self.first_part_at, max(self.hops, default=None)

    def teach(self, learned: Learned) -> None:
        """The load is in: the next loads expect parts at the best rate this one saw."""
        if self.rates:
            learned.part_rate = max(max(self.rates), learned.part_rate or 0.0)

    def times(self) -> PartTimes:
        """How long parts should take: at the best rate of this load, else of earlier ones, else
        the policy's stall rate."""
        policy = self.config.policy
        rate = max(self.rates) if self.rates else self.config.learned.part_rate or policy.stall_rate
        return PartTimes(rate, policy.stall_seconds, self.config.hedge)

    def stall_due(self) -> float:
        """When a part in flight becomes a stall (``inf``: none can), so another source may join."""
        return self.planner.next_hedge_time("", self.times().stall_after) if self.planner else math.inf
