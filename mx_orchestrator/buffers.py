"""The one allocator of weight memory, for targets and sources alike.

A :class:`Buffers` value is weights in memory: the manifest (names, dtypes,
shapes, regions, offsets), each region's ``(base address, size)``, the device,
the allocations that own the memory and a typed view of every tensor. It is
built in exactly two ways:

* :func:`allocate`: fresh memory for a planned manifest, one allocation per
  region (so a ``tensor`` layout is one allocation per tensor, as GPU memory
  needs: a CUDA IPC handle covers one allocation), hugepage-backed on the host,
  optionally pre-faulted so the first transfer does not pay for page faults
  inside the timed copy;
* :func:`wrap`: memory somebody else owns (an engine's parameters), described
  as it lies; adjacent host tensors share a region.

Descriptor planning reads only the manifest and the spans, so no transfer can be
aimed outside memory these buffers own, whatever a source claims.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol

from .errors import ConfigError
from .integrity import checksums, digests, serving_algorithms
from .layout import regions_from_addresses
from .models import Manifest, ModelIdentity, dtype_name, torch_dtype

if TYPE_CHECKING:
    import torch

__all__ = [
    "Buffers",
    "HoldsBuffers",
    "OnDevice",
    "allocate",
    "device_index",
    "wrap",
]


def device_index(device: str) -> int:
    """``cpu`` -> 0, ``cuda`` -> 0, ``cuda:3`` -> 3 (the id NIXL descriptors carry)."""
    return 0 if device == "cpu" else int(device.partition(":")[2] or 0)


class OnDevice:
    """What a transport needs to know of memory on ``device`` (``cpu``, ``cuda:N``)."""

    device: str

    @property
    def mem_type(self) -> str:
        return "DRAM" if self.device == "cpu" else "VRAM"

    @property
    def device_id(self) -> int:
        return device_index(self.device)


@dataclass
class Buffers(OnDevice):
    """Weights in memory: manifest, region spans, device, owning allocations and tensor views."""

    manifest: Manifest
    spans: list[tuple[int, int]]
    device: str
    owners: list[torch.Tensor] = field(repr=False)
    tensors: dict[str, torch.Tensor] = field(repr=False)

    def region_view(self, index: int) -> torch.Tensor:
        """Region ``index`` as one uint8 tensor over the memory (no copy), whoever allocated it."""
        import torch

        base, nbytes = self.spans[index]
        if self.owners:
            return self.owners[index]
        if nbytes == 0:
            return torch.empty(0, dtype=torch.uint8, device=self.device)
        spec = next(s for s in self.manifest.tensors if s.region == index)
        storage = self.tensors[spec.name].untyped_storage()
        view = torch.empty(0, dtype=torch.uint8, device=self.device)
        return view.set_(storage, base - storage.data_ptr(), (nbytes,), (1,))

    def with_checksums(self) -> Buffers:
        """The same memory, with checksums and SHA-256 digests for every tensor, computed here, once.

        Kept as they are when every tensor already has them (a target republishing
        what it loaded and verified: it serves the same pinned content); else
        every tensor gets the algorithms of
        :func:`~mx_orchestrator.integrity.serving_algorithms` for this device and
        its digest.
        """
        manifest = self.manifest
        if not all(s.checksum is not None for s in manifest.tensors):
            algorithms = serving_algorithms(self.device)
            values = checksums(self.tensors, algorithms)
            specs = tuple(replace(s, checksum=values[s.name]) for s in manifest.tensors)
            manifest = Manifest(manifest.identity, specs, manifest.regions, "+".join(algorithms))
        if not all(s.digest is not None for s in manifest.tensors):
            sha = digests(self.tensors)
            specs = tuple(replace(s, digest=sha[s.name]) for s in manifest.tensors)
            manifest = Manifest(manifest.identity, specs, manifest.regions, manifest.checksum_algorithm)
        return self if manifest is self.manifest else replace(self, manifest=manifest)

    @classmethod
    def from_target(cls, target: HoldsBuffers) -> Buffers:
        """Offer what a target loaded (fan-out): the same memory, no copy, checksums filled in."""
        if target.buffers is None:
            raise ConfigError("the target holds no weights yet")
        return target.buffers.with_checksums()


class HoldsBuffers(Protocol):
    @property
    def buffers(self) -> Buffers | None: ...


def allocate(manifest: Manifest, device: str, *, prefault: bool = True) -> Buffers:
    """Fresh memory for ``manifest``: one allocation per region, a typed view per tensor.

    Raises ``MemoryError`` (or torch's out-of-memory error, a ``RuntimeError``)
    when the memory is not there.
    """
    import torch

    dev = torch.device(device)
    owners = [_empty_bytes(r.nbytes, dev) for r in manifest.regions]
    if prefault:
        for owner in owners:
            owner.fill_(0)  # touch every page now, not inside a timed copy
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)  # the fill must be done before another engine writes
    tensors = {
        s.name: owners[s.region][s.offset : s.end].view(torch_dtype(s.dtype)).view(s.shape)
        for s in manifest.tensors
    }
    spans = [(int(o.data_ptr()), r.nbytes) for o, r in zip(owners, manifest.regions, strict=True)]
    return Buffers(manifest, spans, str(dev), owners, tensors)


_HUGEPAGE = 2 << 20


def _empty_bytes(nbytes: int, device: torch.device) -> torch.Tensor:
    """``nbytes`` of uninitialised memory on ``device``; host memory of 2 MiB or more is hugepage-backed.

    Anonymous memory advised ``MADV_HUGEPAGE`` (and 2 MiB aligned, which THP
    needs) is read by another process at about memcpy speed and first-touched
    several times faster than 4 KiB pages (../shared/NOTES.md). Where THP is off
    or madvise is refused, the same memory simply has small pages.
    """
    import torch

    if device.type != "cpu" or nbytes < _HUGEPAGE:
        return torch.empty(nbytes, dtype=torch.uint8, device=device)
    size = nbytes + _HUGEPAGE
    memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    view = ctypes.c_char.from_buffer(memory)
    base = ctypes.addressof(view)
    del view  # the export must end before the memory can ever be unmapped
    offset = (-base) % _HUGEPAGE
    with contextlib.suppress(OSError, AttributeError):  # THP off, or a platform without MADV_HUGEPAGE
        memory.madvise(mmap.MADV_HUGEPAGE, offset, size - offset)
    # the tensor holds the mapping alive; it is unmapped when the last view goes
    return torch.frombuffer(memory, dtype=torch.uint8, count=nbytes, offset=offset)


def wrap(identity: ModelIdentity, tensors: Mapping[str, torch.Tensor]) -> Buffers:
    """Describe memory an engine owns; every tensor contiguous, all on one device."""
    if not tensors:
        raise ConfigError("no tensors to describe")
    devices = {t.device for t in tensors.values()}
    if len(devices) != 1:
        raise ConfigError(f"tensors span several devices: {sorted(map(str, devices))}")
    for name, t in tensors.items():
        if not t.is_contiguous():
            raise ConfigError(f"tensor {name!r} is not contiguous")
    (device,) = devices
    rows = [(name, dtype_name(t.dtype), tuple(t.shape), t.data_ptr(), None) for name, t in tensors.items()]
    # host memory can be read across adjacent allocations; GPU memory cannot
    manifest, bases = regions_from_addresses(identity, rows, merge_adjacent=device.type == "cpu")
    spans = [(b, r.nbytes) for b, r in zip(bases, manifest.regions, strict=True)]
    return Buffers(manifest, spans, str(device), [], dict(tensors))
