"""Checksums: the device checksum's definition, its properties, and which algorithm a target uses."""

from __future__ import annotations

import hashlib
import re
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from mx_orchestrator import ModelIdentity
from mx_orchestrator.buffers import _empty_bytes, allocate
from mx_orchestrator.integrity import (
    _host_terms,
    _torch_terms_many,
    bad_tensors,
    best_shared,
    checksums,
    copy_checked,
    mxsum,
    serving_algorithms,
)
from mx_orchestrator.layout import LayoutSpec, plan_layout
from mx_orchestrator.source import load_weights

IDENTITY = ModelIdentity("acme/integrity")


def reference_mxsum(data: bytes) -> str:
    """mxsum1 written from its definition with Python integers, independent of the implementation."""
    mask = (1 << 64) - 1
    padded = data + b"\0" * ((-len(data)) % 4096 or (4096 if not data else 0))
    blocks = [padded[i : i + 4096] for i in range(0, len(padded), 4096)]
    sums, columns = [], [0] * 1024
    for block in blocks:
        words = struct.unpack("<1024i", block)
        sums.append(sum(words))
        for j, w in enumerate(words):
            columns[j] += w
    terms = [
        sum((2 * b + 1) * s for b, s in enumerate(sums)),
        sum((2 * j + 1) * c for j, c in enumerate(columns)),
        sum(sums),
        sum(c * c for c in columns),
        sum(s * s for s in sums),
    ]
    text = ":".join(str(v & mask) for v in (len(data), *terms))
    return hashlib.sha256(f"mxsum1:{text}".encode()).hexdigest()[:32]


def as_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)


blobs = st.binary(min_size=0, max_size=3 * 4096 + 77)


@settings(max_examples=60, deadline=None)
@given(blobs)
def test_the_host_value_equals_an_independent_reference_and_the_device_code_path(data: bytes) -> None:
    tensor = as_tensor(data)
    assert mxsum(tensor) == reference_mxsum(data)
    # the torch path (CUDA tensors where the shipped kernel cannot run), here on the CPU: the same sums
    assert _host_terms(tensor) == _torch_terms_many([tensor])[0].tolist()


@settings(max_examples=80, deadline=None)
@given(st.binary(min_size=1, max_size=2 * 4096 + 9), st.data())
def test_any_single_bit_flip_is_detected(data: bytes, draw: st.DataObject) -> None:
    bit = draw.draw(st.integers(0, len(data) * 8 - 1))
    flipped = bytearray(data)
    flipped[bit // 8] ^= 1 << (bit % 8)
    assert mxsum(as_tensor(bytes(flipped))) != mxsum(as_tensor(data))


@settings(max_examples=80, deadline=None)
@given(st.binary(min_size=8, max_size=3 * 4096), st.data())
def test_any_swap_of_two_different_aligned_words_is_detected(data: bytes, draw: st.DataObject) -> None:
    words = len(data) // 4
    i = draw.draw(st.integers(0, words - 1))
    k = draw.draw(st.integers(0, words - 1))
    a, b = data[4 * i : 4 * i + 4], data[4 * k : 4 * k + 4]
    assume(a != b)
    swapped = bytearray(data)
    swapped[4 * i : 4 * i + 4], swapped[4 * k : 4 * k + 4] = b, a
    assert mxsum(as_tensor(bytes(swapped))) != mxsum(as_tensor(data))


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=4096, max_size=4 * 4096), st.data())
def test_a_zeroed_4k_page_is_detected(data: bytes, draw: st.DataObject) -> None:
    page = draw.draw(st.integers(0, len(data) // 4096 - 1))
    zeroed = bytearray(data)
    zeroed[page * 4096 : (page + 1) * 4096] = bytes(4096)
    assume(bytes(zeroed) != data)
    assert mxsum(as_tensor(bytes(zeroed))) != mxsum(as_tensor(data))


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=1, max_size=2 * 4096 + 9), st.data())
def test_a_truncated_tail_is_detected(data: bytes, draw: st.DataObject) -> None:
    cut = draw.draw(st.integers(1, len(data)))
    assert mxsum(as_tensor(data[:-cut])) != mxsum(as_tensor(data))


def test_the_checksum_is_over_bytes_whatever_the_dtype_or_storage_offset() -> None:
    base = torch.arange(4096 * 3, dtype=torch.float32)
    data = base.numpy().tobytes()
    assert mxsum(base) == reference_mxsum(data)
    assert mxsum(base.view(torch.int32)) == mxsum(base)
    odd = torch.arange(8195, dtype=torch.uint8)[1:]  # storage offset not a multiple of 4
    assert mxsum(odd) == reference_mxsum(odd.numpy().tobytes())


