"""Tree digests: every implementation equals the plain definition, for any size and alignment."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mx_orchestrator.digests import (
    CHUNK_BYTES,
    GROUP_LEAVES,
    TREE_ALGORITHM,
    tree_digest,
    tree_digest_reference,
    tree_digests,
    tree_root,
    tree_root_of_nodes,
    tree_roots,
)

SIZES = st.sampled_from(
    [0, 1, 31, CHUNK_BYTES - 1, CHUNK_BYTES, CHUNK_BYTES + 1, 3 * CHUNK_BYTES + 7]
) | st.integers(0, 200 * CHUNK_BYTES)


@settings(max_examples=60, deadline=None)
@given(size=SIZES, offset=st.integers(0, 7), seed=st.integers(0, 2**31), threads=st.sampled_from([1, 2, 5]))
def test_the_every_core_digest_equals_the_definition_for_any_size_and_alignment(
    size: int, offset: int, seed: int, threads: int
) -> None:
    data = np.random.default_rng(seed).integers(0, 256, size + offset, dtype=np.uint8).tobytes()
    view = memoryview(data)[offset:]  # an odd start, as a tensor inside a region may have
    expected = tree_digest_reference(bytes(view))
    assert tree_digest(view, threads=threads) == expected
    # many buffers at once (every chunk of every buffer a task for the shared pool): each its own digest
    half = view[: size // 2]
    assert tree_digests([view, b"", half], threads=threads) == [
        expected,
        tree_digest_reference(b""),
        tree_digest_reference(bytes(half)),
    ]


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(SIZES, max_size=6), seed=st.integers(0, 2**31))
def test_roots_from_concatenated_nodes_equal_the_definition(sizes: list[int], seed: int) -> None:
    """What the device kernels hand back (every buffer's nodes, all buffers in a row) finishes to
    the same digests as the definition, including empty buffers (no nodes)."""
    rng = np.random.default_rng(seed)
    blobs = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in sizes]
    nodes = b"".join(nodes_of(b) for b in blobs)
    assert tree_roots(sizes, nodes) == [tree_digest_reference(b) for b in blobs]
    with pytest.raises(ValueError):
        tree_roots(sizes, nodes + b"\x00" * 32)


def nodes_of(data: bytes) -> bytes:
    leaves = b"".join(
        hashlib.sha256(data[i : i + CHUNK_BYTES]).digest() for i in range(0, len(data), CHUNK_BYTES)
    )
    step = 32 * GROUP_LEAVES
    return b"".join(hashlib.sha256(leaves[i : i + step]).digest() for i in range(0, len(leaves), step))


def test_a_buffer_past_one_group_has_a_node_per_64_mib_and_every_path_agrees() -> None:
    """Past GROUP_LEAVES chunks the middle level has more than one node: the every-core digest,
    the roots from nodes and the definition agree there too."""
    data = (
        np.random.default_rng(3)
        .integers(0, 256, GROUP_LEAVES * CHUNK_BYTES + 12_345, dtype=np.uint8)
        .tobytes()
    )
    expected = tree_digest_reference(data)
    assert len(nodes_of(data)) == 64
    assert tree_digest(data) == expected == tree_roots([len(data)], nodes_of(data))[0]
    assert tree_root_of_nodes(len(data), nodes_of(data)) == expected


def test_the_definition_commits_to_length_and_chunking() -> None:
    empty = tree_digest_reference(b"")
    header = (
        b"mxt1"
        + (0).to_bytes(8, "little")
        + CHUNK_BYTES.to_bytes(4, "little")
        + GROUP_LEAVES.to_bytes(4, "little")
    )
    assert empty == f"{TREE_ALGORITHM}:{hashlib.sha256(header).hexdigest()}"
    one = tree_digest_reference(b"\x00")
    leaf = hashlib.sha256(b"\x00").digest()
    assert one == tree_root(1, leaf) == tree_root_of_nodes(1, hashlib.sha256(leaf).digest()) != empty
    # trailing zeros change the length, so the digest: no two byte strings share a root
    assert tree_digest_reference(b"\x00" * CHUNK_BYTES) != tree_digest_reference(b"\x00" * (CHUNK_BYTES + 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.uint8])
def test_a_tensor_is_digested_through_its_bytes_whatever_its_dtype(dtype: torch.dtype) -> None:
    tensor = torch.arange(100_003).to(dtype)
    data = tensor.numpy().tobytes() if dtype != torch.bfloat16 else tensor.view(torch.int16).numpy().tobytes()
    assert tree_digest(tensor.view(torch.uint8).numpy()) == tree_digest_reference(data)


def test_leaves_of_the_wrong_length_are_refused() -> None:
    with pytest.raises(ValueError):
        tree_root(CHUNK_BYTES + 1, b"\x00" * 32)
