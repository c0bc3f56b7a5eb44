"""Integrity values computed on the GPU that holds the bytes, with the kernels the package ships.

Owns the device side of :mod:`.integrity`: the per-launch tables (each
tensor's address, size and first work item), the launches on torch's current
stream (so they run after the copies that landed the bytes), and what comes
back: 32 bytes of nodes per 64 MiB for a tree digest (two launches: the leaves,
then the nodes over them; the roots are finished on the host,
:func:`~mx_orchestrator.digests.tree_roots`),
five sums per tensor for ``mxsum1``. One launch covers every tensor of a part.

Nothing compiles here: :mod:`._backends.cuda_kernels` loads the ahead-of-time
binaries. Where they cannot run (no ``cuda-bindings``, another vendor, an
architecture older than the binaries), :func:`device_tree_digests` copies each
tensor to the host and hashes it there, :func:`device_mxsum_terms` answers
``None`` (the caller uses torch's reductions), and :func:`where_digests_run`
says which path a device takes, for the report.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ._backends.cuda_kernels import Kernels, kernels
from .digests import chunk_count, node_count, tree_digests, tree_roots

if TYPE_CHECKING:
    import torch

__all__ = ["device_mxsum_terms", "device_tree_digests", "flat_bytes", "warm_kernels", "where_digests_run"]

_BLOCK = 4096  # mxsum1's block
#: blocks one warp of the mxsum1 kernel sums before it adds its columns to the tensor's (atomics)
_MIN_RUN = 16
_WARPS = 16_384


def flat_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes as one flat ``uint8`` tensor on its device (a copy only if not contiguous)."""
    import torch

    return tensor.detach().reshape(-1).view(torch.uint8)


def _kernels_for(device: torch.device) -> Kernels | str:
    if device.type != "cuda":
        return f"{device.type} tensors are hashed on the host"
    return kernels(device.index if device.index is not None else _current())


def _current() -> int:
    import torch

    return torch.cuda.current_device()


def where_digests_run(device: str) -> str:
    """Which path computes digests for tensors on ``device``: the kernel binary, or the host and why."""
    import torch

    if device == "cpu":
        return "host's cores"
    found = _kernels_for(torch.device(device))
    return f"device kernels ({found.binary})" if isinstance(found, Kernels) else f"host's cores ({found})"