def test_a_cpu_source_publishes_both_algorithms_a_gpu_source_only_the_device_one() -> None:
    assert serving_algorithms("cpu") == ("xxh3_64", "mxsum1")
    assert serving_algorithms("cuda:0") == ("mxsum1",)
    served = load_weights(IDENTITY, {"w": torch.arange(5000, dtype=torch.float32)}, "arena")
    assert served.manifest.checksum_algorithm == "xxh3_64+mxsum1"
    (spec,) = served.manifest.tensors
    xxh, mx = (spec.checksum or "").split("+")
    assert mx == mxsum(served.tensors["w"]) and len(xxh) == 16


def test_a_target_uses_the_best_algorithm_it_shares_and_never_claims_an_unshared_one() -> None:
    assert best_shared("xxh3_64+mxsum1", "cpu") == (0, "xxh3_64")
    assert best_shared("xxh3_64+mxsum1", "cuda:1") == (1, "mxsum1")
    assert best_shared("mxsum1", "cpu") == (0, "mxsum1")  # a GPU source, a CPU target
    assert best_shared("xxh3_64", "cuda:0") == (0, "xxh3_64")
    assert best_shared("blake9", "cpu") is None
    tensors = {"w": torch.arange(100, dtype=torch.float32)}
    manifest = plan_layout(IDENTITY, [("w", "F32", (100,))], LayoutSpec("arena"))
    for algorithms in (["xxh3_64", "mxsum1"], ["mxsum1"], ["xxh3_64"]):
        values = checksums(tensors, algorithms)
        specs = tuple(
            s.__class__(s.name, s.dtype, s.shape, s.region, s.offset, values[s.name])
            for s in manifest.tensors
        )
        signed = manifest.__class__(IDENTITY, specs, manifest.regions, "+".join(algorithms))
        assert bad_tensors(tensors, signed) == []
        altered = {"w": tensors["w"] + 1}
        assert bad_tensors(altered, signed) == ["w"]
    unknown = manifest.__class__(IDENTITY, specs, manifest.regions, "blake9")
    assert bad_tensors(tensors, unknown) is None  # unverified, not "verified"
    unsigned = manifest  # no checksums at all
    assert bad_tensors(tensors, unsigned) is None


def test_the_fused_copy_declines_host_tensors_and_unsigned_manifests_and_then_writes_nothing() -> None:
    """copy_checked is the GPU's one-kernel copy + mxsum1; where it cannot run it answers None and the
    destination is untouched, so the caller's plain copy-then-check path runs on pristine buffers."""
    manifest = plan_layout(IDENTITY, [("w", "F32", (100,))], LayoutSpec("arena"))
    source = {"w": torch.arange(100, dtype=torch.float32)}
    values = checksums(source, ["mxsum1"])
    specs = tuple(
        s.__class__(s.name, s.dtype, s.shape, s.region, s.offset, values[s.name]) for s in manifest.tensors
    )
    signed = manifest.__class__(IDENTITY, specs, manifest.regions, "mxsum1")
    for expected in (signed, manifest):
        into = {"w": torch.zeros(100, dtype=torch.float32)}
        assert copy_checked(source, into, expected) is None  # host tensors: the plain path copies
        assert int(into["w"].count_nonzero()) == 0
    assert copy_checked({}, {}, signed) is None


def test_host_buffers_of_2mib_or_more_are_hugepage_aligned_and_backed_where_thp_allows() -> None:
    manifest = plan_layout(
        IDENTITY, [("big", "U8", (8 << 20,)), ("small", "U8", (100,))], LayoutSpec("tensor")
    )
    buffers = allocate(manifest, "cpu", prefault=True)
    big, small = buffers.spans
    assert big[0] % (2 << 20) == 0
    buffers.tensors["big"].fill_(7)
    assert int(buffers.tensors["big"].sum()) == 7 * (8 << 20)
    mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    if "[never]" not in mode:
        huge_kb = _anon_huge_kb_at(big[0])
        assert huge_kb >= 2048, f"no hugepages behind the buffer (THP: {mode.strip()})"
    assert small[1] == 100


def _anon_huge_kb_at(address: int) -> int:
    text = Path("/proc/self/smaps").read_text()
    for block in re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", text):
        start, _, end = block.split(" ", 1)[0].partition("-")
        if int(start, 16) <= address < int(end, 16):
            match = re.search(r"AnonHugePages:\s+(\d+) kB", block)
            return int(match.group(1)) if match else 0
    raise AssertionError("address not mapped")


def test_host_memory_stays_valid_after_every_other_reference_is_gone() -> None:
    import gc

    tensor = _empty_bytes(4 << 20, torch.device("cpu"))
    gc.collect()
    tensor.fill_(1)
    assert int(tensor[-1]) == 1


@pytest.mark.parametrize("n", [0, 1, 4095, 4096, 4097])
def test_edge_sizes_match_the_reference(n: int) -> None:
    data = bytes(range(256)) * (n // 256 + 1)
    assert mxsum(as_tensor(data[:n])) == reference_mxsum(data[:n])
