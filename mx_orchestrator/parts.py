"""Striped loads, decided: which bytes of the model each source reads next, and what a failed part costs.

The model is the target manifest's tensors in manifest order; a *part* is a
run of consecutive tensors (its byte range in that order is what the report
shows). A tensor is never split between parts: it is the unit verification
checks and re-reads, so a part that fails verification costs only its bad
tensors. In an arena, consecutive tensors are one byte range of one region,
so region parts are plain byte ranges of the region; in a tensor layout a
part is a group of whole tensors.

Sizing is guided self-scheduling: each :meth:`PartPlanner.take` hands out about
``unassigned / (2 x workers)`` bytes (never less than ``min_part_bytes``, never
less than one tensor), so parts start large and shrink towards the end. A
source that delivers fast comes back sooner and ends up with more of the
model; a slow one holds only a small part when the others run dry. None of
this needs a rate estimate, so it is right from the first part. One worker
sizes as two would (a quarter first, not a half): a source lost mid-part then
costs at most a quarter of the model.

Partial sources (a target still loading, :mod:`~mx_orchestrator.holdings`):
:meth:`PartPlanner.take` gives one only tensors it holds, as runs of held
tensors, starting at the *rarest* unassigned tensor (by how many of the load's
sources hold it; a source reading one counts half). Ties start at a random
place drawn per part (seeded by the target), so a fleet's readers of one seed
take different parts instead of walking into each other's; a part is never
larger than ``max_part_bytes``, so what lands is served soon. Without
holdings or rarity the model is read in order, as before.

Failover: a part whose attempt failed goes back to the pool whole (a READ that
did not complete proves nothing about which of its bytes landed); one that
failed verification goes back as its bad tensors only. Landed tensors never
return to the pool. *Hedging*: a part in flight longer than the driver's
expected time can be handed to a second source (:meth:`PartPlanner.hedge`);
whichever lands first wins and the other is superseded
(:meth:`PartPlanner.landed` names it so the driver cancels it).

Termination: every :meth:`take` and :meth:`hedge` counts one attempt against
``max_attempts`` until its part lands whole, which gives the attempt back
(landing whole removes at least one tensor from the pool for good, so that
happens at most once per tensor); when the bound is reached they hand out
nothing more, so a load ends whatever the outcomes: at most ``tensors +
max_attempts`` parts are ever handed out. A whole load from one source is so
a handful of parts (a geometric series, see sizing), none of them counted.
The property tests drive this class with arbitrary outcomes to pin that, and
that parts never overlap, always cover the model, and never re-plan a landed
tensor.

Nothing here performs I/O or reads a clock (``now`` is passed in).
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Callable, Collection, Container, Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "HEDGE_FACTOR",
    "HEDGE_FLOOR",
    "PART_DEADLINE_FACTOR",
    "Part",
    "PartPlanner",
    "PartTimes",
    "expected_seconds",
]


@dataclass(frozen=True, slots=True)
class Part:
    """Tensors ``[first, stop)`` of the target manifest: bytes ``[start, end)`` of the model.

    ``hedge_of``: the index of the part this one duplicates (``None``: an original).
    """

    index: int
    first: int
    stop: int
    start: int
    end: int
    hedge_of: int | None = None

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def tensors(self) -> range:
        return range(self.first, self.stop)


def expected_seconds(nbytes: int, rate: float | None, floor: float) -> float:
    """How long ``nbytes`` should take at ``rate`` bytes/s, never under ``floor`` (no rate: ``inf``)."""
    if rate is None or not rate > 0 or not math.isfinite(rate):
        return math.inf
    return max(floor, nbytes / rate)


class PartPlanner:
    """Hands out parts to sources, takes back their results; see the module docstring."""

    def __init__(
        self,
        sizes: Sequence[int],
        workers: int,
        *,
        min_part_bytes: int = 32 << 20,
        max_attempts: int = 256,
        max_part_bytes: int | None = None,
        rotation: int = 0,
    ) -> None:
        if workers < 1 or max_attempts < 1 or min_part_bytes < 1:
            raise ValueError("workers, max_attempts and min_part_bytes must be at least 1")
        if any(n < 0 for n in sizes):
            raise ValueError("tensor sizes cannot be negative")
        self._sizes = tuple(sizes)
        self._offsets = [0]
        for n in self._sizes:
            self._offsets.append(self._offsets[-1] + n)
        self.workers = workers
        self.min_part_bytes = min_part_bytes
        #: no part larger than this (a fleet: what lands sooner is served sooner); ``None``: no cap
        self.max_part_bytes = max_part_bytes
        #: where ties of rarity start (a target's own offset into the model)
        self.rotation = rotation % max(1, len(sizes))
        self._jitter = random.Random(rotation)
        self.max_attempts = max_attempts
        #: disjoint, sorted ``[first, stop)`` runs of tensors nobody holds
        self._pending: list[tuple[int, int]] = [(0, len(self._sizes))] if self._sizes else []
        self._landed = [False] * len(self._sizes)
        self._in_flight: dict[int, tuple[Part, str, float]] = {}
        self._twin: dict[int, int] = {}
        self._next_index = 0
        self.attempts = 0

    # -- facts ----------------------------------------------------------------

    @property
    def tensor_count(self) -> int:
        return len(self._sizes)

    @property
    def total_bytes(self) -> int:
        return self._offsets[-1]

    @property
    def landed_bytes(self) -> int:
        return sum(n for n, done in zip(self._sizes, self._landed, strict=True) if done)

    @property
    def done(self) -> bool:
        """Every tensor has landed."""
        return all(self._landed)

    @property
    def exhausted(self) -> bool:
        """The attempt bound is reached: nothing more will be handed out."""
        return self.attempts >= self.max_attempts

    @property
    def stuck(self) -> bool:
        """Nothing can finish the load any more: not done, nothing in flight, nothing more to hand out."""
        return not self.done and not self._in_flight and (self.exhausted or not self._pending)

    def in_flight(self) -> list[tuple[Part, str, float]]:
        """``(part, source, started)`` of every part being read, oldest first."""
        return sorted(self._in_flight.values(), key=lambda row: (row[2], row[0].index))

    def twin_of(self, part: Part) -> int | None:
        """The index of the other copy of a hedged part still in flight (``None``: no twin)."""
        twin = self._twin.get(part.index)
        return twin if twin is not None and twin in self._in_flight else None

    def byte_runs(self, tensors: Iterable[int]) -> list[tuple[int, int]]:
        """The byte ranges of ``tensors`` (indices) in the model, adjacent ones merged."""
        runs: list[tuple[int, int]] = []
        for i in sorted(tensors):
            start, end = self._offsets[i], self._offsets[i + 1]
            if runs and runs[-1][1] == start:
                runs[-1] = (runs[-1][0], end)
            elif end > start:
                runs.append((start, end))
        return runs

    def landed_tensors(self) -> list[int]:
        return [i for i, done in enumerate(self._landed) if done]

    def pending(self) -> list[tuple[int, int]]:
        return list(self._pending)

    # -- handing out ------------------------------------------------------------

    def take(
        self,
        source: str,
        now: float,
        held: Container[int] | None = None,
        rarity: Sequence[int] | None = None,
    ) -> Part | None:
        """The next part for ``source`` (``None``: nothing unassigned it holds, or the bound is reached).

        ``held``: the tensors a partial source holds (``None``: all of them).
        ``rarity``: per tensor, how many known sources hold it; the part starts
        at the rarest unassigned tensor the source holds (ties: the first at or
        after :attr:`rotation`, so a fleet's targets start at different places),
        and runs on through tensors it holds. Without either, the part starts at
        the first unassigned tensor, as a single source's load reads the model
        in order.
        """
        if self.exhausted or not self._pending:
            return None
        unassigned = sum(self._offsets[stop] - self._offsets[first] for first, stop in self._pending)
        want = max(self.min_part_bytes, math.ceil(unassigned / (2 * max(2, self.workers))))
        if self.max_part_bytes is not None:
            want = min(want, max(self.min_part_bytes, self.max_part_bytes))
        found = self._start_of(held, rarity)
        if found is None:
            return None
        run, start = found
        first, stop = self._pending[run]
        # the first tensor always; then more while the source holds them and the part stays small
        cut = start + 1
        while (
            cut < stop
            and (held is None or cut in held)
            and self._offsets[cut + 1] - self._offsets[start] <= want
        ):
            cut += 1
        self._pending[run : run + 1] = [r for r in ((first, start), (cut, stop)) if r[0] < r[1]]
        return self._start(start, cut, source, now, None)

    def _start_of(self, held: Container[int] | None, rarity: Sequence[int] | None) -> tuple[int, int] | None:
        """``(pending run, tensor)`` where the next part starts (see :meth:`take`)."""
        if held is None and rarity is None:
            return 0, self._pending[0][0]
        count = len(self._sizes)
        offset = self._jitter.randrange(count)
        best: tuple[int, int, int, int] | None = None
        for run, (first, stop) in enumerate(self._pending):
            for i in range(first, stop):
                if held is not None and i not in held:
                    continue
                key = (rarity[i] if rarity is not None else 0, (i - offset) % count, run, i)
                if best is None or key < best:
                    best = key
        return None if best is None else (best[2], best[3])

    def holds_any(self, held: Container[int] | None) -> bool:
        """Whether a source holding ``held`` has any unassigned tensor to give (``None``: all)."""
        if held is None:
            return bool(self._pending)
        return any(i in held for first, stop in self._pending for i in range(first, stop))

    def hedge(
        self,
        source: str,
        now: float,
        after: Callable[[Part], float],
        held: Container[int] | None = None,
    ) -> Part | None:
        """A duplicate of the oldest part in flight longer than ``after(part)`` seconds, for ``source``.

        Only parts of other sources, not already hedged, that ``source`` holds
        whole (``held``), and only when nothing is unassigned (fresh bytes come first).
        """
        if self.exhausted or self._pending:
            return None
        for part, owner, started in self.in_flight():
            if owner == source or part.index in self._twin:
                continue
            if held is not None and not all(i in held for i in part.tensors):
                continue
            if now - started >= after(part):
                return self._start(part.first, part.stop, source, now, part.index)
        return None

    def next_hedge_time(self, source: str, after: Callable[[Part], float]) -> float:
        """When :meth:`hedge` could next give ``source`` a part (``inf``: nothing in flight allows it)."""
        if self.exhausted or self._pending:
            return math.inf
        times = [
            started + after(part)
            for part, owner, started in self._in_flight.values()
            if owner != source and part.index not in self._twin
        ]
        return min(times, default=math.inf)

    def _start(self, first: int, stop: int, source: str, now: float, hedge_of: int | None) -> Part:
        part = Part(self._next_index, first, stop, self._offsets[first], self._offsets[stop], hedge_of)
        self._next_index += 1
        self.attempts += 1
        self._in_flight[part.index] = (part, source, now)
        if hedge_of is not None:
            self._twin[part.index] = hedge_of
            self._twin[hedge_of] = part.index
        return part

    # -- results ----------------------------------------------------------------

    def landed(self, part: Part, bad: Collection[int] = ()) -> int | None:
        """``part``'s READ completed; ``bad``: its tensors that failed verification (re-planned alone).

        Returns the index of the twin the driver must now cancel (a hedge pair), if any.
        """
        self._finish(part)
        twin = self._twin.pop(part.index, None)
        if twin is not None:
            self._twin.pop(twin, None)
        wrong = {i for i in bad if part.first <= i < part.stop}
        if not wrong:
            self.attempts -= 1  # progress, not a failed try (see Termination)
        for i in part.tensors:
            if i not in wrong:
                self._landed[i] = True
        for i in sorted(wrong):
            if not self._landed[i]:
                self._requeue(i, i + 1)
        return twin if twin is not None and twin in self._in_flight else None

    def failed(self, part: Part) -> None:
        """``part``'s attempt failed (no byte of it is trusted): back to the pool, unless a twin reads it."""
        self._finish(part)
        twin = self._twin.pop(part.index, None)
        if twin is not None:
            self._twin.pop(twin, None)
            if twin in self._in_flight:
                return
        self._requeue(part.first, part.stop)

    def superseded(self, part: Part) -> None:
        """``part`` was cancelled because its twin landed first: nothing to re-plan."""
        self._finish(part)
        self._twin.pop(part.index, None)

    def unland(self, tensors: Collection[int]) -> None:
        """Landed ``tensors`` are not trusted after all (they were verified against a content that
        proved false): back to the pool, to be read again."""
        for i in sorted(set(tensors)):
            if 0 <= i < len(self._landed) and self._landed[i]:
                self._landed[i] = False
                self._requeue(i, i + 1)

    def _finish(self, part: Part) -> None:
        if self._in_flight.pop(part.index, None) is None:
            raise RuntimeError(f"part {part.index} is not in flight")

    def _requeue(self, first: int, stop: int) -> None:
        runs = [(i, i + 1) for i in range(first, stop) if not self._landed[i]]
        for run in runs:
            bisect.insort(self._pending, run)
        merged: list[tuple[int, int]] = []
        for lo, hi in self._pending:
            if merged and merged[-1][1] == lo:
                merged[-1] = (merged[-1][0], hi)
            else:
                merged.append((lo, hi))
        self._pending = merged


#: a part in flight this many times its expected time is hedged by an idle reader ...
HEDGE_FACTOR = 2.0
#: ... but never sooner than this (seconds): below it a hedge costs more than it saves
HEDGE_FLOOR = 0.2
#: a part's deadline: this many times its expected time (and never under the stall evidence)
PART_DEADLINE_FACTOR = 4.0


@dataclass(frozen=True, slots=True)
class PartTimes:
    """When a part is due, overdue and given up, from its bytes alone.

    ``rate``: the expected bytes/s (the best a load observed, else the policy's
    stall rate); ``stall_seconds``: the policy's least time without completion
    that is evidence of a stall, for some bytes; ``hedging``: whether hedges run.
    """

    rate: float
    stall_seconds: Callable[[int], float]
    hedging: bool = True

    def expected(self, part: Part) -> float:
        return expected_seconds(part.nbytes, self.rate, 0.0)

    def hedge_after(self, part: Part) -> float:
        """An idle reader hedges a part in flight this long."""
        return max(HEDGE_FLOOR, HEDGE_FACTOR * self.expected(part))

    def stall_after(self, part: Part) -> float:
        """A part in flight this long is a stall: another source (beyond the stripe) may join."""
        return max(self.hedge_after(part), self.stall_seconds(part.nbytes))

    def budget(self, part: Part, share: float) -> float:
        """The part's deadline: long enough to be evidence of a stall (and for a hedge to act
        before the original is given up), never over ``share`` (its share of the load's time)."""
        wanted = max(self.stall_seconds(part.nbytes), PART_DEADLINE_FACTOR * self.expected(part))
        if self.hedging:
            wanted = max(wanted, 2 * self.stall_after(part))
        return max(0.0, min(wanted, share))
