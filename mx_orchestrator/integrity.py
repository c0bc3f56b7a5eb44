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
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import xxhash

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
    "mxsum",
    "mxsum_many",
    "digests",
    "fingerprint_of",
    "pin_of",
    "serving_algorithms",
    "tensor_digest",
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


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    import torch

    return tensor.detach().reshape(-1).view(torch.uint8)


def _host_bytes(tensor: torch.Tensor) -> memoryview:
    """A tensor's bytes in host memory, for the host-only hashes (a GPU tensor is copied off)."""
    flat = _bytes(tensor)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    return flat.numpy().data


def _host_terms(tensor: torch.Tensor) -> list[int]:
    """The five sums of :func:`mxsum` for a host tensor: numpy, chunks that stay in cache, two threads.

    Equal to :func:`_device_terms` by construction (the same integer sums, in
    another order; wrapping addition does not care) and pinned by a test.
    """
    import numpy as np

    data = _bytes(tensor).numpy()
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


def _device_terms(tensor: torch.Tensor) -> torch.Tensor:
    """The five wrapped int64 sums of :func:`mxsum` for one tensor, on its own device."""
    return _device_terms_many([tensor])[0]


def _device_terms_many(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The five sums of :func:`mxsum` for tensors on one device, as a ``(len, 5)`` int64 tensor there.

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
        data = _bytes(tensor)
        n = data.numel()
        full = n // _BLOCK
        column = torch.zeros(_WORDS, dtype=torch.int64, device=device)
        if full:
            main = data[: full * _BLOCK]
            try:
                words = main.view(torch.int32).view(full, _WORDS)
            except RuntimeError:  # a storage offset that is not a multiple of 4: realign by copying
                words = main.clone().view(torch.int32).view(full, _WORDS)
            rows, column = _block_and_column_sums(words)
            block_sums.append(rows)
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


def _block_and_column_sums(words: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row sums and column sums (int64) of an ``(n, 1024)`` int32 tensor: one pass on a GPU with Triton."""
    import torch

    if words.device.type == "cuda":
        kernel = _triton_kernel()
        if kernel is not None:
            return kernel(words)  # type: ignore[no-any-return]
    return words.sum(dim=1, dtype=torch.int64), words.sum(dim=0, dtype=torch.int64)


_TRITON: list[Any] = []


def _triton_kernel() -> Any:
    """A fused Triton reduction when Triton is installed (GPU images have it), else ``None``.

    torch's two reductions read every byte twice and cast on the way; this reads
    each 4 KiB block once, keeps the column sums in registers over 64 blocks and
    leaves a small partial-sum matrix for torch to finish. The sums are the same
    integers, so the checksum is the same.
    """
    if _TRITON:
        return _TRITON[0]
    try:
        import torch
        import triton
        import triton.language as tl
    except ImportError:
        _TRITON.append(None)
        return None

    group = 64  # blocks per program

    @triton.jit  # type: ignore[untyped-decorator, unused-ignore]
    def sums_kernel(words, rows_out, cols_out, n_rows, GROUP: tl.constexpr, SUB: tl.constexpr):  # type: ignore[no-untyped-def]
        pid = tl.program_id(0)
        cols = tl.arange(0, 1024)
        acc = tl.zeros((1024,), dtype=tl.int64)
        for step in range(0, GROUP, SUB):
            r = pid * GROUP + step + tl.arange(0, SUB)
            inside = r < n_rows
            tile = tl.load(
                words + r[:, None].to(tl.int64) * 1024 + cols[None, :], mask=inside[:, None], other=0
            )
            tile = tile.to(tl.int64)
            tl.store(rows_out + r, tl.sum(tile, axis=1), mask=inside)
            acc += tl.sum(tile, axis=0)
        tl.store(cols_out + pid.to(tl.int64) * 1024 + cols, acc)

    def run(words: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = words.shape[0]
        programs = (n + group - 1) // group
        rows = torch.empty(n, dtype=torch.int64, device=words.device)
        partial = torch.empty((programs, 1024), dtype=torch.int64, device=words.device)
        with torch.cuda.device(words.device):
            sums_kernel[(programs,)](words, rows, partial, n, GROUP=group, SUB=4)
        return rows, partial.sum(dim=0)

    _TRITON.append(run)
    return run


def warm_device_checksum(device: str) -> threading.Thread | None:
    """Compile and run the device checksum once on ``device`` in the background (returns the thread).

    The first use of the Triton kernel in a process compiles it (~0.5-1 s on a
    cold cache); a GPU target starts this when it is made, so a first load's
    verification does not pay it. ``None`` on the host, or when already warm.
    """
    if device == "cpu" or device in _WARMED:
        return None
    _WARMED.add(device)

    def run() -> None:
        import torch

        with contextlib.suppress(Exception):  # no usable GPU (or no CUDA build): the load will say so itself
            # Triton specialises on whether the block count divides by 16: warm both variants
            mxsum_many([torch.zeros(n * _BLOCK, dtype=torch.uint8, device=device) for n in (16, 3)])

    # not a daemon: interpreter shutdown must not kill it inside the compiler
    thread = threading.Thread(target=run, name="mxo-checksum-warmup", daemon=False)
    thread.start()
    return thread


_WARMED: set[str] = set()


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
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    out: list[str] = [""] * len(tensors)
    for device, indices in by_device.items():
        if device.type == "cpu":
            terms = [_host_terms(tensors[i]) for i in indices]
        else:
            terms = _device_terms_many([tensors[i] for i in indices]).cpu().tolist()
        for i, row in zip(indices, terms, strict=True):
            out[i] = _finish(_bytes(tensors[i]).numel(), row)
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
    """SHA-256 of a tensor's bytes: the cryptographic digest a content pin commits to.

    Computed on the host (a GPU tensor is copied off first: SHA-256 is a serial
    hash that no device computes faster than a CPU core streams it).
    """
    return hashlib.sha256(_host_bytes(tensor)).hexdigest()


def digests(tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Every tensor's SHA-256, on as many cores as there are (hashlib releases the GIL)."""
    names = list(tensors)
    with ThreadPoolExecutor(max(1, os.cpu_count() or 1), thread_name_prefix="mxo-sha256") as pool:
        return dict(zip(names, pool.map(lambda n: tensor_digest(tensors[n]), names), strict=True))


def pin_of(tensors: Mapping[str, torch.Tensor]) -> tuple[str, dict[str, dict[str, object]]]:
    """The content fingerprint of tensors in memory, and each one's dtype, shape and SHA-256
    (hashed on every core)."""
    from .models import content_fingerprint, dtype_name

    sha = digests(tensors)
    pinned = [(n, dtype_name(t.dtype), tuple(t.shape), sha[n]) for n, t in tensors.items()]
    rows: dict[str, dict[str, object]] = {
        n: {"dtype": d, "shape": list(s), "sha256": h} for n, d, s, h in pinned
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
    """Tensors whose SHA-256 differs from ``pinned``'s digests (the caller checked the pin first).

    ``names``: check only those (a part of a striped load); default every tensor.
    """
    specs = _checked_specs(pinned, names)
    got = digests({s.name: tensors[s.name] for s in specs})
    return [s.name for s in specs if got[s.name] != s.digest]


def bad_tensors(
    tensors: Mapping[str, torch.Tensor], expected: Manifest, names: Collection[str] | None = None
) -> list[str] | None:
    """Names of tensors whose checksum differs from ``expected``'s (empty: all good).

    ``None`` when the bytes cannot be verified: no algorithm shared with this
    version, or a tensor without a value for it. Never a partial verdict.
    ``names``: check only those (a part of a striped load); default every tensor.
    """
    device = str(next(iter(tensors.values())).device) if tensors else "cpu"
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
    got = checksums({n: tensors[n] for n in wanted}, [algorithm])
    return [n for n, value in wanted.items() if got[n] != value]
