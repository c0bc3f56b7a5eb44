"""Tree digests: a cryptographic digest of a tensor's bytes that is parallel by construction.

A flat SHA-256 is serial: one core hashes 16 GB in 12 s. A digest over fixed
chunks is not: every chunk is hashed on its own (by a host thread, or by a GPU
thread), and a short root binds them. The definition, once, here:

    chunks  = the bytes cut every CHUNK_BYTES (65,536) bytes; the last may be shorter;
              no chunk at all for zero bytes
    root    = SHA-256( b"mxt1" || nbytes as 8 bytes little-endian
                       || CHUNK_BYTES as 4 bytes little-endian
                       || SHA-256(chunk 0) || SHA-256(chunk 1) || ... )
    digest  = "sha256t64k:" + hex(root)

The length and the chunk size are committed to, so no two byte strings (nor
two chunkings) share a root unless SHA-256 collides. :func:`tree_digest_reference`
is the definition written plainly; :func:`tree_digest` computes the same value
on every host core (hashlib releases the GIL over large buffers), in bounded
memory, over any buffer (bytes, a memoryview, a numpy array, a CPU tensor's
bytes). The property tests pin that they agree, for any size and alignment.

This module is the first piece of content pinning at device speed (issue 23):
a GPU kernel that hashes one chunk per thread must equal this reference bit
for bit. Nothing here performs I/O.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

__all__ = ["CHUNK_BYTES", "TREE_ALGORITHM", "tree_digest", "tree_digest_reference", "tree_root"]

#: the chunk every leaf hashes (16-64 KiB chunks measured 765-777 GB/s on one H200, NOTES.md)
CHUNK_BYTES = 1 << 16
#: the algorithm's name, as digests and manifests carry it
TREE_ALGORITHM = "sha256t64k"
_DOMAIN = b"mxt1"
#: chunks a host thread hashes per task (4 MiB): large enough that a task costs far more than
#: handing it out, small enough that every core gets work on a 100 MB tensor
_CHUNKS_PER_TASK = 64


def tree_root(nbytes: int, leaves: bytes) -> str:
    """The digest from the concatenated SHA-256 of every chunk, in order (what any implementation,
    host or device, hands back to finish the digest)."""
    if nbytes < 0 or len(leaves) != 32 * _chunk_count(nbytes):
        raise ValueError(f"{len(leaves)} bytes of leaves for {nbytes} bytes of data")
    root = hashlib.sha256(_DOMAIN + nbytes.to_bytes(8, "little") + CHUNK_BYTES.to_bytes(4, "little"))
    root.update(leaves)
    return f"{TREE_ALGORITHM}:{root.hexdigest()}"


def tree_digest_reference(data: bytes) -> str:
    """The definition, plainly (one chunk after another): what every implementation must equal."""
    leaves = b"".join(
        hashlib.sha256(data[start : start + CHUNK_BYTES]).digest()
        for start in range(0, len(data), CHUNK_BYTES)
    )
    return tree_root(len(data), leaves)


def tree_digest(buffer: Any, *, threads: int | None = None, pool: ThreadPoolExecutor | None = None) -> str:
    """The tree digest of ``buffer`` (anything exposing the buffer protocol, any alignment), its
    chunks hashed on ``threads`` host threads (default: every core), or on ``pool``'s.

    Memory stays bounded: the leaves are 32 bytes a chunk (0.05 % of the data), and the data is
    hashed where it lies, never copied.
    """
    view = memoryview(buffer).cast("B")
    nbytes = view.nbytes
    count = _chunk_count(nbytes)
    if count <= _CHUNKS_PER_TASK or threads == 1:
        return tree_root(nbytes, _hash_chunks(view, 0, count))
    tasks = [(first, min(first + _CHUNKS_PER_TASK, count)) for first in range(0, count, _CHUNKS_PER_TASK)]
    if pool is not None:
        return tree_root(nbytes, b"".join(pool.map(lambda t: _hash_chunks(view, *t), tasks)))
    workers = max(1, min(threads or os.cpu_count() or 1, len(tasks)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mxo-digest") as own:
        return tree_root(nbytes, b"".join(own.map(lambda t: _hash_chunks(view, *t), tasks)))


def _hash_chunks(view: memoryview, first: int, stop: int) -> bytes:
    return b"".join(hashlib.sha256(chunk).digest() for chunk in _chunks(view, first, stop))


def _chunks(view: memoryview, first: int, stop: int) -> Iterator[memoryview]:
    for i in range(first, stop):
        yield view[i * CHUNK_BYTES : (i + 1) * CHUNK_BYTES]


def _chunk_count(nbytes: int) -> int:
    return -(-nbytes // CHUNK_BYTES)
