"""Partial sources (issue 24): which tensors a loading target holds, kept by it and read by its readers.

The protocol. A target that republishes while it loads publishes its record
*once*, when its memory exists, with ``partial: true``; its advert names a
*holdings* array in its own registered host memory (``nixl_holdings``:
``[address, bytes]``), one byte per tensor of the manifest it publishes,
0 until that tensor has landed **and been verified** (against the pin, or the
content's checksums), then 1 (2 while the source is reading it: a hint for
readers' choices, never a claim). A reader READs that array one-sided, like any
other bytes of the source, before it picks a part from the source, and
again after the part's bytes moved (a source that took a tensor back, because
the content it verified against proved false, fails the second look: the part
is not kept). Nothing about holdings is written to the registry: a thousand
targets x hundreds of parts would be a write storm; when the whole model is in,
the source publishes once more, whole (``partial: false``), and readers stop
asking. A reader never reads a tensor the source does not claim to hold; what
it claims is checked on landing like everything else a source says.

:class:`Holdings` is the serving side's state (what the load marks as parts
land); :func:`parse_holdings` and :func:`held_tensors` are the reader's pure
half: validate the advert's claim, and map the array onto the reader's own
tensors (by name: the two layouts may differ). No I/O here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import anyio

from .models import Manifest

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "HELD",
    "HOLDINGS_FIELD",
    "READING",
    "Held",
    "Holdings",
    "encode_holdings",
    "held_tensors",
    "parse_holdings",
    "served_manifest",
]

#: the advert field naming a partial source's holdings array
HOLDINGS_FIELD = "nixl_holdings"
#: a holdings byte: the tensor landed and was verified (readers may read it) ...
HELD = 1
#: ... or the source is reading it now (not readable; a hint for readers' choices)
READING = 2


class Holdings:
    """What a loading target holds, one byte per tensor of the manifest it serves (see the module docstring).

    The load (:mod:`~mx_orchestrator.partreads`) calls :meth:`begin` once the
    target's memory exists, then :meth:`mark` as parts land verified and
    :meth:`unmark` if they are taken back; whoever serves it waits on
    :attr:`ready` and :attr:`complete`.
    """

    def __init__(self, served_as: str | None = None) -> None:
        #: the source id this target is served as: its own load never reads from it
        self.served_as = served_as
        self.manifest: Manifest | None = None
        self.hops = 0
        self.array: np.ndarray[Any, Any] | None = None
        #: set once :meth:`begin` ran (the memory and the manifest to serve exist)
        self.ready = anyio.Event()
        #: set once every tensor is held
        self.complete = anyio.Event()
        self._index: dict[str, int] = {}
        self._held = 0
        #: bumped on every change (a reader that cached an answer knows it is old)
        self.version = 0
        #: the content it verified against proved false: it serves nothing more while loading
        self.withdrawn = False

    def begin(self, manifest: Manifest, hops: int) -> None:
        """The target's memory exists, laid out as ``manifest`` (with the content's checksums);
        ``hops``: one more than the source whose content it adopted."""
        import numpy as np

        if self.manifest is not None:
            return
        self.manifest = manifest
        self.hops = hops
        self._index = {spec.name: i for i, spec in enumerate(manifest.tensors)}
        # at least one byte: a registration of nothing is refused
        self.array = np.zeros(max(1, len(manifest.tensors)), dtype=np.uint8)
        self.ready.set()
        if not manifest.tensors:
            self.complete.set()

    def mark(self, names: Iterable[str]) -> None:
        """These tensors landed and were verified: readers may read them from now on."""
        array = self.array
        if array is None or self.withdrawn:
            return
        for name in names:
            i = self._index.get(name)
            if i is not None and array[i] != HELD:
                array[i] = HELD
                self._held += 1
                self.version += 1
        if self.manifest is not None and self._held == len(self.manifest.tensors):
            self.complete.set()

    def reading(self, names: Iterable[str], now: bool) -> None:
        """These tensors are being read (``now``), or no longer (a failed or lost read): a hint to
        readers, never a claim (only :data:`HELD` is)."""
        array = self.array
        if array is None or self.withdrawn:
            return
        for name in names:
            i = self._index.get(name)
            if i is not None and array[i] != HELD:
                array[i] = READING if now else 0
        self.version += 1

    def withdraw(self) -> None:
        """Everything marked may have been verified against a liar's content: readers stop now, and
        nothing is marked again while this load lasts (the whole target republishes when loaded)."""
        if self.array is not None and not self.complete.is_set():
            self.array[:] = 0
            self._held = 0
            self.version += 1
        self.withdrawn = True

    def mark_all(self) -> None:
        if self.manifest is not None:
            self.mark(self._index)

    def unmark(self, names: Iterable[str]) -> None:
        """These tensors are not trusted any more (their content proved false): readers stop."""
        array = self.array
        if array is None or self.complete.is_set():
            return
        for name in names:
            i = self._index.get(name)
            if i is not None and array[i] == HELD:
                array[i] = 0
                self._held -= 1
                self.version += 1

    @property
    def held(self) -> int:
        return self._held

    @property
    def block(self) -> tuple[int, int]:
        """``(address, bytes)`` of the array, to register and advertise."""
        assert self.array is not None, "begin() first"
        return int(self.array.ctypes.data), int(self.array.nbytes)


def served_manifest(layout: Manifest, content: Manifest) -> Manifest:
    """What a partial source publishes: its own layout, with the checksums and digests of the
    content it verifies against (it cannot compute them over bytes that have not landed)."""
    from dataclasses import replace

    values = content.by_name()
    specs = tuple(
        replace(s, checksum=values[s.name].checksum, digest=values[s.name].digest) if s.name in values else s
        for s in layout.tensors
    )
    return Manifest(
        layout.identity,
        specs,
        layout.regions,
        content.checksum_algorithm,
        digest_algorithm=content.digest_algorithm,
    )


def encode_holdings(block: tuple[int, int]) -> Mapping[str, str]:
    """The advert field of a holdings array at ``(address, bytes)``."""
    return {HOLDINGS_FIELD: json.dumps(list(block))}


def parse_holdings(transport: Any, manifest: Manifest) -> tuple[int, int] | str | None:
    """A record's holdings array ``(address, bytes)``, ``None`` when it advertises none (a whole
    source), or what is wrong with it (one byte per tensor, at least one byte)."""
    raw = transport.get(HOLDINGS_FIELD) if isinstance(transport, Mapping) else None
    if raw is None:
        return None
    try:
        row = json.loads(raw)
    except (TypeError, ValueError):
        return "the holdings advert is not JSON"
    if (
        not isinstance(row, list)
        or len(row) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in row)
    ):
        return "the holdings advert is malformed"
    address, nbytes = row
    if nbytes != max(1, len(manifest.tensors)) or address + nbytes >= 1 << 64:
        return f"the holdings advert covers {nbytes} bytes for {len(manifest.tensors)} tensors"
    return address, nbytes


class Held(frozenset[int]):
    """The reader's tensors a partial source holds, and in :attr:`coming` those it is reading now
    (held soon: a reader choosing what to take from a whole source leaves them for later)."""

    coming: frozenset[int] = frozenset()


def held_tensors(raw: bytes | memoryview, source: Manifest, local: Manifest) -> Held:
    """The reader's tensors (indices into ``local``) that a partial source with holdings ``raw``
    (over ``source``'s tensors) holds (byte :data:`HELD`) and is reading (:data:`READING`),
    matched by name; any other byte is neither."""
    states = {spec.name: byte for spec, byte in zip(source.tensors, bytes(raw), strict=False) if byte}
    held = Held(i for i, spec in enumerate(local.tensors) if states.get(spec.name) == HELD)
    held.coming = frozenset(i for i, spec in enumerate(local.tensors) if states.get(spec.name) == READING)
    return held
