"""Integrity of landed bytes: the per-tensor checksums a source publishes and a target checks.

Two algorithms, named and versioned in the manifest (``Manifest.checksum_algorithm``
lists what each tensor's ``checksum`` carries, ``+``-separated in that order):

``xxh3_64``
    xxHash3 over the bytes, on the host (GPU tensors are copied off first):
    the fastest choice between two CPU processes.
``mxsum1``
    defined over the tensor's bytes read as little-endian int32 words in 4 KiB
    blocks (the tail zero-padded to a block), computed with integer reductions
    on whatever device holds the bytes (CUDA tensors on the GPU, host tensors on
    the CPU), so a CPU source and a GPU target agree to the bit. With ``s_b`` the
    sum of block ``b`` and ``c_j`` the sum of column ``j`` over all blocks (all
    arithmetic mod 2**64), it hashes ``(n bytes, sum (2b+1) s_b, sum (2j+1) c_j,
    sum s_b, sum c_j**2, sum s_b**2)`` with SHA-256. Any single bit flip and any
    swap of two different 4-byte words inside one block or across blocks less
    than 8 TiB apart change it by construction (odd weights, small differences);
    a truncated tail changes the length; a zeroed page changes the sums and the
    squares unless its words already sum to zero in all of them (random data:
    about 2**-64).

Checksums come from the source, computed over its own bytes: they catch faults
in transit and in memory, not a source that serves the wrong weights (that
needs a pinned digest).

Digests (what a content pin commits to) are tree digests
(:mod:`~mx_orchestrator.digests`), computed where the tensors live: by the
shipped kernel on a GPU (:mod:`~mx_orchestrator.kernels`), on every core on
the host. ``mxsum1`` on a GPU runs the shipped kernel too (torch's
reductions where it cannot); nothing on a load's path compiles.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import xxhash

from .digests import TREE_ALGORITHM, tree_digests
from .kernels import device_mxsum_terms, device_tree_digests, flat_bytes
from .models import Manifest, TensorSpec

if TYPE_CHECKING:
    import torch

__all__ = [
    "ALGORITHMS",
    "DEVICE_CHECKSUM",
    "HOST_CHECKSUM",
    "bad_digests",
    "bad_tensors",
    "best_shared",
    "checksum_tensor",
    "checksums",
    "copy_checked",
    "mxsum",
    "mxsum_many",
    "digests",
    "fingerprint_of",
    "pin_of",
    "serving_algorithms",
    "tensor_digest",
    "tensor_digests",
]

HOST_CHECKSUM = "xxh3_64"
DEVICE_CHECKSUM = "mxsum1"
#: Every algorithm this version computes, best first for a target on ``cpu`` / on a GPU.
ALGORITHMS = (HOST_CHECKSUM, DEVICE_CHECKSUM)

_BLOCK = 4096
_WORDS = _BLOCK // 4
_MASK = (1 << 64) - 1
_HOST_CHUNK_ROWS = 256  # 1 MiB of int32 rows: summed twice while it is still in cache
_HOST_THREADS = min(4, os.cpu_count() or 1)


def checksum_tensor(tensor: torch.Tensor) -> str:
    """xxh3-64 of a tensor's bytes (copied to the host first if it lives on a GPU)."""
    return xxhash.xxh3_64_hexdigest(_host_bytes(tensor))


def _host_bytes(tensor: torch.Tensor) -> memoryview:
    """A tensor's bytes in host memory, for the host-only hashes (a GPU tensor is copied off)."""
    flat = flat_bytes(tensor)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    return flat.numpy().data


