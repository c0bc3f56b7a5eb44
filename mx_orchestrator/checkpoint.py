"""Checkpoints on disk: safetensors files, the index, and the manifest they describe.

One set of safety rules for every reader (the serving side reading
``--weights`` and ``hf_download`` reading what it fetched): file names from an
index stay inside the checkpoint (no absolute paths, no ``..``, no
backslashes or NUL), every file exists, a tensor name appears once across all
files, and every failure to read is a :class:`~mx_orchestrator.errors.CheckpointError`
that names the file.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
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
    """The content fingerprint of a checkpoint directory, and each tensor's dtype, shape and digest.

    What ``mxo fingerprint --weights DIR`` prints, and what ``mxo pull --expect``
    compares a source's manifest with. The files are memory-mapped and every
    tensor's chunks hashed where they lie, on every core: memory stays bounded
    (the page cache holds the bytes; this process only 32 bytes a 64 KiB chunk).
    """
    from .digests import TREE_ALGORITHM, tree_digests
    from .models import content_fingerprint

    files = safetensors_files(directory)
    shapes = tensor_shapes(files)  # safetensors' own checks, and no name twice across files
    if not shapes:  # nothing a source could serve (serve refuses it too): no pin of nothing
        raise CheckpointError(f"{directory}: the checkpoint holds no tensors")
    digest: dict[str, str] = {}
    for path in files:
        with path.open("rb") as f, _mapped(f) as data:
            spans = _data_spans(path, data)
            roots = tree_digests([data[begin:end] for begin, end in spans.values()])
            digest.update(zip(spans, (r.removeprefix(f"{TREE_ALGORITHM}:") for r in roots), strict=True))
    rows: dict[str, dict[str, object]] = {}
    for name, dtype, shape in shapes:
        rows[name] = {"dtype": dtype, "shape": list(shape), "digest": f"{TREE_ALGORITHM}:{digest[name]}"}
    return content_fingerprint((n, d, tuple(s), digest[n]) for n, d, s in shapes), rows


@contextlib.contextmanager
def _mapped(f: Any) -> Iterator[memoryview]:
    """The file's bytes, memory-mapped read-only (an empty file maps to no bytes)."""
    size = os.fstat(f.fileno()).st_size
    if not size:
        yield memoryview(b"")
        return
    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        view = memoryview(mapped)
        try:
            yield view
        finally:
            view.release()


def _data_spans(path: Path, data: memoryview) -> dict[str, tuple[int, int]]:
    """Each tensor's byte span in a safetensors file (already vetted by ``safe_open``), checked
    again here against the file's size before anything is hashed."""
    if len(data) < 8:
        raise CheckpointError(f"{path}: not a safetensors file (shorter than its header size)")
    header_size = int.from_bytes(data[:8], "little")
    start = 8 + header_size
    try:
        header = json.loads(bytes(data[8:start]))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable safetensors header ({exc})") from None
    spans: dict[str, tuple[int, int]] = {}
    for name, entry in header.items() if isinstance(header, dict) else ():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= len(data) - start
        ):
            raise CheckpointError(f"{path}: tensor {name!r:.80} has data offsets outside the file")
        spans[name] = (start + offsets[0], start + offsets[1])
    return spans
