"""Checkpoints on disk: safetensors files, the index, and the manifest they describe.

One set of safety rules for every reader (the serving side reading
``--weights`` and ``hf_download`` reading what it fetched): file names from an
index stay inside the checkpoint (no absolute paths, no ``..``, no
backslashes or NUL), every file exists, a tensor name appears once across all
files, and every failure to read is a :class:`~mx_orchestrator.errors.CheckpointError`
that names the file.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from .errors import CheckpointError, ConfigError
from .layout import LayoutSpec, TensorShape, plan_layout
from .models import DTYPES, Manifest, ModelIdentity

if TYPE_CHECKING:
    import torch

__all__ = [
    "INDEX_NAME",
    "fingerprint_directory",
    "manifest_from_files",
    "read_index",
    "read_tensors",
    "safe_relative_path",
    "safetensors_files",
    "save_checkpoint",
    "tensor_shapes",
]

INDEX_NAME = "model.safetensors.index.json"


def safe_relative_path(path: str) -> str | None:
    """``path`` if it stays inside its root, else ``None`` (absolute, ``..``, backslashes, NUL)."""
    if not path or "\\" in path or "\x00" in path or "//" in path or path.startswith("/"):
        return None
    parts = PurePosixPath(path).parts
    if any(part in ("..", "") for part in parts) or ":" in parts[0]:
        return None
    return path


def read_index(index: Path) -> list[str]:
    """The shard files an index names (relative to its directory, in first-use order), vetted."""
    try:
        data = json.loads(index.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{index}: not a readable JSON index ({exc})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError(f"{index}: 'weight_map' must map tensor names to file names")
    names = list(dict.fromkeys(weight_map.values()))
    if not names:
        raise CheckpointError(f"{index}: the weight map is empty")
    for name in names:
        if safe_relative_path(name) is None:
            raise CheckpointError(f"{index}: names a file outside the checkpoint: {name!r:.120}")
    return names


def safetensors_files(directory: Path) -> list[Path]:
    """The checkpoint's files in order: from ``model.safetensors.index.json`` when present."""
    if not directory.is_dir():
        raise ConfigError(f"weights directory {str(directory)!r} does not exist")
    index = directory / INDEX_NAME
    if index.is_file():
        files = [directory / name for name in read_index(index)]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index}: names files that do not exist, e.g. {missing[:3]}")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"no *.safetensors files in {str(directory)!r}")
    for path in files:  # a FIFO or a device would block the reader, or never end
        if not path.is_file():
            raise CheckpointError(f"{path}: not a regular file")
    return files


def _open(path: Path) -> Any:
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None


def _each_tensor(paths: Sequence[Path]) -> Iterator[tuple[Path, Any, str]]:
    """(file, open handle, tensor name) for every tensor, refusing a name seen twice."""
    seen: dict[str, Path] = {}
    for path in paths:
        with _open(path) as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                if name in seen:
                    raise CheckpointError(f"{path}: tensor {name!r} also appears in {seen[name]}")
                seen[name] = path
                yield path, f, name


def tensor_shapes(paths: Sequence[Path]) -> list[TensorShape]:
    """``(name, dtype, shape)`` of every tensor in ``paths``, read from the headers only."""
    from safetensors import SafetensorError

    rows: list[TensorShape] = []
    for path, f, name in _each_tensor(paths):
        try:
            sl = f.get_slice(name)
            dtype, shape = str(sl.get_dtype()), tuple(int(d) for d in sl.get_shape())
        except (SafetensorError, ValueError) as exc:
            raise CheckpointError(f"{path}: tensor {name!r} cannot be read ({exc})") from None
        if dtype not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        rows.append((name, dtype, shape))
    return rows


def manifest_from_files(identity: ModelIdentity, paths: Sequence[Path]) -> Manifest:
    """The arena manifest of the tensors in ``paths`` (no checksums: nothing was read yet)."""
    return plan_layout(identity, tensor_shapes(paths), LayoutSpec("arena"))


def read_tensors(paths: Sequence[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of ``paths`` (name, CPU tensor), one at a time."""
    from safetensors import SafetensorError

    for path, f, name in _each_tensor(paths):
        try:
            tensor = f.get_tensor(name)
        except (SafetensorError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{path}: tensor {name!r} cannot be read ({exc})") from None
        yield name, tensor


def save_checkpoint(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    """Write ``tensors`` (any device) as one safetensors file at ``path``."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    host = {name: t.detach().cpu().contiguous().clone() for name, t in tensors.items()}
    save_file(host, str(path), metadata={"format": "pt"})


def fingerprint_directory(directory: Path) -> tuple[str, dict[str, dict[str, object]]]:
    """The content fingerprint of a checkpoint directory, and each tensor's dtype, shape and SHA-256.

    What ``mxo fingerprint --weights DIR`` prints, and what ``mxo pull --expect``
    compares a source's manifest with.
    """
    from .integrity import tensor_digest
    from .models import content_fingerprint, dtype_name

    rows: dict[str, dict[str, object]] = {}
    pinned: list[tuple[str, str, tuple[int, ...], str]] = []
    for name, tensor in read_tensors(safetensors_files(directory)):
        dtype, shape, digest = dtype_name(tensor.dtype), tuple(tensor.shape), tensor_digest(tensor)
        rows[name] = {"dtype": dtype, "shape": list(shape), "sha256": digest}
        pinned.append((name, dtype, shape, digest))
    if not pinned:  # nothing a source could serve (serve refuses it too): no pin of nothing
        raise CheckpointError(f"{directory}: the checkpoint holds no tensors")
    return content_fingerprint(pinned), rows
