"""Benchmark (GPU machines only, not CI): the shipped device kernels, bit for bit and at speed.

In one run, on one GPU:

* **agreement** (the fused copy's checksums and landed bytes too): the tree digest (``sha256t64k``) and ``mxsum1`` computed by the
  shipped kernels equal the host references (the plain definition of
  :func:`mx_orchestrator.digests.tree_digest_reference`, the numpy ``mxsum1``) on
  random sizes, odd storage offsets, every dtype width, empty and one-byte
  tensors, non-contiguous views, and many tensors in one launch;
* **rates** over 16 GiB (256 tensors of 64 MiB and one tensor of 16 GiB): the
  tree digest (launch, leaves back to the host, roots on the host's cores) and
  ``mxsum1``, and the fused copy + ``mxsum1`` (cuda_ipc's checksummed load), against a device-to-device copy of the same bytes measured beside
  them;
* **load cost** of the kernels in this fresh process (no compile: a shipped binary).

Prints one JSON object (and writes ``$OUT/gpu_digest.json`` when ``$OUT`` is set).

    python bench/gpu_digest.py [--gib 16] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

from mx_orchestrator._backends.cuda_kernels import kernels  # noqa: E402
from mx_orchestrator.digests import tree_digest_reference  # noqa: E402
from mx_orchestrator.integrity import _finish, mxsum, mxsum_many, tensor_digests  # noqa: E402
from mx_orchestrator.kernels import device_mxsum_terms  # noqa: E402


def host_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def cases(device: str) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    out: list[torch.Tensor] = []
    sizes = [0, 1, 3, 55, 56, 63, 64, 65, 4095, 4096, 4097, 65535, 65536, 65537, 3 * 65536 + 11, 1 << 20]
    sizes += [int(torch.randint(1, 3_000_000, (1,), generator=gen)) for _ in range(60)]
    for i, n in enumerate(sizes):
        base = torch.randint(0, 256, (n + 16,), dtype=torch.uint8, generator=gen).to(device)
        offset = i % 16  # odd storage offsets: not 16-, 4- or even 2-byte aligned
        out.append(base[offset : offset + n])
    for dtype in (torch.uint8, torch.int16, torch.bfloat16, torch.float32, torch.int64, torch.float64):
        width = torch.empty(0, dtype=dtype).element_size()
        raw = torch.randint(0, 256, (width * 70_001 + width,), dtype=torch.uint8, generator=gen).to(device)
        out.append(raw[width:].view(dtype))  # a storage offset of one element
        out.append(raw[: width * 4096].view(dtype).reshape(64, 64).t())  # not contiguous
    out.append(torch.zeros((), dtype=torch.float32, device=device))  # a scalar: 4 bytes
    return out


def agreement(device: str) -> dict[str, Any]:
    tensors = cases(device)
    expected_digests = [tree_digest_reference(host_bytes(t)).split(":")[1] for t in tensors]
    one_launch = tensor_digests(tensors)
    each_alone = [tensor_digests([t])[0] for t in tensors[:20]]
    expected_sums = [mxsum(t.cpu().contiguous()) for t in tensors]
    sums = mxsum_many(tensors)
    bad_digest = [i for i, (a, b) in enumerate(zip(one_launch, expected_digests, strict=True)) if a != b]
    bad_sum = [i for i, (a, b) in enumerate(zip(sums, expected_sums, strict=True)) if a != b]
    fused_sum, fused_bytes = fused_agreement(tensors, expected_sums)
    return {
        "tensors": len(tensors),
        "tree_digest_equal_to_reference": not bad_digest and each_alone == expected_digests[:20],
        "mxsum1_equal_to_host": not bad_sum,
        "fused_copy_mxsum1_equal_to_host": not fused_sum,
        "fused_copy_bytes_equal": not fused_bytes,
        "mismatched_fused": (fused_sum + fused_bytes)[:10],
        "mismatched_digests": bad_digest[:10],
        "mismatched_mxsum1": bad_sum[:10],
    }


def fused_agreement(tensors: list[torch.Tensor], expected: list[str]) -> tuple[list[int], list[int]]:
    """The fused copy + ``mxsum1`` kernel on every case: the checksum of what it moved equals the
    host's, the destination's bytes equal the source's (destinations at odd offsets too), and the
    guard bytes around each destination are untouched."""
    gen = torch.Generator().manual_seed(11)
    bad_sum: list[int] = []
    bad_bytes: list[int] = []
    sources = [t.contiguous().reshape(-1).view(torch.uint8) for t in tensors]
    outs, guards = [], []
    for i, src in enumerate(sources):
        offset = (i * 7) % 16
        guard = torch.randint(0, 256, (src.numel() + offset + 32,), dtype=torch.uint8, generator=gen)
        guards.append(guard.clone())
        outs.append(guard.to(src.device))
    into = [
        o[(i * 7) % 16 : (i * 7) % 16 + s.numel()] for i, (o, s) in enumerate(zip(outs, sources, strict=True))
    ]
    terms = device_mxsum_terms(sources, into)
    assert terms is not None, "no fused kernel on this GPU"
    for i, (src, row) in enumerate(zip(sources, terms, strict=True)):
        if _finish(src.numel(), row) != expected[i]:
            bad_sum.append(i)
        landed = outs[i].cpu()
        offset = (i * 7) % 16
        expect = guards[i].clone()
        expect[offset : offset + src.numel()] = src.cpu()
        if not torch.equal(landed, expect):
            bad_bytes.append(i)
    return bad_sum, bad_bytes


def timed(fn: Any, repeat: int) -> float:
    times = []
    for _ in range(repeat + 1):
        torch.cuda.synchronize()
        began = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
    return statistics.median(times[1:])


def kernels_only(tensors: list[torch.Tensor]) -> None:
    """The two tree kernels alone (leaves, then nodes; no copy back, no roots): the device's cost."""
    from mx_orchestrator.digests import chunk_count, node_count
    from mx_orchestrator.kernels import _table

    found = kernels(0)
    assert not isinstance(found, str), found
    flat = [t.view(torch.uint8) for t in tensors]
    sizes = [t.numel() for t in flat]
    table, (chunks, groups) = _table(flat, [chunk_count(n) for n in sizes], [node_count(n) for n in sizes])
    leaves = torch.empty(chunks * 32, dtype=torch.uint8, device=flat[0].device)
    nodes = torch.empty(groups * 32, dtype=torch.uint8, device=flat[0].device)
    base, count = table.data_ptr(), len(flat)
    stream = torch.cuda.current_stream().cuda_stream
    leaf_first, node_first = base + 16 * count, base + 24 * count + 8
    found.sha256t_leaves(base, base + 8 * count, leaf_first, count, chunks, leaves.data_ptr(), stream)
    found.sha256t_nodes(leaf_first, node_first, count, groups, leaves.data_ptr(), nodes.data_ptr(), stream)


