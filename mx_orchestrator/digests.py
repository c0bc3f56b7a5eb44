"""Tree digests: a cryptographic digest of a tensor's bytes that is parallel by construction.

A flat SHA-256 is serial: one core hashes 16 GB in 12 s. A digest over fixed
chunks is not: every chunk is hashed on its own (by a host thread, or by a GPU
thread), and a short root binds them. The definition, once, here:

    chunks  = the bytes cut every CHUNK_BYTES (65,536) bytes; the last may be shorter;
              no chunk at all for zero bytes
    leaf i  = SHA-256(chunk i)
    node g  = SHA-256(leaf 1024g || leaf 1024g+1 || ... ), at most GROUP_LEAVES (1,024)
              leaves each (64 MiB of data); no node for zero bytes
    root    = SHA-256( b"mxt1" || nbytes as 8 bytes little-endian
                       || CHUNK_BYTES as 4 bytes little-endian
                       || GROUP_LEAVES as 4 bytes little-endian
                       || node 0 || node 1 || ... )
    digest  = "sha256t64k:" + hex(root)

The length, the chunk and the group size are committed to, so no two byte
strings (nor two shapes of tree) share a root unless SHA-256 collides. Why
the middle level: the root is serial over what it hashes, and a 16 GB tensor
has 8 MiB of leaves (6 ms for one host core, measured 13-18 ms on the GPU
host with the copy back) but 8 KiB of nodes; a GPU thread hashes each node's
32 KiB of leaves where they lie. :func:`tree_digest_reference`
is the definition written plainly; :func:`tree_digest` computes the same value
on every host core (hashlib releases the GIL over large buffers), in bounded
memory, over any buffer (bytes, a memoryview, a numpy array, a CPU tensor's
bytes). The property tests pin that they agree, for any size and alignment.

The device kernels (``_kernels/digests.cu``: a GPU thread per chunk, then a
thread per node) hand back the nodes; :func:`tree_roots` finishes them; the bench checks it equals
the reference bit for bit. Content pins (``mxc2-``) commit to these digests.
Nothing here performs I/O.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

__all__ = [
    "CHUNK_BYTES",
    "GROUP_LEAVES",
    "TREE_ALGORITHM",
    "chunk_count",
    "host_pool",
    "tree_digest",
    "tree_digest_reference",
    "tree_digests",
    "node_count",
    "tree_root",
    "tree_root_of_nodes",
    "tree_roots",
]

#: the chunk every leaf hashes (16-64 KiB chunks measured 765-777 GB/s on one H200, NOTES.md)
CHUNK_BYTES = 1 << 16
#: leaves per node of the middle level
GROUP_LEAVES = 1024
#: the algorithm's name, as digests and manifests carry it
TREE_ALGORITHM = "sha256t64k"
_DOMAIN = b"mxt1"
#: chunks a host thread hashes per task (4 MiB): large enough that a task costs far more than
#: handing it out, small enough that every core gets work on a 100 MB tensor
_CHUNKS_PER_TASK = 64


def tree_root(nbytes: int, leaves: bytes) -> str:
    """The digest from the concatenated SHA-256 of every chunk, in order."""
    if nbytes < 0 or len(leaves) != 32 * chunk_count(nbytes):
        raise ValueError(f"{len(leaves)} bytes of leaves for {nbytes} bytes of data")
    step = 32 * GROUP_LEAVES
    nodes = b"".join(hashlib.sha256(leaves[i : i + step]).digest() for i in range(0, len(leaves), step))
    return tree_root_of_nodes(nbytes, nodes)


def tree_root_of_nodes(nbytes: int, nodes: bytes) -> str:
    """The digest from the concatenated nodes, in order (what the device kernels hand back)."""
    if nbytes < 0 or len(nodes) != 32 * node_count(nbytes):
        raise ValueError(f"{len(nodes)} bytes of nodes for {nbytes} bytes of data")
    root = hashlib.sha256(
        _DOMAIN
        + nbytes.to_bytes(8, "little")
        + CHUNK_BYTES.to_bytes(4, "little")
        + GROUP_LEAVES.to_bytes(4, "little")
    )
    root.update(nodes)
    return f"{TREE_ALGORITHM}:{root.hexdigest()}"


def tree_digest_reference(data: bytes) -> str:
    """The definition, plainly (one chunk after another, one group after another): what every
    implementation must equal."""
    leaves = [hashlib.sha256(data[at : at + CHUNK_BYTES]).digest() for at in range(0, len(data), CHUNK_BYTES)]
    nodes = [
        hashlib.sha256(b"".join(leaves[g : g + GROUP_LEAVES])).digest()
        for g in range(0, len(leaves), GROUP_LEAVES)
    ]
    root = hashlib.sha256(
        b"mxt1"
        + len(data).to_bytes(8, "little")
        + CHUNK_BYTES.to_bytes(4, "little")
        + GROUP_LEAVES.to_bytes(4, "little")
        + b"".join(nodes)
    )
    return f"{TREE_ALGORITHM}:{root.hexdigest()}"


def tree_digest(buffer: Any, *, threads: int | None = None) -> str:
    """The tree digest of ``buffer`` (anything exposing the buffer protocol, any alignment), its
    chunks hashed on every core (``threads=1``: on this one)."""
    return tree_digests([buffer], threads=threads)[0]


def tree_digests(buffers: Sequence[Any], *, threads: int | None = None) -> list[str]:
    """The tree digests of many buffers, every 4 MiB of every buffer a task for the host's cores.

    Memory stays bounded: the leaves are 32 bytes a chunk (0.05 % of the data), and
    the data is hashed where it lies (a tensor's memory, a memory-mapped file), never
    copied. ``threads=1`` hashes on the calling thread.
    """
    views = [memoryview(b).cast("B") for b in buffers]
    tasks = [
        (i, first, min(first + _CHUNKS_PER_TASK, chunk_count(v.nbytes)))
        for i, v in enumerate(views)
        for first in range(0, chunk_count(v.nbytes), _CHUNKS_PER_TASK)
    ]
    if threads == 1 or len(tasks) <= 1:
        hashed = [_hash_chunks(views[i], first, stop) for i, first, stop in tasks]
    else:
        hashed = list(host_pool().map(lambda t: _hash_chunks(views[t[0]], t[1], t[2]), tasks))
    leaves: list[list[bytes]] = [[] for _ in views]
    for (i, _, _), part in zip(tasks, hashed, strict=True):
        leaves[i].append(part)
    return [tree_root(v.nbytes, b"".join(parts)) for v, parts in zip(views, leaves, strict=True)]


def tree_roots(sizes: Sequence[int], nodes: bytes) -> list[str]:
    """The digests of buffers of ``sizes`` bytes from all their nodes, concatenated in order (what
    the device kernels hand back: 32 bytes per 64 MiB)."""
    bounds = [0]
    for size in sizes:
        bounds.append(bounds[-1] + 32 * node_count(size))
    if bounds[-1] != len(nodes):
        raise ValueError(f"{len(nodes)} bytes of nodes for {len(sizes)} buffers needing {bounds[-1]}")
    return [tree_root_of_nodes(n, nodes[bounds[i] : bounds[i + 1]]) for i, n in enumerate(sizes)]


def host_pool() -> ThreadPoolExecutor:
    """The process's hashing threads, one per core, made on first use and reused (hashlib releases
    the GIL over large buffers, so they run in parallel); idle threads cost nothing."""
    with _POOL_LOCK:
        if not _POOL:
            _POOL.append(ThreadPoolExecutor(max(1, os.cpu_count() or 1), thread_name_prefix="mxo-digest"))
        return _POOL[0]


_POOL: list[ThreadPoolExecutor] = []
_POOL_LOCK = threading.Lock()


def _hash_chunks(view: memoryview, first: int, stop: int) -> bytes:
    return b"".join(hashlib.sha256(chunk).digest() for chunk in _chunks(view, first, stop))


def _chunks(view: memoryview, first: int, stop: int) -> Iterator[memoryview]:
    for i in range(first, stop):
        yield view[i * CHUNK_BYTES : (i + 1) * CHUNK_BYTES]


def chunk_count(nbytes: int) -> int:
    """How many leaves a buffer of ``nbytes`` has (none for an empty one)."""
    return -(-nbytes // CHUNK_BYTES)


def node_count(nbytes: int) -> int:
    """How many nodes a buffer of ``nbytes`` has (none for an empty one)."""
    return -(-chunk_count(nbytes) // GROUP_LEAVES)
