"""The CUDA IPC edge: a source's device regions opened by another process on the same host.

The serving side exports one IPC handle per region (torch's own
``_share_cuda_``: the handle of the caching allocator's block, the offset in
it, the producer's reference counter and event) into a file only its user can
read (0600 in a 0700 directory under the temp dir); the record names the
file, the host and its boot id. A target on another host or boot cannot use
the handles, and a target of another user cannot read them: reading the file
is the proof of locality. Devices are named by UUID, since two processes may
number them differently (``CUDA_VISIBLE_DEVICES``).

A target opens each region (``_new_shared_cuda``: the memory is mapped into this
process, on the source's GPU) and copies device to device: on the same GPU, or
across GPUs with peer access. Failures map to outcome types here, once.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import socket
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..outcomes import LocalFailure, SourceUnreachable
from . import EdgeFailure

if TYPE_CHECKING:
    import torch

    from ..buffers import Buffers
    from ..models import Manifest

__all__ = ["IpcRegion", "export", "host_identity", "open_region", "read_export", "unexport"]

_MAX_EXPORT_BYTES = 16 << 20


def host_identity() -> dict[str, str]:
    """Hostname and boot id: two processes with the same pair share a kernel (and GPUs)."""
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot_id = ""
    return {"host": socket.gethostname(), "boot_id": boot_id}


@dataclass(frozen=True)
class IpcRegion:
    device_uuid: str
    handle: bytes
    storage_bytes: int
    storage_offset: int
    ref_handle: bytes
    ref_offset: int
    event_handle: bytes
    event_sync: bool
    #: where the region starts in the shared storage, and its size
    offset: int
    nbytes: int


def _b64(value: bytes | None) -> str:
    return base64.b64encode(value or b"").decode()


def _device_uuid(index: int) -> str:
    import torch

    return str(torch.cuda.get_device_properties(index).uuid)


def _directory() -> Path:
    path = Path(tempfile.gettempdir()) / f"mxo-ipc-{os.getuid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise EdgeFailure(LocalFailure, f"{path} is not a private directory of this user")
    return path


def export(buffers: Buffers, name: str) -> dict[str, str]:
    """Write the IPC handles of ``buffers``' regions to a private file; the record's advert of it."""
    regions = []
    for base, nbytes in buffers.spans:
        tensor = _owner_of(buffers, base)
        storage = tensor.untyped_storage()
        (device, handle, size, offset, ref_handle, ref_offset, event_handle, sync) = storage._share_cuda_()  # type: ignore[no-untyped-call]
        regions.append(
            {
                "device_uuid": _device_uuid(int(device)),
                "handle": _b64(handle),
                "storage_bytes": int(size),
                "storage_offset": int(offset),
                "ref_handle": _b64(ref_handle),
                "ref_offset": int(ref_offset),
                "event_handle": _b64(event_handle),
                "event_sync": bool(sync),
                "offset": base - storage.data_ptr(),
                "nbytes": nbytes,
            }
        )
    path = _directory() / f"{name}.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"regions": regions}, f)
    return {**host_identity(), "path": str(path)}


def unexport(advert: dict[str, str]) -> None:
    Path(advert["path"]).unlink(missing_ok=True)


def _owner_of(buffers: Buffers, base: int) -> torch.Tensor:
    """The tensor whose storage holds the region starting at ``base``."""
    for tensor in (*buffers.owners, *buffers.tensors.values()):
        storage = tensor.untyped_storage()
        if storage.data_ptr() <= base < storage.data_ptr() + storage.nbytes():
            return tensor
    raise AssertionError(f"no tensor owns region {base:#x}")  # buffers built by buffers.py always have one


def read_export(advert: Any, manifest: Manifest) -> list[IpcRegion] | str:
    """The regions a record's advert points at, validated against its manifest; a string says why not."""
    if not isinstance(advert, dict) or not all(
        isinstance(advert.get(k), str) for k in ("host", "boot_id", "path")
    ):
        return "the record advertises no CUDA IPC export"
    path = Path(advert["path"])
    try:
        if path.stat().st_size > _MAX_EXPORT_BYTES:
            return "the CUDA IPC export is oversized"
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return f"the CUDA IPC export cannot be read: {exc}"
    rows = data.get("regions") if isinstance(data, dict) else None
    if not isinstance(rows, list) or len(rows) != len(manifest.regions):
        return "the CUDA IPC export does not match the manifest's regions"
    regions = []
    ints = ("storage_bytes", "storage_offset", "ref_offset", "offset", "nbytes")
    for i, row in enumerate(rows):
        try:
            values = {k: row[k] for k in ints}
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values.values()):
                return f"region {i} of the CUDA IPC export is malformed"
            region = IpcRegion(
                device_uuid=str(row["device_uuid"]),
                handle=base64.b64decode(row["handle"], validate=True),
                ref_handle=base64.b64decode(row["ref_handle"], validate=True),
                event_handle=base64.b64decode(row["event_handle"], validate=True),
                event_sync=bool(row["event_sync"]),
                **values,
            )
        except (KeyError, TypeError, binascii.Error, ValueError):
            return f"region {i} of the CUDA IPC export is malformed"
        if (
            region.nbytes != manifest.regions[i].nbytes
            or region.offset + region.nbytes > region.storage_bytes
        ):
            return f"region {i} of the CUDA IPC export lies outside its storage"
        regions.append(region)
    return regions


def local_device_of(uuid: str) -> int | None:
    import torch

    for index in range(torch.cuda.device_count()):
        if _device_uuid(index) == uuid:
            return index
    return None


def open_region(region: IpcRegion) -> torch.Tensor:
    """The source's region as a uint8 tensor mapped into this process (on the source's GPU)."""
    import torch

    device = local_device_of(region.device_uuid)
    if device is None:
        raise EdgeFailure(SourceUnreachable, f"the source's GPU {region.device_uuid} is not visible here")
    if region.nbytes == 0:
        return torch.empty(0, dtype=torch.uint8, device=f"cuda:{device}")
    try:
        storage = torch.UntypedStorage._new_shared_cuda(
            device,
            region.handle,
            region.storage_bytes,
            region.storage_offset,
            region.ref_handle,
            region.ref_offset,
            region.event_handle,
            region.event_sync,
        )
    except RuntimeError as exc:  # cudaIpcOpenMemHandle refused: the source is gone, or another boot
        raise EdgeFailure(SourceUnreachable, f"cannot open the CUDA IPC handle: {exc}") from exc
    whole = torch.empty(0, dtype=torch.uint8, device=f"cuda:{device}").set_(storage)
    return whole[region.offset : region.offset + region.nbytes]
