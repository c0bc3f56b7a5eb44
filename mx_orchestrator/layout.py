"""Memory layouts, pure: how tensors are placed in regions, and how two layouts compare.

Three layouts, named as on the command line:

``arena``
    one contiguous buffer, one region, tensors packed in manifest order;
``tensor``
    each tensor its own allocation and its own region (what GPU memory needs:
    a CUDA IPC handle covers one allocation);
``chunked:SIZE``
    tensors packed in order into regions of at most SIZE bytes (a tensor larger
    than SIZE gets a region of its own).

Offsets are aligned to :data:`ALIGNMENT` so every tensor can be viewed with its
own dtype. Memory that somebody else allocated (an engine's parameters) is
described as it lies by :func:`regions_from_addresses`: there the regions are
whatever runs of adjacent tensors the allocator happened to produce, so two
processes rarely agree (the situation ModelExpress PR #246 was about).
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .errors import ConfigError
from .models import DIGEST_ALGORITHM, DTYPE_SIZES, Manifest, ModelIdentity, Region, TensorSpec

__all__ = [
    "ALIGNMENT",
    "LayoutSpec",
    "Descriptors",
    "describe_layout_difference",
    "plan_region_reads",
    "plan_tensor_reads",
    "parse_layout",
    "parse_size",
    "plan_layout",
    "regions_from_addresses",
]

ALIGNMENT = 64

_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4}


def parse_size(text: str) -> int:
    """``8MiB`` -> 8388608, ``500M`` -> 500000000, ``4096`` -> 4096."""
    match = _SIZE.match(text)
    if not match:
        raise ConfigError(f"cannot read a size from {text!r} (try 8MiB, 512KiB, 1GB)")
    number, unit = int(match.group(1)), (match.group(2) or "").upper()
    if "I" in unit:
        factor = int(1024 ** "KMGT".index(unit[0])) * 1024
    else:
        factor = _UNITS[unit.rstrip("B") if unit != "B" else "B"]
    return number * factor


@dataclass(frozen=True, slots=True)
class LayoutSpec:
    kind: str
    chunk_bytes: int = 0

    def __str__(self) -> str:
        return f"chunked:{self.chunk_bytes}" if self.kind == "chunked" else self.kind


def parse_layout(text: str) -> LayoutSpec:
    kind, _, arg = text.partition(":")
    if kind in ("arena", "tensor") and not arg:
        return LayoutSpec(kind)
    if kind == "chunked" and arg:
        size = parse_size(arg)
        if size < ALIGNMENT:
            raise ConfigError(f"chunk size must be at least {ALIGNMENT} bytes, got {arg!r}")
        return LayoutSpec("chunked", size)
    raise ConfigError(f"unknown layout {text!r}: expected arena, tensor or chunked:SIZE")


def _align(value: int) -> int:
    return (value + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


TensorShape = tuple[str, str, tuple[int, ...]]


def plan_layout(
    identity: ModelIdentity,
    tensors: Iterable[TensorShape | TensorSpec],
    layout: LayoutSpec,
    checksum_algorithm: str = "xxh3_64",
    digest_algorithm: str = DIGEST_ALGORITHM,
) -> Manifest:
    """Place ``(name, dtype, shape)`` tensors in regions as ``layout`` says (pure: no memory exists yet).

    Tensor specs keep their checksums and digests, of the algorithms named.
    """
    items: list[tuple[str, str, tuple[int, ...], str | None, str | None]] = []
    for t in tensors:
        if isinstance(t, TensorSpec):
            items.append((t.name, t.dtype, t.shape, t.checksum, t.digest))
        else:
            items.append((t[0], t[1], tuple(t[2]), None, None))
    if layout.kind == "tensor":
        return Manifest(
            identity,
            tuple(TensorSpec(n, d, s, i, 0, c, g) for i, (n, d, s, c, g) in enumerate(items)),
            tuple(Region(_nbytes(d, s)) for _, d, s, _, _ in items) or (Region(0),),
            checksum_algorithm,
            digest_algorithm,
        )
    limit = layout.chunk_bytes if layout.kind == "chunked" else None
    specs: list[TensorSpec] = []
    regions: list[int] = []
    cursor = 0
    for name, dtype, shape, checksum, digest in items:
        size = _nbytes(dtype, shape)
        start = _align(cursor)
        if not regions or (limit is not None and cursor > 0 and start + size > limit):
            regions.append(0)
            start = 0
        specs.append(TensorSpec(name, dtype, shape, len(regions) - 1, start, checksum, digest))
        cursor = start + size
        regions[-1] = cursor
    if not regions:
        regions.append(0)
    return Manifest(
        identity, tuple(specs), tuple(Region(n) for n in regions), checksum_algorithm, digest_algorithm
    )


def _nbytes(dtype: str, shape: Sequence[int]) -> int:
    size = DTYPE_SIZES[dtype]
    for d in shape:
        size *= d
    return size


def regions_from_addresses(
    identity: ModelIdentity,
    tensors: Sequence[tuple[str, str, tuple[int, ...], int, str | None]],
    *,
    merge_adjacent: bool = True,
) -> tuple[Manifest, list[int]]:
    """Build a manifest from ``(name, dtype, shape, address, checksum)`` of separate allocations.

    With ``merge_adjacent``, tensors whose bytes are exactly adjacent in memory
    share a region: right for host memory, where any address range can be
    registered and read. GPU memory must not merge: a CUDA IPC handle covers one
    allocation, and two allocations can sit back to back by chance. Returns the
    manifest and each region's base address (the caller registers those).
    """
    ordered = sorted(tensors, key=lambda t: t[3])
    specs: list[TensorSpec] = []
    bases: list[int] = []
    sizes: list[int] = []
    for name, dtype, shape, address, checksum in ordered:
        size = _nbytes(dtype, shape)
        if merge_adjacent and bases and address == bases[-1] + sizes[-1]:
            offset = sizes[-1]
            sizes[-1] += size
        else:
            bases.append(address)
            sizes.append(size)
            offset = 0
        specs.append(TensorSpec(name, dtype, shape, len(bases) - 1, offset, checksum))
    by_name = {s.name: s for s in specs}
    in_order = tuple(by_name[t[0]] for t in tensors)
    return Manifest(identity, in_order, tuple(Region(n) for n in sizes)), bases


def describe_layout_difference(source: Manifest, target: Manifest, *, limit: int = 3) -> str:
    """A readable account of why two layouts differ, e.g. for a LayoutMismatch's detail."""
    src, dst = [r.nbytes for r in source.regions], [r.nbytes for r in target.regions]
    parts = [f"source has {len(src)} regions, target has {len(dst)}"]
    diffs = [
        f"region {i}: source {a} bytes, target {b} bytes"
        for i, (a, b) in enumerate(zip(src, dst, strict=False))
        if a != b
    ]
    if diffs:
        parts.append(
            "; ".join(diffs[:limit]) + (f" (+{len(diffs) - limit} more)" if len(diffs) > limit else "")
        )
    elif len(src) == len(dst):
        placed = {t.name: (t.region, t.offset) for t in target.tensors}
        moved = [s.name for s in source.tensors if placed.get(s.name) != (s.region, s.offset)]
        if moved:
            parts.append(f"same region sizes but tensors placed differently, e.g. {moved[:limit]}")
    return "; ".join(parts)


