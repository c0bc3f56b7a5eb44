"""Target buffers: where loaded bytes land, on CPU ("DRAM") or a CUDA device ("VRAM").

A target is either *preallocated* (an engine hands over its own parameter
tensors, which are filled in place) or *allocated* by the orchestrator from the
first usable source manifest, in a chosen layout. Either way it exposes its own
manifest (names, dtypes, shapes, regions, offsets) and the base address of each
region; descriptor planning reads only those, so no transfer can be aimed
outside memory the target owns, whatever a source claims.

Allocated buffers are pre-faulted (written once) so that the first transfer
does not pay for page faults inside the timed copy.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import xxhash

from .errors import ConfigError
from .layout import LayoutSpec, parse_layout, plan_layout, regions_from_addresses
from .models import Manifest, ModelIdentity

if TYPE_CHECKING:
    import torch

__all__ = [
    "SAFETENSORS_DTYPES",
    "Target",
    "TargetMismatch",
    "checksum_tensor",
    "dtype_name",
    "torch_dtype",
]

#: safetensors dtype name -> torch dtype attribute name
SAFETENSORS_DTYPES: Mapping[str, str] = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I16": "int16",
    "U16": "uint16",
    "F16": "float16",
    "BF16": "bfloat16",
    "I32": "int32",
    "U32": "uint32",
    "F32": "float32",
    "I64": "int64",
    "U64": "uint64",
    "F64": "float64",
}


def torch_dtype(name: str) -> torch.dtype:
    import torch

    return getattr(torch, SAFETENSORS_DTYPES[name])  # type: ignore[no-any-return]


def dtype_name(dtype: torch.dtype) -> str:
    wanted = str(dtype).removeprefix("torch.")
    for name, attr in SAFETENSORS_DTYPES.items():
        if attr == wanted:
            return name
    raise ConfigError(f"unsupported tensor dtype {dtype}")


def checksum_tensor(tensor: torch.Tensor) -> str:
    """xxh3-64 of a tensor's bytes (copied to the host first if it lives on a GPU)."""
    import torch

    flat = tensor.detach().reshape(-1).view(torch.uint8)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    return xxhash.xxh3_64_hexdigest(flat.numpy().data)


class TargetMismatch(Exception):
    """The source's manifest cannot land in this target (other tensors, dtypes or shapes)."""