def _host_terms(tensor: torch.Tensor) -> list[int]:
    """The five sums of :func:`mxsum` for a host tensor: numpy, chunks that stay in cache, two threads.

    Equal to :func:`_device_terms` by construction (the same integer sums, in
    another order; wrapping addition does not care) and pinned by a test.
    """
    import numpy as np

    data = flat_bytes(tensor).numpy()
    n = data.size
    full = n // _BLOCK
    main = data[: full * _BLOCK]
    if main.ctypes.data % 4:
        main = main.copy()
    rows = main.view("<i4").reshape(full, _WORDS)
    has_tail = n > full * _BLOCK or not full
    sums = np.empty(full + has_tail, dtype=np.int64)

    def part(start: int, stop: int) -> np.ndarray[Any, Any]:
        columns = np.zeros(_WORDS, dtype=np.int64)
        for i in range(start, stop, _HOST_CHUNK_ROWS):
            chunk = rows[i : min(stop, i + _HOST_CHUNK_ROWS)]
            np.add.reduce(chunk, axis=1, dtype=np.int64, out=sums[i : i + chunk.shape[0]])
            columns += np.add.reduce(chunk, axis=0, dtype=np.int64)
        return columns

    workers = max(1, min(_HOST_THREADS, full // _HOST_CHUNK_ROWS))
    if workers == 1:
        columns = part(0, full)
    else:
        bounds = [full * k // workers for k in range(workers + 1)]
        with ThreadPoolExecutor(workers, thread_name_prefix="mxo-mxsum") as pool:
            columns = sum(pool.map(part, bounds[:-1], bounds[1:]), np.zeros(_WORDS, dtype=np.int64))
    if has_tail:
        tail = np.zeros(_BLOCK, dtype=np.uint8)
        tail[: n - full * _BLOCK] = data[full * _BLOCK :]
        words = tail.view("<i4").astype(np.int64)
        sums[-1] = words.sum()
        columns = columns + words
    count = sums.size
    with np.errstate(over="ignore"):
        block_weights = np.arange(count, dtype=np.int64) * 2 + 1
        column_weights = np.arange(_WORDS, dtype=np.int64) * 2 + 1
        return [
            int(np.sum(sums * block_weights, dtype=np.int64)),
            int(np.sum(columns * column_weights, dtype=np.int64)),
            int(np.sum(sums, dtype=np.int64)),
            int(np.sum(columns * columns, dtype=np.int64)),
            int(np.sum(sums * sums, dtype=np.int64)),
        ]


def _torch_terms_many(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The five sums of :func:`mxsum` for tensors on one device, with torch's reductions (where the
    shipped kernel cannot run), as a ``(len, 5)`` int64 tensor there. No compile, ever.

    Two reductions per tensor (block sums, column sums) read its bytes; the
    weighting and combining then run once for all tensors together, so a
    checkpoint of hundreds of tensors costs hundreds of kernel launches, not
    thousands (launches, not bandwidth, bound a per-tensor version on a GPU).
    """
    import torch

    device = tensors[0].device
    block_sums: list[torch.Tensor] = []
    columns: list[torch.Tensor] = []
    lengths: list[int] = []
    for tensor in tensors:
        data = flat_bytes(tensor)
        n = data.numel()
        full = n // _BLOCK
        column = torch.zeros(_WORDS, dtype=torch.int64, device=device)
        if full:
            main = data[: full * _BLOCK]
            try:
                words = main.view(torch.int32).view(full, _WORDS)
            except RuntimeError:  # a storage offset that is not a multiple of 4: realign by copying
                words = main.clone().view(torch.int32).view(full, _WORDS)
            block_sums.append(words.sum(dim=1, dtype=torch.int64))
            column = words.sum(dim=0, dtype=torch.int64)
        has_tail = n > full * _BLOCK or not full
        if has_tail:
            tail = torch.zeros(_BLOCK, dtype=torch.uint8, device=device)
            tail[: n - full * _BLOCK] = data[full * _BLOCK :]
            tail_words = tail.view(torch.int32).to(torch.int64)
            block_sums.append(tail_words.sum().reshape(1))
            column = column + tail_words
        columns.append(column)
        lengths.append(full + has_tail)
    sums = torch.cat(block_sums)
    count = torch.tensor(lengths, dtype=torch.int64, device=device)
    ends = torch.cumsum(count, 0)
    starts = ends - count
    # each block's index inside its own tensor, for the weights 2b + 1
    owner = torch.repeat_interleave(torch.arange(len(tensors), device=device), count)
    local = torch.arange(sums.numel(), dtype=torch.int64, device=device) - starts[owner]

    def per_tensor(values: torch.Tensor) -> torch.Tensor:
        # segment sums from one running sum: wrapping int64 arithmetic keeps the differences exact mod 2**64
        running = torch.cat([torch.zeros(1, dtype=torch.int64, device=device), torch.cumsum(values, 0)])
        return running[ends] - running[starts]

    stacked = torch.stack(columns)
    column_weights = torch.arange(_WORDS, dtype=torch.int64, device=device) * 2 + 1
    return torch.stack(
        [
            per_tensor(sums * (local * 2 + 1)),
            (stacked * column_weights).sum(dim=1),
            per_tensor(sums),
            (stacked * stacked).sum(dim=1),
            per_tensor(sums * sums),
        ],
        dim=1,
    )


def _finish(n: int, terms: Sequence[int]) -> str:
    text = ":".join(str(v & _MASK) for v in (n, *terms))
    return hashlib.sha256(f"{DEVICE_CHECKSUM}:{text}".encode()).hexdigest()[:32]


def mxsum(tensor: torch.Tensor) -> str:
    """The ``mxsum1`` checksum of one tensor, computed where it lives."""
    return mxsum_many([tensor])[0]


def mxsum_many(tensors: Sequence[torch.Tensor]) -> list[str]:
    """``mxsum1`` of many tensors, with one device-to-host transfer for all of them."""

    if not tensors:
        return []
    out: list[str] = [""] * len(tensors)
    for device, indices in _by_device(tensors).items():
        if device.type == "cpu":
            terms = [_host_terms(tensors[i]) for i in indices]
        else:
            on_device = [tensors[i] for i in indices]
            terms = device_mxsum_terms(on_device) or _torch_terms_many(on_device).cpu().tolist()
        for i, row in zip(indices, terms, strict=True):
            out[i] = _finish(tensors[i].numel() * tensors[i].element_size(), row)
    return out


def checksums(tensors: Mapping[str, torch.Tensor], algorithms: Sequence[str]) -> dict[str, str]:
    """Each tensor's checksum field for ``algorithms`` (values joined by ``+`` in that order)."""
    names = list(tensors)
    columns: list[list[str]] = []
    for algorithm in algorithms:
        if algorithm == HOST_CHECKSUM:
            columns.append([checksum_tensor(tensors[n]) for n in names])
        elif algorithm == DEVICE_CHECKSUM:
            columns.append(mxsum_many([tensors[n] for n in names]))
        else:
            raise ValueError(f"unknown checksum algorithm {algorithm!r}")
    return {n: "+".join(col[i] for col in columns) for i, n in enumerate(names)}


def serving_algorithms(device: str) -> tuple[str, ...]:
    """What a source on ``device`` publishes: both on the host; on a GPU only the device checksum
    (the host one would copy every tensor off the GPU)."""
    return ALGORITHMS if device == "cpu" else (DEVICE_CHECKSUM,)


def best_shared(published: str, device: str) -> tuple[int, str] | None:
    """Which of a manifest's algorithms (``published``, ``+``-separated) a target on ``device`` uses.

    The host checksum on the CPU, the device one on a GPU, else whichever is
    shared; ``None`` when none is known to this version (the load is then
    reported unverified, never wrongly verified).
    """
    offered = published.split("+")
    preference = ALGORITHMS if device == "cpu" else tuple(reversed(ALGORITHMS))
    for algorithm in preference:
        if algorithm in offered:
            return offered.index(algorithm), algorithm
    return None


def tensor_digest(tensor: torch.Tensor) -> str:
    """The tree digest (hex root) of one tensor's bytes, computed where it lives."""
    return tensor_digests([tensor])[0]


def tensor_digests(tensors: Sequence[torch.Tensor]) -> list[str]:
    """Tree digests (hex roots, :data:`~mx_orchestrator.digests.TREE_ALGORITHM`) of tensors,
    computed where they live: on a GPU by the shipped kernel, one launch per device; on the host
    with every core. What a content pin commits to."""
    out: list[str] = [""] * len(tensors)
    for device, indices in _by_device(tensors).items():
        chosen = [tensors[i] for i in indices]
        if device.type == "cpu":
            roots = tree_digests([flat_bytes(t).numpy() for t in chosen])
        else:
            roots = device_tree_digests(chosen)
        for i, root in zip(indices, roots, strict=True):
            out[i] = root.removeprefix(f"{TREE_ALGORITHM}:")
    return out


def digests(tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Every tensor's tree digest (hex root), by name, computed where the tensors live."""
    names = list(tensors)
    return dict(zip(names, tensor_digests([tensors[n] for n in names]), strict=True))


def _by_device(tensors: Sequence[torch.Tensor]) -> dict[torch.device, list[int]]:
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    return by_device


def pin_of(tensors: Mapping[str, torch.Tensor]) -> tuple[str, dict[str, dict[str, object]]]:
    """The content fingerprint of tensors in memory, and each one's dtype, shape and tree digest
    (computed where the tensors live)."""
    from .models import content_fingerprint, dtype_name

    roots = digests(tensors)
    pinned = [(n, dtype_name(t.dtype), tuple(t.shape), roots[n]) for n, t in tensors.items()]
    rows: dict[str, dict[str, object]] = {
        n: {"dtype": d, "shape": list(s), "digest": f"{TREE_ALGORITHM}:{h}"} for n, d, s, h in pinned
    }
    return content_fingerprint(pinned), rows


def fingerprint_of(tensors: Mapping[str, torch.Tensor]) -> str:
    """The content fingerprint of tensors in memory."""
    return pin_of(tensors)[0]


def _checked_specs(manifest: Manifest, names: Collection[str] | None) -> list[TensorSpec]:
    if names is None:
        return list(manifest.tensors)
    chosen = set(names)
    return [s for s in manifest.tensors if s.name in chosen]


def bad_digests(
    tensors: Mapping[str, torch.Tensor], pinned: Manifest, names: Collection[str] | None = None
) -> list[str]:
    """Tensors whose tree digest differs from ``pinned``'s (the caller checked the pin first).

    ``names``: check only those (a part of a striped load); default every tensor.
    """
    specs = _checked_specs(pinned, names)
    got = digests({s.name: tensors[s.name] for s in specs})
    return [s.name for s in specs if got[s.name] != s.digest]


def _wanted(
    expected: Manifest, names: Collection[str] | None, device: str
) -> tuple[str, dict[str, str]] | None:
    """The algorithm a target on ``device`` checks with and each tensor's expected value for it;
    ``None`` when no algorithm is shared or a tensor lacks a value (never a partial verdict)."""
    choice = best_shared(expected.checksum_algorithm, device)
    if choice is None:
        return None
    index, algorithm = choice
    wanted = {}
    for spec in _checked_specs(expected, names):
        parts = (spec.checksum or "").split("+")
        if spec.checksum is None or index >= len(parts) or not parts[index]:
            return None
        wanted[spec.name] = parts[index]
    return algorithm, wanted


def bad_tensors(
    tensors: Mapping[str, torch.Tensor], expected: Manifest, names: Collection[str] | None = None
) -> list[str] | None:
    """Names of tensors whose checksum differs from ``expected``'s (empty: all good).

    ``None`` when the bytes cannot be verified: no algorithm shared with this
    version, or a tensor without a value for it. Never a partial verdict.
    ``names``: check only those (a part of a striped load); default every tensor.
    """
    device = str(next(iter(tensors.values())).device) if tensors else "cpu"
    found = _wanted(expected, names, device)
    if found is None:
        return None
    algorithm, wanted = found
    got = checksums({n: tensors[n] for n in wanted}, [algorithm])
    return [n for n, value in wanted.items() if got[n] != value]


def copy_checked(
    sources: Mapping[str, torch.Tensor], destinations: Mapping[str, torch.Tensor], expected: Manifest
) -> list[str] | None:
    """Copy each of ``sources`` into its namesake in ``destinations`` (one GPU) with the kernel that
    computes ``mxsum1`` of the bytes as it moves them; the names whose checksum differs from
    ``expected``'s (empty: all good).

    ``None`` when this cannot be done, and then nothing was copied: tensors off
    a GPU, a manifest without ``mxsum1`` values for them, no kernel, or a
    destination the kernel cannot write whole. The caller then copies and
    checks in two steps (:func:`bad_tensors`).
    """
    if not sources:
        return None
    device = next(iter(sources.values())).device
    found = _wanted(expected, sources.keys(), str(device))
    if device.type != "cuda" or found is None or found[0] != DEVICE_CHECKSUM:
        return None
    _, wanted = found
    names = [n for n in wanted if n in sources and n in destinations]
    if len(names) != len(sources):
        return None
    moving = [sources[n] for n in names]
    terms = device_mxsum_terms(moving, [destinations[n] for n in names])
    if terms is None:
        return None
    got = [_finish(t.numel() * t.element_size(), row) for t, row in zip(moving, terms, strict=True)]
    return [n for n, value in zip(names, got, strict=True) if value != wanted[n]]
