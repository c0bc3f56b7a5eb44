"""In-process registry: a dict guarded by the event loop. For tests and single-process embedding."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from ..models import Manifest, SourceRecord, SourceState
from .base import Change, EjectionPolicy, RecordTransitions, apply_publish, as_listed, is_listed

__all__ = ["MemoryRegistry"]


class MemoryRegistry(RecordTransitions):
    def __init__(
        self,
        *,
        ejection: EjectionPolicy | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._records: dict[str, SourceRecord] = {}
        #: stored manifests by key: one copy however many sources serve it
        self._blobs: dict[str, bytes] = {}
        self._ejection = ejection or EjectionPolicy()
        self._clock = clock

    async def publish(self, record: SourceRecord, manifest: Manifest | None = None) -> None:
        previous = self._records.get(record.source_id)
        stored = manifest.stored if manifest is not None else None
        if stored is not None:
            self._blobs.setdefault(stored.key, stored.blob)
        self._records[record.source_id] = apply_publish(previous, record, self._clock(), stored)
        if previous is not None:
            self._collect(previous.manifest_key)

    def _collect(self, key: str) -> None:
        """Drop a stored manifest no record names any more."""
        if key and not any(r.manifest_key == key for r in self._records.values()):
            self._blobs.pop(key, None)

    async def manifests_stored(self) -> int:
        """How many manifests are held (one per distinct manifest, not per source)."""
        return len(self._blobs)

    async def _change_each(self, changes: Mapping[str, Change]) -> dict[str, SourceRecord | None]:
        written: dict[str, SourceRecord | None] = {}
        for source_id, change in changes.items():
            written[source_id] = updated = change(self._records.get(source_id))
            if updated is not None:
                self._records[source_id] = updated
        return written

    async def list(
        self, identity_key: str | None = None, state: SourceState | None = SourceState.READY
    ) -> list[SourceRecord]:
        now = self._clock()
        return [
            as_listed(r, now)
            for r in self._records.values()
            if (identity_key is None or r.identity_key == identity_key) and is_listed(r, now, state)
        ]

    async def get(self, source_id: str) -> SourceRecord | None:
        return self._records.get(source_id)

    async def get_manifest_blob(self, key: str) -> bytes | None:
        return self._blobs.get(key)

    async def remove(self, source_id: str, generation: str | None = None) -> bool:
        record = self._records.get(source_id)
        if record is None or (generation is not None and record.generation != generation):
            return False
        del self._records[source_id]
        self._collect(record.manifest_key)
        return True

    async def aclose(self) -> None:
        return None
