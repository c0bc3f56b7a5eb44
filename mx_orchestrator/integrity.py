"""Integrity of landed bytes: the per-tensor checksum a source publishes and a target checks.

Checksums catch faults in transit and in memory; they are computed by the
source over its own bytes, so they say nothing about whether a source serves
the right weights (that needs a digest pinned by the caller).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import xxhash

from .models import Manifest

if TYPE_CHECKING:
    import torch

__all__ = ["bad_tensors", "checksum_tensor"]


def checksum_tensor(tensor: torch.Tensor) -> str:
    """xxh3-64 of a tensor's bytes (copied to the host first if it lives on a GPU)."""
    import torch

    flat = tensor.detach().reshape(-1).view(torch.uint8)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    return xxhash.xxh3_64_hexdigest(flat.numpy().data)


def bad_tensors(tensors: Mapping[str, torch.Tensor], expected: Manifest) -> list[str]:
    """Names of tensors whose checksum differs from ``expected``'s (empty: all good)."""
    return [
        spec.name
        for spec in expected.tensors
        if spec.checksum is not None and checksum_tensor(tensors[spec.name]) != spec.checksum
    ]