def rates(device: str, gib: int, repeat: int) -> dict[str, Any]:
    per = 64 << 20
    many = [
        torch.randint(-(2**31), 2**31 - 1, (per // 4,), dtype=torch.int32, device=device)
        for _ in range(gib * 16)
    ]
    nbytes = sum(t.numel() * 4 for t in many)
    one = torch.cat(many)
    copy_to = torch.empty_like(one)
    copy_s = timed(lambda a=copy_to, b=one: a.copy_(b), repeat)
    out: dict[str, Any] = {
        "bytes": nbytes,
        "copy_gbps": round(nbytes / copy_s / 1e9, 1),
        "copy_ms": round(copy_s * 1e3, 2),
    }
    for label, tensors in (("256_tensors", many), ("one_tensor", [one])):
        tree_s = timed(lambda t=tensors: tensor_digests(t), repeat)
        leaves_s = timed(lambda t=tensors: kernels_only(t), repeat)
        sum_s = timed(lambda t=tensors: mxsum_many(t), repeat)
        into = [copy_to] if len(tensors) == 1 else list(copy_to.split(per // 4))
        fused_s = timed(lambda t=tensors, d=into: device_mxsum_terms(t, d), repeat)
        out[label] = {
            "tree_digest_ms": round(tree_s * 1e3, 2),
            "tree_digest_gbps": round(nbytes / tree_s / 1e9, 1),
            "tree_kernel_only_ms": round(leaves_s * 1e3, 2),
            "tree_kernel_only_gbps": round(nbytes / leaves_s / 1e9, 1),
            "mxsum1_ms": round(sum_s * 1e3, 2),
            "mxsum1_gbps": round(nbytes / sum_s / 1e9, 1),
            "fused_copy_mxsum1_ms": round(fused_s * 1e3, 2),
            "fused_copy_mxsum1_gbps": round(nbytes / fused_s / 1e9, 1),
            "fused_over_copy": round(fused_s / copy_s, 3),
        }
    del many, one, copy_to
    torch.cuda.empty_cache()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: bench/gpu_digest.py runs on GPU machines only")
    device = "cuda:0"
    torch.empty(1, device=device)  # the CUDA context, not the kernels' cost
    began = time.perf_counter()
    loaded = kernels(0)
    load_ms = (time.perf_counter() - began) * 1e3
    first = time.perf_counter()
    tensor_digests([torch.zeros(5000, dtype=torch.uint8, device=device)])
    first_ms = (time.perf_counter() - first) * 1e3
    out: dict[str, Any] = {
        "benchmark": "gpu_digest",
        "date": time.strftime("%Y-%m-%d"),
        "gpu": torch.cuda.get_device_name(0),
        "kernels": getattr(loaded, "binary", loaded),
        "kernel_load_ms": round(load_ms, 2),
        "first_digest_call_ms": round(first_ms, 2),
        "agreement": agreement(device),
        "rates": rates(device, args.gib, args.repeat),
    }
    text = json.dumps(out, indent=2)
    print(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_digest.json").write_text(text)


if __name__ == "__main__":
    main()