def _contiguous(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors, each made contiguous only where it is not (the kernels read flat bytes)."""
    return [t if t.is_contiguous() else t.contiguous() for t in tensors]


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _table(
    flat: Sequence[torch.Tensor], *items: Sequence[int], extra: Sequence[int] = ()
) -> tuple[torch.Tensor, list[int]]:
    """The kernels' arguments as one int64 tensor on the tensors' device: addresses, sizes, then
    for each list of per-tensor item counts its running counts (``len + 1`` entries each), then
    ``extra`` (destination addresses); and each list's total."""
    import torch

    values = [t.data_ptr() for t in flat] + [_nbytes(t) for t in flat]
    totals = []
    for counts in items:
        first = [0]
        for n in counts:
            first.append(first[-1] + n)
        values += first
        totals.append(first[-1])
    values += extra
    return torch.tensor(values, dtype=torch.int64).to(flat[0].device), totals


def device_tree_digests(tensors: Sequence[torch.Tensor]) -> list[str]:
    """Tree digests (``sha256t64k:<hex>``) of tensors on one CUDA device, computed there.

    One launch hashes every 64 KiB chunk of every tensor (a GPU thread each), a
    second every run of 1,024 leaves; the nodes come back (32 bytes per 64 MiB)
    and the host finishes the roots.
    Without a usable kernel, each tensor is copied to the host and hashed there.
    """
    import torch

    if not tensors:
        return []
    found = _kernels_for(tensors[0].device)
    if not isinstance(found, Kernels):
        return tree_digests([flat_bytes(t).cpu().numpy() for t in tensors])
    flat = _contiguous(tensors)  # no per-tensor view: hundreds of torch calls cost milliseconds
    sizes = [_nbytes(t) for t in flat]
    table, (chunks, groups) = _table(flat, [chunk_count(n) for n in sizes], [node_count(n) for n in sizes])
    if not chunks:
        return tree_roots(sizes, b"")
    leaves = torch.empty(chunks * 32, dtype=torch.uint8, device=flat[0].device)
    nodes = torch.empty(groups * 32, dtype=torch.uint8, device=flat[0].device)
    count, base, stream = len(flat), table.data_ptr(), _stream(leaves)
    leaf_first, node_first = base + 16 * count, base + 24 * count + 8
    found.sha256t_leaves(base, base + 8 * count, leaf_first, count, chunks, leaves.data_ptr(), stream)
    found.sha256t_nodes(leaf_first, node_first, count, groups, leaves.data_ptr(), nodes.data_ptr(), stream)
    return tree_roots(sizes, _to_host(nodes))


def _to_host(leaves: torch.Tensor) -> bytes:
    """A small device buffer's bytes on the host, through a page-locked buffer kept per device (a pageable
    copy runs at a tenth of the speed); a caller that finds it busy copies its own way."""
    import torch

    key, n = str(leaves.device), leaves.numel()
    if n <= 1 << 16:  # a pageable copy of a few KiB costs less than the lock
        return bytes(leaves.cpu().numpy().data)
    lock = _STAGING_LOCKS.setdefault(key, threading.Lock())
    if not lock.acquire(blocking=False):
        return bytes(leaves.cpu().numpy().data)
    try:
        staging = _STAGING.get(key)
        if staging is None or staging.numel() < n:
            staging = _STAGING[key] = torch.empty(max(n, 1 << 20), dtype=torch.uint8, pin_memory=True)
        staging[:n].copy_(leaves)
        return bytes(staging[:n].numpy().data)
    finally:
        lock.release()


_STAGING: dict[str, torch.Tensor] = {}
_STAGING_LOCKS: dict[str, threading.Lock] = {}


def device_mxsum_terms(
    tensors: Sequence[torch.Tensor], into: Sequence[torch.Tensor] | None = None
) -> list[list[int]] | None:
    """``mxsum1``'s five sums per tensor (tensors on one CUDA device), or ``None`` without a kernel.

    A warp sums a run of 4 KiB blocks, reading each byte once; the weighting of
    the 1,024 column sums is left to torch, on the device, for all tensors at once.

    ``into``: a contiguous tensor of the same size on the same device per tensor;
    the kernel writes each tensor's bytes there as it reads them (a copy whose
    checksum costs no second read). ``None`` then means nothing was copied either:
    no kernel, or a destination the kernel cannot write whole (the caller copies).
    """
    import torch

    found = _kernels_for(tensors[0].device) if tensors else "nothing to sum"
    if not isinstance(found, Kernels):
        return None
    flat = _contiguous(tensors)
    device = flat[0].device
    destinations: list[int] = []
    if into is not None:
        if len(into) != len(flat):
            raise ValueError(f"{len(flat)} tensors to copy into {len(into)} destinations")
        for src, dst in zip(flat, into, strict=True):
            if dst.device != device or not dst.is_contiguous() or _nbytes(dst) != _nbytes(src):
                return None
            destinations.append(dst.data_ptr())
    table, (total,) = _table(flat, [max(1, -(-_nbytes(t) // _BLOCK)) for t in flat], extra=destinations)
    count, base = len(flat), table.data_ptr()
    scalars = torch.zeros((count, 3), dtype=torch.int64, device=device)
    columns = torch.zeros((count, 1024), dtype=torch.int64, device=device)
    run = max(_MIN_RUN, -(-total // _WARPS))
    found.mxsum1_partials(
        base,
        base + 8 * count,
        base + 16 * count,
        count,
        total,
        run,
        scalars.data_ptr(),
        columns.data_ptr(),
        _stream(scalars),
        dsts=base + 24 * count + 8 if into is not None else None,
    )
    weights = torch.arange(1024, dtype=torch.int64, device=device) * 2 + 1
    terms = torch.stack(
        [
            scalars[:, 0],
            (columns * weights).sum(dim=1),
            scalars[:, 1],
            (columns * columns).sum(dim=1),
            scalars[:, 2],
        ],
        dim=1,
    )
    rows: list[list[int]] = terms.cpu().tolist()
    return rows


def _stream(on: torch.Tensor) -> int:
    import torch

    return int(torch.cuda.current_stream(on.device).cuda_stream)


def warm_kernels(device: str) -> threading.Thread | None:
    """Load the kernels on ``device`` and run each once, in the background (returns the thread).

    Loading a shipped binary takes about a millisecond; the first launch of each
    kernel also binds it (CUDA's lazy loading). A GPU target starts this when it
    is made, so a first verified load pays neither. ``None`` on the host, or when
    already warm.
    """
    if device == "cpu" or device in _WARMED:
        return None
    _WARMED.add(device)

    def run() -> None:
        import torch

        try:
            sample = [torch.zeros(n, dtype=torch.uint8, device=device) for n in (1, 5000)]
            device_tree_digests(sample)
            device_mxsum_terms(sample)
        except (RuntimeError, AssertionError):  # no usable GPU: the load will say so itself
            return

    # not a daemon: interpreter shutdown must not kill it inside the driver
    thread = threading.Thread(target=run, name="mxo-kernel-warmup", daemon=False)
    thread.start()
    return thread


_WARMED: set[str] = set()
