"""Tree digests: every implementation equals the plain definition, for any size and alignment."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mx_orchestrator.digests import CHUNK_BYTES, TREE_ALGORITHM, tree_digest, tree_digest_reference, tree_root

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
    with ThreadPoolExecutor(max_workers=3) as pool:
        assert tree_digest(view, pool=pool) == expected


def test_the_definition_commits_to_length_and_chunking() -> None:
    empty = tree_digest_reference(b"")
    root = hashlib.sha256(b"mxt1" + (0).to_bytes(8, "little") + CHUNK_BYTES.to_bytes(4, "little")).hexdigest()
    assert empty == f"{TREE_ALGORITHM}:{root}"
    one = tree_digest_reference(b"\x00")
    leaf = hashlib.sha256(b"\x00").digest()
    assert one == tree_root(1, leaf) != empty
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
