"""Targets: where loaded bytes land, on CPU ("DRAM") or a CUDA device ("VRAM").

A target is either *preallocated* (an engine hands over its own parameter
tensors, which are filled in place) or *allocated* by the orchestrator, in a
chosen layout, for the first source manifest an attempt commits to. Either way
its memory is a :class:`~mx_orchestrator.buffers.Buffers` value; descriptor
planning reads only its manifest and spans, so no transfer can be aimed outside
memory the target owns, whatever a source claims.

:meth:`Target.plan_for` says, without allocating, which manifest the target will
have for a source (or why the source cannot land here); the peer attempt's
pure check uses it to decide everything before any I/O.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING

from .buffers import Buffers, OnDevice, allocate, wrap
from .errors import ConfigError
from .integrity import bad_digests, bad_tensors, copy_checked
from .kernels import warm_kernels
from .layout import LayoutSpec, parse_layout, plan_layout
from .models import Manifest, ModelIdentity

if TYPE_CHECKING:
    import torch

__all__ = ["Target", "TargetMismatch", "describe_manifest_difference"]


class TargetMismatch(Exception):
    """The source's manifest cannot land in this target (other tensors, dtypes or shapes)."""


class Target(OnDevice):
    """``verify``: check every landed tensor against the source's checksums (and files against the Hub's)."""

    def __init__(
        self,
        layout: str | LayoutSpec = "arena",
        device: str = "cpu",
        *,
        verify: bool = True,
        prefault: bool = True,
    ) -> None:
        self.layout = parse_layout(layout) if isinstance(layout, str) else layout
        self.device = device
        self.verify = verify
        self.prefault = prefault
        self._buffers: Buffers | None = None
        #: bytes of every allocation this target made, in order (its own accounting)
        self.allocations: list[int] = []
        #: bytes of every READ that completed into this target (a re-read counts again)
        self.bytes_written = 0
        #: id of a source manifest -> it and the manifest this target would have for it
        self._planned_for: dict[int, tuple[Manifest, Manifest]] = {}
        if verify and device != "cpu":
            warm_kernels(device)  # loaded while the load discovers and allocates

    @classmethod
    def from_tensors(
        cls, identity: ModelIdentity, tensors: Mapping[str, torch.Tensor], *, verify: bool = True
    ) -> Target:
        """Fill an engine's own tensors in place; each tensor must be contiguous, all on one device."""
        if not tensors:
            raise ConfigError("a preallocated target needs at least one tensor")
        buffers = wrap(identity, tensors)
        target = cls(LayoutSpec("tensor"), buffers.device, verify=verify, prefault=False)
        target._buffers = buffers
        return target

    # -- facts ----------------------------------------------------------------

    @property
    def buffers(self) -> Buffers | None:
        return self._buffers

    @property
    def manifest(self) -> Manifest | None:
        return self._buffers.manifest if self._buffers is not None else None

    def region_spans(self) -> list[tuple[int, int]]:
        """``(base address, nbytes)`` of every region, in manifest order (empty before allocation)."""
        return list(self._buffers.spans) if self._buffers is not None else []

    def tensors(self) -> dict[str, torch.Tensor]:
        """Typed views of every loaded tensor, by name."""
        return dict(self._buffers.tensors) if self._buffers is not None else {}

    @property
    def nbytes(self) -> int:
        return self._buffers.manifest.total_bytes if self._buffers is not None else 0

    # -- preparation ----------------------------------------------------------

    def plan_for(self, source: Manifest) -> Manifest:
        """The manifest this target has (or will have) for ``source``; allocates nothing.

        Raises :class:`TargetMismatch` when ``source`` holds other tensors than a
        target that already has its memory.
        """
        if self._buffers is not None:
            mine = self._buffers.manifest
            if mine.manifest_fingerprint != source.manifest_fingerprint:
                raise TargetMismatch(describe_manifest_difference(source, mine))
            return mine
        # many records serve one (cached, shared) manifest: its layout here is planned once
        cached = self._planned_for.get(id(source))
        if cached is not None and cached[0] is source:
            return cached[1]
        planned = plan_layout(
            source.identity, source.tensors, self.layout, source.checksum_algorithm, source.digest_algorithm
        )
        if len(self._planned_for) >= 8:
            self._planned_for.clear()
        self._planned_for[id(source)] = (source, planned)
        return planned

    def prepare(self, planned: Manifest) -> Buffers:
        """Make the memory for ``planned`` (from :meth:`plan_for`) exist; allocates on first use.

        Raises ``MemoryError`` (or torch's out-of-memory ``RuntimeError``) when
        allocation fails.
        """
        if self._buffers is None:
            self._buffers = self._allocate(planned)
            self.allocations.append(planned.total_bytes)
        return self._buffers

    def release(self) -> None:
        """Forget memory this target allocated (after a failed attempt: the next source shapes it anew).

        A preallocated target keeps the engine's tensors: they are not ours to drop.
        """
        if self._buffers is not None and self._buffers.owners:
            self._buffers = None

    def _allocate(self, planned: Manifest) -> Buffers:
        return allocate(planned, self.device, prefault=self.prefault)

    # -- verification ---------------------------------------------------------

    def verify_pinned(self, pinned: Manifest, names: Collection[str] | None = None) -> list[str]:
        """Tensors whose SHA-256 differs from the digests of ``pinned`` (whose fingerprint was checked).

        ``names``: only those tensors (a part of a striped load).
        """
        return bad_digests(self.tensors(), pinned, names)

    def verify_against(self, source: Manifest, names: Collection[str] | None = None) -> list[str] | None:
        """Tensors whose checksum differs from ``source``'s (empty: all good; ``None``: cannot tell)."""
        return bad_tensors(self.tensors(), source, names)

    def copy_verified(self, source: Manifest, reads: Mapping[str, torch.Tensor]) -> list[str] | None:
        """Copy ``reads`` (the source's bytes of each named tensor, on this target's GPU) into this
        target's tensors, checksummed as they move; the tensors whose checksum differs from
        ``source``'s. ``None``: not possible here, nothing was copied (:func:`~.integrity.copy_checked`)."""
        return copy_checked(reads, self.tensors(), source)


def describe_manifest_difference(source: Manifest, target: Manifest) -> str:
    src, dst = source.by_name(), target.by_name()
    missing = sorted(set(dst) - set(src))
    extra = sorted(set(src) - set(dst))
    changed = [
        f"{n}: source {src[n].dtype}{list(src[n].shape)} vs target {dst[n].dtype}{list(dst[n].shape)}"
        for n in sorted(set(src) & set(dst))
        if (src[n].dtype, src[n].shape) != (dst[n].dtype, dst[n].shape)
    ]
    parts = []
    if missing:
        parts.append(f"source lacks {len(missing)} tensors, e.g. {missing[:3]}")
    if extra:
        parts.append(f"source has {len(extra)} unexpected tensors, e.g. {extra[:3]}")
    if changed:
        parts.append(f"{len(changed)} tensors differ, e.g. {changed[:2]}")
    return "; ".join(parts) or "manifest fingerprints differ"