class Target:
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
        self.manifest: Manifest | None = None
        # (base address, size) of each region; the memory is owned by _owners or,
        # when preallocated, by the engine's tensors in _tensors
        self._spans: list[tuple[int, int]] = []
        self._owners: list[torch.Tensor] = []
        self._tensors: dict[str, torch.Tensor] = {}
        self._preallocated = False

    @classmethod
    def from_tensors(
        cls, identity: ModelIdentity, tensors: Mapping[str, torch.Tensor], *, verify: bool = True
    ) -> Target:
        """Fill an engine's own tensors in place; each tensor must be contiguous, all on one device."""
        if not tensors:
            raise ConfigError("a preallocated target needs at least one tensor")
        devices = {t.device for t in tensors.values()}
        if len(devices) != 1:
            raise ConfigError(f"preallocated tensors span several devices: {sorted(map(str, devices))}")
        for name, t in tensors.items():
            if not t.is_contiguous():
                raise ConfigError(f"preallocated tensor {name!r} is not contiguous")
        target = cls(LayoutSpec("tensor"), str(next(iter(devices))), verify=verify, prefault=False)
        rows = [
            (name, dtype_name(t.dtype), tuple(t.shape), t.data_ptr(), None) for name, t in tensors.items()
        ]
        device = next(iter(devices))
        manifest, bases = regions_from_addresses(identity, rows, merge_adjacent=device.type == "cpu")
        target.manifest = manifest
        target._tensors = dict(tensors)
        target._spans = [(b, r.nbytes) for b, r in zip(bases, manifest.regions, strict=True)]
        target._preallocated = True
        return target

    # -- facts ----------------------------------------------------------------

    @property
    def mem_type(self) -> str:
        return "DRAM" if self.device == "cpu" else "VRAM"

    @property
    def device_id(self) -> int:
        if self.device == "cpu":
            return 0
        _, _, index = self.device.partition(":")
        return int(index or 0)

    @property
    def prepared(self) -> bool:
        return self.manifest is not None

    def region_spans(self) -> list[tuple[int, int]]:
        """``(base address, nbytes)`` of every region, in manifest order."""
        return list(self._spans)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Typed views of every loaded tensor, by name."""
        return dict(self._tensors)

    @property
    def nbytes(self) -> int:
        return self.manifest.total_bytes if self.manifest else 0

    # -- preparation ----------------------------------------------------------

    def preview(self, source: Manifest) -> Manifest | None:
        """The manifest this target will have for ``source``, without allocating anything.

        ``None`` when only allocation can tell (the ``tensor`` layout). Raises
        :class:`TargetMismatch` when the tensor sets differ.
        """
        if self.manifest is not None:
            if self.manifest.manifest_fingerprint != source.manifest_fingerprint:
                raise TargetMismatch(_describe_manifest_difference(source, self.manifest))
            return self.manifest
        if self.layout.kind == "tensor":
            return None
        return plan_layout(source.identity, source.tensors, self.layout)

    def prepare(self, source: Manifest) -> Manifest:
        """Make the target ready for ``source``'s tensors; allocate on first use.

        Raises :class:`TargetMismatch` when the tensor sets differ, ``MemoryError``
        (or torch's OOM error) when allocation fails.
        """
        planned = self.preview(source)  # checks the tensor sets of a prepared target
        if self.manifest is None:
            self._allocate(source, planned)
        assert self.manifest is not None
        return self.manifest

    def _allocate(self, source: Manifest, planned: Manifest | None) -> None:
        """Allocate for ``source``; ``planned`` is the arena/chunked placement :meth:`preview` made."""
        import torch

        device = torch.device(self.device)
        if self.layout.kind == "tensor":
            tensors = {
                s.name: _empty(tuple(s.shape), torch_dtype(s.dtype), device, self.prefault)
                for s in source.tensors
            }
            rows = [
                (s.name, s.dtype, s.shape, tensors[s.name].data_ptr(), s.checksum) for s in source.tensors
            ]
            manifest, bases = regions_from_addresses(
                source.identity, rows, merge_adjacent=device.type == "cpu"
            )
            self._spans = [(b, r.nbytes) for b, r in zip(bases, manifest.regions, strict=True)]
            self._owners = list(tensors.values())
            self._tensors = tensors
        else:
            assert planned is not None
            manifest = planned
            self._owners = [_empty((r.nbytes,), torch.uint8, device, self.prefault) for r in manifest.regions]
            self._spans = [
                (int(o.data_ptr()), r.nbytes) for o, r in zip(self._owners, manifest.regions, strict=True)
            ]
            self._tensors = {
                s.name: self._owners[s.region][s.offset : s.end].view(torch_dtype(s.dtype)).view(s.shape)
                for s in manifest.tensors
            }
        self.manifest = manifest

    # -- verification ---------------------------------------------------------

    def verify_against(self, source: Manifest) -> list[str]:
        """Names of tensors whose checksum differs from ``source``'s (empty: all good)."""
        bad = []
        for spec in source.tensors:
            if spec.checksum is None:
                continue
            if checksum_tensor(self._tensors[spec.name]) != spec.checksum:
                bad.append(spec.name)
        return bad


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, prefault: bool) -> torch.Tensor:
    import torch

    tensor = torch.empty(shape, dtype=dtype, device=device)
    if prefault and tensor.numel():
        tensor.view(-1).view(torch.uint8).fill_(0)  # touch every page now, not inside a timed copy
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the fill must be done before another engine writes
    return tensor


def _describe_manifest_difference(source: Manifest, target: Manifest) -> str:
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