Descriptors = list[tuple[int, int]]  # (address, nbytes)


def _check_local(local: Descriptors, spans: Sequence[tuple[int, int]]) -> None:
    # Defence in depth: plans are built from the target's own manifest, so this
    # never fires unless the planner itself is wrong.
    ordered = sorted(spans)
    bases = [base for base, _ in ordered]
    for address, nbytes in local:
        i = bisect.bisect_right(bases, address) - 1
        if i < 0 or address + nbytes > ordered[i][0] + ordered[i][1]:
            raise AssertionError(f"descriptor {address:#x}+{nbytes} outside the target's buffers")


def plan_region_reads(
    source: Manifest,
    remote_spans: Sequence[tuple[int, int]],
    target: Manifest,
    local_spans: Sequence[tuple[int, int]],
) -> tuple[Descriptors, Descriptors] | str:
    """One descriptor per region when both layouts are identical; else a reason they are not.

    The comparison uses the layout fingerprints, then each region's size, so
    a mismatch is known before anything is posted.
    """
    if source.layout_fingerprint != target.layout_fingerprint:
        return describe_layout_difference(source, target)
    local: Descriptors = []
    remote: Descriptors = []
    for i, region in enumerate(target.regions):
        if remote_spans[i][1] != region.nbytes or local_spans[i][1] != region.nbytes:
            return f"region {i}: advertised size differs from the manifest"
        if region.nbytes:
            local.append((local_spans[i][0], region.nbytes))
            remote.append((remote_spans[i][0], region.nbytes))
    _check_local(local, local_spans)
    return local, remote


def plan_tensor_reads(
    source: Manifest,
    remote_spans: Sequence[tuple[int, int]],
    target: Manifest,
    local_spans: Sequence[tuple[int, int]],
) -> tuple[Descriptors, Descriptors] | str:
    """One descriptor per tensor, paired by name, whatever the two layouts are.

    Every target tensor must exist in the source with the same dtype, shape and
    size; a difference returns the reason. Source tensors the target does not
    have are not read (which tensors a target takes is its own decision, made
    in ``Target.plan_for``: a module filled in place takes what it has). Runs
    of tensors adjacent on *both* sides are merged into one descriptor.
    """
    remote_by_name = source.by_name()
    # (local region, remote region, local address, remote address, nbytes)
    pairs: list[tuple[int, int, int, int, int]] = []
    for t in sorted(target.tensors, key=lambda t: (t.region, t.offset)):
        s = remote_by_name.get(t.name)
        if s is None:
            return f"source lacks tensor {t.name!r}"
        if (s.dtype, s.shape) != (t.dtype, t.shape) or s.nbytes != t.nbytes:
            return f"tensor {t.name!r}: source {s.dtype}{list(s.shape)}, target {t.dtype}{list(t.shape)}"
        if t.nbytes == 0:
            continue
        local_addr = local_spans[t.region][0] + t.offset
        remote_addr = remote_spans[s.region][0] + s.offset
        pairs.append((t.region, s.region, local_addr, remote_addr, t.nbytes))
    local: Descriptors = []
    remote: Descriptors = []
    previous: tuple[int, int] | None = None
    for local_region, remote_region, local_addr, remote_addr, nbytes in pairs:
        # merge only inside one region on each side: a descriptor must never
        # straddle two registrations (or two GPU allocations)
        if (
            previous == (local_region, remote_region)
            and local[-1][0] + local[-1][1] == local_addr
            and remote[-1][0] + remote[-1][1] == remote_addr
        ):
            local[-1] = (local[-1][0], local[-1][1] + nbytes)
            remote[-1] = (remote[-1][0], remote[-1][1] + nbytes)
        else:
            local.append((local_addr, nbytes))
            remote.append((remote_addr, nbytes))
        previous = (local_region, remote_region)
    _check_local(local, local_spans)
    return local, remote
