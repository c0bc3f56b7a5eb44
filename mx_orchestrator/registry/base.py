"""The registry contract and the pure record transitions every backend shares.

A backend (memory, SQLite, Redis) stores records and manifests; *what* a
heartbeat, an ejection or a listing means is decided here, once, by pure
functions over a record and a timestamp, so every backend behaves the same.

Ejection follows Envoy's outlier detection: the n-th ejection keeps a source
out for ``base x n`` seconds (capped); its own heartbeat cannot bring it back
earlier; a new process generation starts with a clean record.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

from ..errors import ManifestError
from ..models import Manifest, SourceRecord, SourceState, StoredManifest

__all__ = [
    "EjectionPolicy",
    "RecordTransitions",
    "SourceRegistry",
    "apply_drain",
    "apply_heartbeat",
    "decode_record",
    "encode_record",
    "apply_reader",
    "apply_publish",
    "apply_unreachable",
    "apply_mark_stale",
    "is_expired",
    "as_listed",
    "is_listed",
]


@dataclass(frozen=True, slots=True)
class EjectionPolicy:
    """Envoy-style outlier detection: cool-downs, and how many unreachable reports eject."""

    base_seconds: float = 30.0
    max_seconds: float = 300.0
    unreachable_threshold: int = 3

    def cooldown(self, times_ejected: int) -> float:
        return min(self.base_seconds * max(times_ejected, 1), self.max_seconds)


def is_expired(record: SourceRecord, now: float) -> bool:
    """A record whose heartbeat is older than its TTL is presumed dead."""
    return now - record.heartbeat_at > record.ttl


def is_listed(record: SourceRecord, now: float, state: SourceState | None) -> bool:
    if state is None:
        return True
    if state is SourceState.READY:
        return (
            record.state is SourceState.READY and not is_expired(record, now) and now >= record.ejected_until
        )
    return record.state is state


def as_listed(record: SourceRecord, now: float) -> SourceRecord:
    """The record as a listing at ``now`` shows it: reader leases that ran out are not counted
    (a crashed target's lease must not keep a source "full" until the next write to its record)."""
    if all(expires > now for expires in record.readers.values()):
        return record
    return _with_readers(record, record.readers, now)


def apply_heartbeat(record: SourceRecord, now: float) -> SourceRecord:
    """Refresh liveness and drop expired reader leases; a STALE source whose cool-down has passed
    becomes READY again."""
    state = record.state
    reason = record.stale_reason
    if state is SourceState.STALE and now >= record.ejected_until:
        state, reason = SourceState.READY, ""
    return _with_readers(
        replace(record, heartbeat_at=now, state=state, stale_reason=reason), record.readers, now
    )


def _with_readers(record: SourceRecord, readers: Mapping[str, float], now: float) -> SourceRecord:
    live = {reader: expires for reader, expires in readers.items() if expires > now}
    return replace(record, readers=live, load=len(live))


def apply_publish(
    previous: SourceRecord | None, record: SourceRecord, now: float, stored: StoredManifest | None = None
) -> SourceRecord:
    """A new generation starts clean; re-publishing the same generation keeps its ejection, its
    readers' leases (a partial source that publishes itself whole must not forget who reads it:
    the cap would admit them again) and, published without a manifest, the manifest it had. The
    record names its stored manifest."""
    same_generation = previous is not None and previous.generation == record.generation
    if stored is not None:
        record = replace(record, manifest_key=stored.key)
    else:
        record = replace(
            record, manifest_key=previous.manifest_key if previous is not None and same_generation else ""
        )
    if previous is not None and same_generation:
        record = replace(
            record,
            state=previous.state,
            times_ejected=previous.times_ejected,
            ejected_until=previous.ejected_until,
            stale_reason=previous.stale_reason,
            unreachable_reports=previous.unreachable_reports,
            readers=previous.readers,
            load=previous.load,
        )
    else:
        record = replace(
            record,
            state=SourceState.READY,
            times_ejected=0,
            ejected_until=0.0,
            stale_reason="",
            unreachable_reports=0,
        )
    return apply_heartbeat(record, now)


def apply_drain(record: SourceRecord) -> SourceRecord:
    """A source shutting down: not offered to new readers, readers in flight may finish."""
    return replace(record, state=SourceState.DRAINING)


def apply_reader(record: SourceRecord, reader: str, expires_at: float | None, now: float) -> SourceRecord:
    """Take, renew (``expires_at``) or give back (``None``) one reader's lease; ``load`` counts live leases.

    Leases, not counters: a target that crashes or is killed mid-read stops
    renewing, and its lease runs out on its own.
    """
    readers = dict(record.readers)
    if expires_at is None:
        readers.pop(reader, None)
    else:
        readers[reader] = expires_at
    return _with_readers(record, readers, now)


def apply_unreachable(
    record: SourceRecord, now: float, reason: str, policy: EjectionPolicy
) -> tuple[SourceRecord, bool]:
    """Count one target's failure to reach the source; the threshold-th report ejects it.

    One unreachable report is often the network between one pair; several are
    the source. Returns the record and whether this report ejected it.
    """
    reports = record.unreachable_reports + 1
    if reports >= policy.unreachable_threshold:
        ejected = apply_mark_stale(record, now, f"unreachable ({reports} reports): {reason}", policy)
        return replace(ejected, unreachable_reports=0), True
    return replace(record, unreachable_reports=reports), False


def apply_mark_stale(record: SourceRecord, now: float, reason: str, policy: EjectionPolicy) -> SourceRecord:
    times = record.times_ejected + 1
    return replace(
        record,
        state=SourceState.STALE,
        times_ejected=times,
        ejected_until=now + policy.cooldown(times),
        stale_reason=reason[:500],
    )


@runtime_checkable
class SourceRegistry(Protocol):
    """Where sources announce themselves and targets find them.

    Operations naming a ``generation`` apply only to that process generation:
    a late ``mark_stale`` aimed at a source's previous life must not eject its
    restarted successor.
    """

    async def publish(self, record: SourceRecord, manifest: Manifest | None = None) -> None: ...

    async def heartbeat(self, source_id: str, generation: str) -> SourceRecord | None: ...

    async def drain(self, source_id: str, generation: str) -> SourceRecord | None:
        """Mark a source DRAINING (no new readers); returns the record, whose ``load`` counts readers left."""
        ...

    async def report_unreachable(
        self, source_id: str, generation: str, *, reason: str, reporter: str = ""
    ) -> bool:
        """One target could not reach the source; True when this report ejected it."""
        ...

    async def lease_reader(self, source_id: str, generation: str, reader: str, seconds: float | None) -> bool:
        """Take or renew ``reader``'s lease for ``seconds`` (``None``: give it back).

        ``load`` counts the live leases: the data the least-loaded selection ranks
        by. False when a new reader was refused: the source is at ``max_readers``.
        """
        ...

    async def release_readers(self, reader: str, leases: Sequence[tuple[str, str]]) -> None:
        """Give back ``reader``'s leases on these ``(source_id, generation)`` in one call: a load
        that ends gives back every session's lease at once, not one call each."""
        ...

    async def list(
        self, identity_key: str | None = None, state: SourceState | None = SourceState.READY
    ) -> list[SourceRecord]: ...

    async def get(self, source_id: str) -> SourceRecord | None: ...

    async def get_manifest_blob(self, key: str) -> bytes | None:
        """The stored manifest named ``key`` (one copy however many sources serve it), unparsed:
        :meth:`Manifest.from_stored` checks it hashes to ``key`` before reading it."""
        ...

    async def get_manifest(self, source_id: str, generation: str) -> Manifest | None:
        """The manifest of that process generation of the source, if it published one."""
        ...

    async def mark_stale(
        self, source_id: str, generation: str, *, reason: str, reporter: str = ""
    ) -> bool: ...

    async def remove(self, source_id: str, generation: str | None = None) -> bool: ...

    async def aclose(self) -> None: ...


def decode_record(text: str | bytes | None) -> SourceRecord | None:
    """A stored record, or ``None`` for garbage: a row a buggy or hostile writer left breaks no listing.

    Records are immutable and a listing repeats most of the last one (a target
    re-listing a fleet during capacity waits sees the same rows between
    heartbeats), so decoded records are kept by their text (LRU).
    """
    if text is None:
        return None
    return _decode_record(text)


@functools.lru_cache(maxsize=16384)
def _decode_record(text: str | bytes) -> SourceRecord | None:
    try:
        return SourceRecord.from_dict(json.loads(text))
    except (ValueError, ManifestError, RecursionError):
        return None


def encode_record(record: SourceRecord) -> str:
    return json.dumps(record.to_dict())


Change = Callable[[SourceRecord | None], SourceRecord | None]


def _for_generation(generation: str, transition: Callable[[SourceRecord], SourceRecord]) -> Change:
    """A change that applies only to the named process generation (else leaves the record alone)."""

    def change(current: SourceRecord | None) -> SourceRecord | None:
        if current is None or current.generation != generation:
            return None
        return transition(current)

    return change


class RecordTransitions:
    """The registry operations that are one pure transition of one record, written once.

    A backend provides ``_change_each``: an atomic read-modify-write of some
    records, each by its own change (which returns the new record, or ``None``
    to leave it as it is), that returns what it wrote; ``get`` and
    ``get_manifest_blob``.
    """

    _ejection: EjectionPolicy
    _clock: Callable[[], float]

    async def _change_each(self, changes: Mapping[str, Change]) -> dict[str, SourceRecord | None]:
        raise NotImplementedError

    async def _change(self, source_id: str, change: Change) -> SourceRecord | None:
        return (await self._change_each({source_id: change}))[source_id]

    async def get(self, source_id: str) -> SourceRecord | None:
        raise NotImplementedError

    async def get_manifest_blob(self, key: str) -> bytes | None:
        raise NotImplementedError

    async def get_manifest(self, source_id: str, generation: str) -> Manifest | None:
        record = await self.get(source_id)
        if record is None or record.generation != generation or not record.manifest_key:
            return None
        blob = await self.get_manifest_blob(record.manifest_key)
        return Manifest.from_stored(record.manifest_key, blob) if blob is not None else None

    async def heartbeat(self, source_id: str, generation: str) -> SourceRecord | None:
        now = self._clock()
        return await self._change(source_id, _for_generation(generation, lambda r: apply_heartbeat(r, now)))

    async def mark_stale(self, source_id: str, generation: str, *, reason: str, reporter: str = "") -> bool:
        now = self._clock()
        change = _for_generation(generation, lambda r: apply_mark_stale(r, now, reason, self._ejection))
        return await self._change(source_id, change) is not None

    async def report_unreachable(
        self, source_id: str, generation: str, *, reason: str, reporter: str = ""
    ) -> bool:
        now = self._clock()
        ejected = False

        def transition(record: SourceRecord) -> SourceRecord:
            nonlocal ejected
            record, ejected = apply_unreachable(record, now, reason, self._ejection)
            return record

        await self._change(source_id, _for_generation(generation, transition))
        return ejected

    async def drain(self, source_id: str, generation: str) -> SourceRecord | None:
        return await self._change(source_id, _for_generation(generation, apply_drain))

    async def lease_reader(self, source_id: str, generation: str, reader: str, seconds: float | None) -> bool:
        now = self._clock()
        admitted = True

        def transition(record: SourceRecord) -> SourceRecord:
            nonlocal admitted
            # the source's own bound on a lease, enforced here where it is written
            expires = None if seconds is None else record.lease_until(now, seconds)
            # a new reader at the cap is refused (a renewal or a give-back never is): checked and
            # written in one atomic change, so racing targets cannot all squeeze in
            live = {r for r, e in record.readers.items() if e > now}
            if expires is not None and reader not in live and record.at_capacity(now):
                admitted = False
                return record
            return apply_reader(record, reader, expires, now)

        await self._change(source_id, _for_generation(generation, transition))
        return admitted

    async def release_readers(self, reader: str, leases: Sequence[tuple[str, str]]) -> None:
        now = self._clock()
        changes: dict[str, Change] = {}
        for source_id, generation in leases:
            changes[source_id] = _for_generation(generation, lambda r: apply_reader(r, reader, None, now))
        if changes:
            await self._change_each(changes)
