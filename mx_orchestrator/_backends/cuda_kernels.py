"""The device kernels' edge: the only module that imports ``cuda.bindings`` (NVIDIA's CUDA driver API).

The kernels (``mx_orchestrator/_kernels/digests.cu``) are built ahead of time
(``scripts/build_kernels``, NVRTC) into a cubin per GPU architecture and PTX for
later ones, and ship in the package: a process loads the binary into its GPU's
context (about a millisecond) and never compiles anything, so a user needs no
``nvcc`` and a first verified load pays no JIT (issue 23). Why not Triton,
which torch already brings: its kernels compile in every fresh process
(0.7 s with a warm disk cache, measured), and an ahead-of-time build of a
per-thread SHA-256 is what CUDA C says plainly.

:func:`kernels` answers a :class:`Kernels` for a device, or a sentence saying
why there is none (no ``cuda-bindings``, a ROCm build, an architecture older
than the binaries, a driver that refuses them); callers then take the host
path and say so. Launches go to torch's current stream of the device, so they
are ordered after the copies that landed the bytes.
"""

from __future__ import annotations

import ctypes
import json
import threading
from dataclasses import dataclass
from importlib import resources
from typing import Any

__all__ = ["Kernels", "kernels"]

_PTR = ctypes.c_void_p
_U64 = ctypes.c_uint64
_INT = ctypes.c_int


@dataclass(frozen=True)
class Kernels:
    """The loaded kernels of one device (the module stays loaded for the process's life)."""

    device: int
    binary: str  #: which shipped file runs ("sm_90 cubin", "compute_80 PTX")
    _functions: dict[str, Any]
    _image: Any  # the bytes the driver was handed, kept alive with the module

    def sha256t_leaves(
        self, ptrs: int, sizes: int, first: int, count: int, total: int, leaves: int, stream: int
    ) -> None:
        """SHA-256 of every 64 KiB chunk of ``count`` tensors (device arrays of u64), into ``leaves``."""
        threads = 128
        self._launch(
            "sha256t_leaves",
            (-(-total // threads), threads),
            ((ptrs, _PTR), (sizes, _PTR), (first, _PTR), (count, _INT), (total, _U64), (leaves, _PTR)),
            stream,
        )

    def sha256t_nodes(
        self, leaf_first: int, node_first: int, count: int, total: int, leaves: int, nodes: int, stream: int
    ) -> None:
        """SHA-256 of every run of up to 1,024 leaves of each of ``count`` tensors, into ``nodes``."""
        threads = 64
        self._launch(
            "sha256t_nodes",
            (-(-total // threads), threads),
            (
                (leaf_first, _PTR),
                (node_first, _PTR),
                (count, _INT),
                (total, _U64),
                (leaves, _PTR),
                (nodes, _PTR),
            ),
            stream,
        )

    def mxsum1_partials(
        self,
        ptrs: int,
        sizes: int,
        first: int,
        count: int,
        total: int,
        run: int,
        scalars: int,
        columns: int,
        stream: int,
        dsts: int | None = None,
    ) -> None:
        """``mxsum1``'s per-tensor sums over ``total`` 4 KiB blocks, a warp per ``run`` blocks; with
        ``dsts`` (a device array of addresses), each tensor is also copied there as it is read."""
        threads = 256
        warps = -(-total // run)
        head = ((ptrs, _PTR),) if dsts is None else ((ptrs, _PTR), (dsts, _PTR))
        self._launch(
            "mxsum1_partials" if dsts is None else "mxsum1_copy_partials",
            (-(-warps * 32 // threads), threads),
            (
                *head,
                (sizes, _PTR),
                (first, _PTR),
                (count, _INT),
                (total, _U64),
                (run, _U64),
                (scalars, _PTR),
                (columns, _PTR),
            ),
            stream,
        )

    def _launch(
        self, name: str, shape: tuple[int, int], args: tuple[tuple[int, Any], ...], stream: int
    ) -> None:
        from cuda.bindings import driver

        values = tuple(v for v, _ in args)
        types = tuple(t for _, t in args)
        blocks, threads = shape
        (err,) = driver.cuLaunchKernel(
            self._functions[name], blocks, 1, 1, threads, 1, 1, 0, stream, (values, types), 0
        )
        if err != driver.CUresult.CUDA_SUCCESS:
            raise RuntimeError(f"{name} on cuda:{self.device}: {err.name}")


_LOADED: dict[int, Kernels | str] = {}
_LOCK = threading.Lock()
_NAMES = ("sha256t_leaves", "sha256t_nodes", "mxsum1_partials", "mxsum1_copy_partials")


def kernels(device: int) -> Kernels | str:
    """The kernels loaded on CUDA device ``device``, or why there are none (cached per process)."""
    with _LOCK:
        found = _LOADED.get(device)
        if found is None:
            found = _LOADED[device] = _load(device)
        return found


def _load(device: int) -> Kernels | str:
    import torch

    if getattr(torch.version, "hip", None):
        return "no device digest kernel for ROCm"
    try:
        from cuda.bindings import driver
    except ImportError:
        return "cuda-bindings is not installed (pip install 'mx-orchestrator[gpu]')"
    major, minor = torch.cuda.get_device_capability(device)
    chosen = _binary_for(major, minor)
    if chosen is None:
        return f"compute capability {major}.{minor} predates the shipped kernels"
    arch, filename = chosen
    image = (resources.files("mx_orchestrator") / "_kernels" / filename).read_bytes()
    if filename.endswith(".ptx"):
        image += b"\x00"  # the driver reads PTX as a C string
    buffer = ctypes.create_string_buffer(image, len(image))
    with torch.cuda.device(device):
        torch.cuda.current_stream(device)  # makes the device's primary context current in this thread
        torch.empty(1, device=f"cuda:{device}")
        err, module = driver.cuModuleLoadData(ctypes.addressof(buffer))
        if err != driver.CUresult.CUDA_SUCCESS:
            return f"the driver refused the {arch} kernels ({err.name})"
        functions = {}
        for name in _NAMES:
            err, function = driver.cuModuleGetFunction(module, name.encode())
            if err != driver.CUresult.CUDA_SUCCESS:
                return f"the {arch} kernels lack {name} ({err.name})"
            functions[name] = function
    kind = "PTX" if filename.endswith(".ptx") else "cubin"
    return Kernels(device, f"{arch} {kind}", functions, buffer)


def _binary_for(major: int, minor: int) -> tuple[str, str] | None:
    """The shipped binary for a compute capability: a cubin of the same major and at most its minor
    (SASS runs on later minors of its major), else PTX the driver translates once and caches."""
    listing = json.loads((resources.files("mx_orchestrator") / "_kernels" / "digests.json").read_text())
    files: dict[str, str] = listing["files"]
    cubins = []
    for arch in files:
        if arch.startswith("sm_"):
            number = int(arch[3:])
            if number // 10 == major and number % 10 <= minor:
                cubins.append((number, arch))
    if cubins:
        arch = max(cubins)[1]
        return arch, files[arch]
    ptx = [(int(a.split("_")[1]), a) for a in files if a.startswith("compute_")]
    usable = [p for p in ptx if p[0] <= major * 10 + minor]
    if not usable:
        return None
    arch = max(usable)[1]
    return arch, files[arch]
