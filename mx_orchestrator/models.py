"""Core value types: model identity, tensor specs, regions, manifests, source records, candidates.

Everything here is immutable and validated on construction. Manifests and
records usually arrive from other processes, so every constructor treats its
input as untrusted: sizes, counts, dtypes and names are checked and a
:class:`~mx_orchestrator.errors.ManifestError` says precisely what is wrong.
"""

from __future__ import annotations

import enum
import hashlib
import itertools
import json
import math
import re
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

from .digests import TREE_ALGORITHM
from .errors import ConfigError, ManifestError

if TYPE_CHECKING:
    import torch

__all__ = [
    "DTYPES",
    "DEFAULT_MAX_LEASE",
    "DTYPE_SIZES",
    "MAX_MANIFEST_BYTES",
    "MAX_REGIONS",
    "MAX_TENSORS",
    "Candidate",
    "Manifest",
    "ModelIdentity",
    "Region",
    "SourceRecord",
    "SourceState",
    "StoredManifest",
    "TensorSpec",
    "content_differences",
    "DIGEST_ALGORITHM",
    "check_pin",
    "content_fingerprint",
    "dtype_name",
    "torch_dtype",
]

#: The one dtype table: safetensors' name -> (element size in bytes, torch dtype attribute).
DTYPES: Mapping[str, tuple[int, str]] = {
    "BOOL": (1, "bool"),
    "U8": (1, "uint8"),
    "I8": (1, "int8"),
    "F8_E4M3": (1, "float8_e4m3fn"),
    "F8_E5M2": (1, "float8_e5m2"),
    "I16": (2, "int16"),
    "U16": (2, "uint16"),
    "F16": (2, "float16"),
    "BF16": (2, "bfloat16"),
    "I32": (4, "int32"),
    "U32": (4, "uint32"),
    "F32": (4, "float32"),
    "I64": (8, "int64"),
    "U64": (8, "uint64"),
    "F64": (8, "float64"),
}
#: Element sizes of the dtypes a manifest may name, derived from :data:`DTYPES`.
DTYPE_SIZES: Mapping[str, int] = {name: size for name, (size, _) in DTYPES.items()}

# Bounds on untrusted manifests. Generous for real checkpoints (a 405B model has
# a few thousand tensors per shard) and small enough that a hostile peer cannot
# make a target allocate or hash without limit.
MAX_TENSORS = 262_144
MAX_REGIONS = MAX_TENSORS  # a tensor layout has one region per tensor: the limits agree
MAX_DIMS = 16
MAX_NAME_LENGTH = 1024
MAX_TOTAL_BYTES = 1 << 50  # 1 PiB
MAX_MANIFEST_BYTES = 64 << 20  # serialised JSON

_SHA256 = re.compile(r"[0-9a-f]{64}")
#: what this version's sources publish as each tensor's digest, and what a content pin commits to
DIGEST_ALGORITHM = TREE_ALGORITHM
#: a stored manifest's name: ``mxm1-`` + SHA-256 of its canonical (uncompressed) form
MANIFEST_KEY = re.compile(r"mxm1-[0-9a-f]{64}")
_STORED_MAGIC = b"MXM1"
_MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-/]{0,199}$")
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-/]{0,99}$")


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name (``F32`` -> ``torch.float32``)."""
    import torch

    return getattr(torch, DTYPES[name][1])  # type: ignore[no-any-return]


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype; :class:`ConfigError` for one a manifest cannot carry."""
    wanted = str(dtype).removeprefix("torch.")
    for name, (_, attr) in DTYPES.items():
        if attr == wanted:
            return name
    raise ConfigError(f"unsupported tensor dtype {dtype}")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ManifestError(message)


def _fail(message: str) -> None:
    raise ManifestError(message)


def _parse_json(text: str | bytes, what: str) -> Any:
    """Untrusted JSON, or :class:`ManifestError` saying ``what`` is not valid JSON."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ManifestError(f"{what} is not valid JSON: {exc}") from None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True)
class ModelIdentity:
    """What a target wants: one shard of one revision of one model.

    Two processes with equal identities hold interchangeable weights *by name*;
    whether their memory layouts match is a separate question (the layout
    fingerprint of their manifests).
    """

    model_id: str
    revision: str = "main"
    shard_rank: int = 0
    shard_count: int = 1

    def __post_init__(self) -> None:
        _require(
            isinstance(self.model_id, str) and bool(_MODEL_ID.match(self.model_id)),
            f"invalid model id {self.model_id!r}: expected ORG/NAME of letters, digits, '._-/'",
        )
        _require(
            isinstance(self.revision, str) and bool(_REVISION.match(self.revision)),
            f"invalid revision {self.revision!r}",
        )
        _require(
            _is_int(self.shard_count) and 1 <= self.shard_count <= 65_536,
            f"shard_count must be in 1..65536, got {self.shard_count!r}",
        )
        _require(
            _is_int(self.shard_rank) and 0 <= self.shard_rank < self.shard_count,
            f"shard_rank must be in 0..{self.shard_count - 1}, got {self.shard_rank!r}",
        )

    @property
    def key(self) -> str:
        """Stable registry key: equal identities, equal keys, in every process."""
        return f"{self.model_id}@{self.revision}#{self.shard_rank}of{self.shard_count}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "revision": self.revision,
            "shard_rank": self.shard_rank,
            "shard_count": self.shard_count,
        }

    @classmethod
    def from_dict(cls, data: Any) -> ModelIdentity:
        _require(isinstance(data, Mapping), "identity must be an object")
        try:
            return cls(
                model_id=data["model_id"],
                revision=data.get("revision", "main"),
                shard_rank=data.get("shard_rank", 0),
                shard_count=data.get("shard_count", 1),
            )
        except KeyError as exc:
            raise ManifestError(f"identity lacks {exc.args[0]!r}") from None


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One tensor: its name, dtype and shape, and where it lives (region, byte offset)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    region: int = 0
    offset: int = 0
    checksum: str | None = None
    #: SHA-256 of the tensor's bytes (what a content pin commits to), when the source computed it
    digest: str | None = None

    def __post_init__(self) -> None:
        # the hot path of every manifest a target parses (90,000 tensors in a large MoE): each
        # check is one cheap test, and its message is formatted only when it fails
        name, shape = self.name, self.shape
        if not (isinstance(name, str) and 0 < len(name) <= MAX_NAME_LENGTH):
            _fail(f"tensor name must be 1..{MAX_NAME_LENGTH} characters, got {name!r:.80}")
        if not name.isprintable():
            _fail(f"tensor name {name!r:.80} has control characters")
        digest = self.digest
        if digest is not None and not (isinstance(digest, str) and _SHA256.fullmatch(digest) is not None):
            _fail(f"tensor {name!r:.80}: digest must be 64 lowercase hex digits")
        if self.dtype not in DTYPE_SIZES:
            _fail(f"tensor {name!r}: unknown dtype {self.dtype!r}")
        if not (
            isinstance(shape, tuple)
            and len(shape) <= MAX_DIMS
            and all(type(d) is int and d >= 0 for d in shape)  # bool is not int here
        ):
            _fail(
                f"tensor {name!r}: shape must be at most {MAX_DIMS} non-negative integers, got {shape!r:.80}"
            )
        if self.nbytes > MAX_TOTAL_BYTES:
            _fail(f"tensor {name!r}: {self.nbytes} bytes exceeds the limit")
        if not (type(self.region) is int and self.region >= 0):
            _fail(f"tensor {name!r}: region must be a non-negative integer")
        if not (type(self.offset) is int and self.offset >= 0):
            _fail(f"tensor {name!r}: offset must be a non-negative integer")
        checksum = self.checksum
        if checksum is not None and not (isinstance(checksum, str) and len(checksum) <= 128):
            _fail(f"tensor {name!r}: checksum must be a short string")

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]

    @property
    def end(self) -> int:
        return self.offset + self.nbytes

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "region": self.region,
            "offset": self.offset,
        }
        if self.checksum is not None:
            data["checksum"] = self.checksum
        if self.digest is not None:
            data["digest"] = self.digest
        return data

    @classmethod
    def from_dict(cls, data: Any) -> TensorSpec:
        _require(isinstance(data, Mapping), "tensor entry must be an object")
        shape = data.get("shape")
        _require(isinstance(shape, list), f"tensor {data.get('name')!r:.80}: shape must be a list")
        return cls(
            name=data.get("name"),  # validated in __post_init__
            dtype=data.get("dtype"),
            shape=tuple(shape),
            region=data.get("region", 0),
            offset=data.get("offset", 0),
            checksum=data.get("checksum"),
            digest=data.get("digest"),
        )


def content_fingerprint(tensors: Iterable[tuple[str, str, tuple[int, ...], str]]) -> str:
    """``mxc2-`` + SHA-256 over every ``(name, dtype, shape, tree digest)``, order-insensitive.

    A cryptographic commitment to what the weights are: a source cannot publish
    a manifest with this fingerprint and other digests, names, dtypes or shapes.
    The digests are :data:`~mx_orchestrator.digests.TREE_ALGORITHM` roots (hex),
    named in every line, so the pin says what it commits to. ``mxc1-`` pins
    (a flat SHA-256 per tensor, before issue 23) are refused where pins are read.
    """
    h = hashlib.sha256(b"mxc2\n")
    for name, dtype, shape, digest in sorted(tensors):
        h.update(f"{name}\t{dtype}\t{','.join(map(str, shape))}\t{DIGEST_ALGORITHM}:{digest}\n".encode())
    return f"mxc2-{h.hexdigest()}"


_PIN = re.compile(r"mxc2-[0-9a-f]{64}")


def check_pin(expect: str) -> str:
    """``expect`` if it is a content fingerprint this version checks (``mxc2-<64 hex>``).

    Raises :class:`ConfigError` otherwise; an ``mxc1-`` pin (flat SHA-256 digests,
    which no source of this version publishes) is refused with how to get its
    successor, never silently compared against digests of another definition.
    """
    if isinstance(expect, str) and _PIN.fullmatch(expect):
        return expect
    if isinstance(expect, str) and re.fullmatch(r"mxc1-[0-9a-f]{64}", expect):
        raise ConfigError(
            "expect: mxc1- pins (a flat SHA-256 per tensor) are no longer checked; "
            "run `mxo fingerprint` on the same weights for their mxc2- pin"
        )
    raise ConfigError(f"expect must be a content fingerprint (mxc2-<64 hex>), got {expect!r:.80}")


def content_differences(a: Manifest, b: Manifest) -> list[str]:
    """The tensors whose published content differs between ``a`` and ``b``, in ``a``'s order.

    For manifests of the same names, dtypes and shapes: two revisions of one
    model (a fine-tune, a roll-out in progress) look alike until their digests
    or checksums are compared. Digests are compared where both have one;
    checksums value by value under every algorithm both name. Sources that
    publish no comparable value are not told apart (and their bytes are
    checked against their own checksums as they land).
    """
    algorithms_a = a.checksum_algorithm.split("+")
    algorithms_b = b.checksum_algorithm.split("+")
    shared = [(i, algorithms_b.index(n)) for i, n in enumerate(algorithms_a) if n in algorithms_b]
    theirs = b.by_name()
    comparable_digests = a.digest_algorithm == b.digest_algorithm
    differing: list[str] = []
    for spec in a.tensors:
        other = theirs.get(spec.name)
        if other is None:
            continue
        digests_differ = spec.digest is not None and other.digest is not None and spec.digest != other.digest
        if comparable_digests and digests_differ:
            differing.append(spec.name)
            continue
        if spec.checksum is None or other.checksum is None or not shared:
            continue
        mine, yours = spec.checksum.split("+"), other.checksum.split("+")
        if any(
            i < len(mine) and j < len(yours) and mine[i] and yours[j] and mine[i] != yours[j]
            for i, j in shared
        ):
            differing.append(spec.name)
    return differing


@dataclass(frozen=True, slots=True)
class Region:
    """One contiguous, separately registered block of memory."""

    nbytes: int

    def __post_init__(self) -> None:
        _require(
            _is_int(self.nbytes) and 0 <= self.nbytes <= MAX_TOTAL_BYTES,
            f"region size must be in 0..{MAX_TOTAL_BYTES}, got {self.nbytes!r:.40}",
        )


def _digest(parts: Iterable[str]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode())
        h.update(b"\x00")
    return h.hexdigest()[:32]


@dataclass(frozen=True)
class Manifest:
    """What a source holds and how it is laid out in memory.

    Validation guarantees, for any manifest that constructs: names are unique,
    every tensor lies entirely inside its region, tensors in one region do not
    overlap, and counts and sizes are within the module's limits. Code that
    plans transfers from a manifest may rely on these facts.
    """

    identity: ModelIdentity
    tensors: tuple[TensorSpec, ...]
    regions: tuple[Region, ...]
    checksum_algorithm: str = "xxh3_64"
    #: what every ``TensorSpec.digest`` is: :data:`DIGEST_ALGORITHM` for this version; a manifest
    #: of an older source (flat ``sha256``) decodes, but has no content fingerprint
    digest_algorithm: str = DIGEST_ALGORITHM

    def __post_init__(self) -> None:
        _require(isinstance(self.identity, ModelIdentity), "manifest identity missing")
        _require(
            len(self.tensors) <= MAX_TENSORS,
            f"manifest lists {len(self.tensors)} tensors; the limit is {MAX_TENSORS}",
        )
        _require(
            len(self.regions) <= MAX_REGIONS,
            f"manifest lists {len(self.regions)} regions; the limit is {MAX_REGIONS}",
        )
        _require(
            sum(r.nbytes for r in self.regions) <= MAX_TOTAL_BYTES,
            "manifest regions exceed the total size limit",
        )
        seen: set[str] = set()
        # per region: (offset, end, name) of each tensor; messages are formatted only on failure
        by_region: dict[int, list[tuple[int, int, str]]] = {}
        regions = self.regions
        for spec in self.tensors:
            name, region, offset = spec.name, spec.region, spec.offset
            if name in seen:
                _fail(f"duplicate tensor name {name!r}")
            seen.add(name)
            if region >= len(regions):
                _fail(f"tensor {name!r} names region {region}, but the manifest has {len(regions)} regions")
            end = offset + spec.nbytes
            if end > regions[region].nbytes:
                _fail(
                    f"tensor {name!r} spans bytes {offset}..{end} "
                    f"outside region {region} of {regions[region].nbytes} bytes"
                )
            by_region.setdefault(region, []).append((offset, end, name))
        for region, spans in by_region.items():
            spans.sort()
            for (b_offset, b_end, b_name), (a_offset, a_end, a_name) in itertools.pairwise(spans):
                if a_offset < b_end and b_end != b_offset and a_end != a_offset:
                    _fail(f"tensors {b_name!r} and {a_name!r} overlap in region {region}")

    # -- derived facts (computed once per manifest: one may be 90,000 tensors) --

    @cached_property
    def total_bytes(self) -> int:
        return sum(spec.nbytes for spec in self.tensors)

    @cached_property
    def manifest_fingerprint(self) -> str:
        """Hash of what the weights *are*: names, dtypes, shapes (order-insensitive)."""
        return _digest(
            f"{s.name}|{s.dtype}|{','.join(map(str, s.shape))}"
            for s in sorted(self.tensors, key=lambda s: s.name)
        )

    @cached_property
    def content_key(self) -> str:
        """Hash of what the weights are *and hold*, as published: names, dtypes, shapes, digests and
        checksums (their algorithms named). Two revisions with the same shapes differ here, which
        :attr:`manifest_fingerprint` cannot tell; sources that publish other checksum algorithms
        for the same bytes differ here too (what a load reads is decided by
        :func:`content_differences`, which compares only what both publish)."""
        return (
            _digest(
                f"{s.name}|{s.dtype}|{','.join(map(str, s.shape))}|{s.digest or ''}|{s.checksum or ''}"
                for s in sorted(self.tensors, key=lambda s: s.name)
            )
            + _digest([self.checksum_algorithm, self.digest_algorithm])[:8]
        )

    @cached_property
    def layout_fingerprint(self) -> str:
        """Hash of *where* they are: region count, sizes and which tensor sits where."""
        parts = [f"regions={len(self.regions)}"]
        parts.extend(f"r{i}={r.nbytes}" for i, r in enumerate(self.regions))
        parts.extend(
            f"{s.name}@{s.region}+{s.offset}"
            for s in sorted(self.tensors, key=lambda s: (s.region, s.offset, s.name))
        )
        return _digest(parts)

    @cached_property
    def content_fingerprint(self) -> str | None:
        """The content pin of these weights: names, dtypes, shapes and every tensor's tree digest.

        ``None`` when a tensor has no digest or the digests are of another algorithm
        (an older source's flat SHA-256). Computed by :func:`content_fingerprint`,
        the same function ``mxo fingerprint`` uses on a checkpoint directory.
        """
        if self.digest_algorithm != DIGEST_ALGORITHM or any(s.digest is None for s in self.tensors):
            return None
        return content_fingerprint((s.name, s.dtype, s.shape, s.digest or "") for s in self.tensors)

    def by_name(self) -> dict[str, TensorSpec]:
        return {spec.name: spec for spec in self.tensors}

    # -- (de)serialisation ----------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "identity": self.identity.to_dict(),
            "checksum_algorithm": self.checksum_algorithm,
            "digest_algorithm": self.digest_algorithm,
            "regions": [r.nbytes for r in self.regions],
            "tensors": [s.to_dict() for s in self.tensors],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Any) -> Manifest:
        _require(isinstance(data, Mapping), "manifest must be a JSON object")
        regions = data.get("regions")
        tensors = data.get("tensors")
        _require(isinstance(regions, list), "manifest 'regions' must be a list of sizes")
        _require(isinstance(tensors, list), "manifest 'tensors' must be a list")
        _require(len(tensors) <= MAX_TENSORS, f"manifest lists more than {MAX_TENSORS} tensors")
        _require(len(regions) <= MAX_REGIONS, f"manifest lists more than {MAX_REGIONS} regions")
        algorithm, digests = _algorithms(data)
        return cls(
            identity=ModelIdentity.from_dict(data.get("identity")),
            tensors=tuple(TensorSpec.from_dict(t) for t in tensors),
            regions=tuple(Region(n) for n in regions),
            checksum_algorithm=algorithm,
            digest_algorithm=digests,
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        _require(len(text) <= MAX_MANIFEST_BYTES, "manifest exceeds the size limit")
        return cls.from_dict(_parse_json(text, "manifest"))

    # -- the stored form: content-addressed, columnar, compressed ---------------

    @cached_property
    def stored(self) -> StoredManifest:
        """This manifest as registries store it: named by the hash of its canonical form, so a
        registry keeps one copy however many sources share it and a target parses each once.

        Canonical form: one JSON object of columns (names, dtypes, shapes, regions,
        offsets, checksums, digests), compact separators; the key hashes those bytes;
        the blob is ``MXM1`` + zlib of them. Computed once per manifest object.
        """
        specs = self.tensors
        columns = {
            "v": 1,
            "identity": self.identity.to_dict(),
            "checksum_algorithm": self.checksum_algorithm,
            "digest_algorithm": self.digest_algorithm,
            "regions": [r.nbytes for r in self.regions],
            "names": [s.name for s in specs],
            "dtypes": [s.dtype for s in specs],
            "shapes": [list(s.shape) for s in specs],
            "region": [s.region for s in specs],
            "offset": [s.offset for s in specs],
            "checksum": [s.checksum for s in specs],
            "digest": [s.digest for s in specs],
        }
        canonical = json.dumps(columns, separators=(",", ":"), ensure_ascii=True).encode()
        key = "mxm1-" + hashlib.sha256(canonical).hexdigest()
        return StoredManifest(key, _STORED_MAGIC + zlib.compress(canonical, 6))

    @classmethod
    def from_stored(cls, key: str, blob: bytes) -> Manifest:
        """The manifest ``blob`` holds, if it is the one ``key`` names; untrusted input.

        Refused with :class:`ManifestError`: a key of another shape, a blob that is
        not one (or that inflates past :data:`MAX_MANIFEST_BYTES`), bytes that do
        not hash to the key (a registry writer cannot swap a manifest under a
        name), and anything :meth:`from_dict`'s rules refuse.
        """
        _require(isinstance(key, str) and MANIFEST_KEY.fullmatch(key) is not None, "bad manifest key")
        _require(
            isinstance(blob, bytes) and blob.startswith(_STORED_MAGIC) and len(blob) <= MAX_MANIFEST_BYTES,
            f"stored manifest {key[:17]}... is not a manifest blob",
        )
        inflate = zlib.decompressobj()
        try:
            canonical = inflate.decompress(blob[len(_STORED_MAGIC) :], MAX_MANIFEST_BYTES + 1)
        except zlib.error as exc:
            raise ManifestError(f"stored manifest {key[:17]}... does not decompress: {exc}") from None
        _require(
            inflate.eof and not inflate.unconsumed_tail and len(canonical) <= MAX_MANIFEST_BYTES,
            f"stored manifest {key[:17]}... is truncated or inflates past the size limit",
        )
        _require(
            "mxm1-" + hashlib.sha256(canonical).hexdigest() == key,
            f"stored manifest {key[:17]}... does not hash to its key",
        )
        return cls.from_columns(_parse_json(canonical, "stored manifest"))

    @classmethod
    def from_columns(cls, data: Any) -> Manifest:
        _require(isinstance(data, Mapping) and data.get("v") == 1, "stored manifest: unknown version")
        names = data.get("names")
        _require(isinstance(names, list), "stored manifest: 'names' must be a list")
        _require(len(names) <= MAX_TENSORS, f"manifest lists more than {MAX_TENSORS} tensors")
        columns = [data.get(c) for c in ("dtypes", "shapes", "region", "offset", "checksum", "digest")]
        _require(
            all(isinstance(c, list) and len(c) == len(names) for c in columns),
            "stored manifest: every column must list one entry per tensor",
        )
        dtypes, shapes, region, offset, checksum, digest = columns
        _require(all(isinstance(s, list) for s in shapes), "stored manifest: shapes must be lists")
        regions = data.get("regions")
        _require(isinstance(regions, list), "manifest 'regions' must be a list of sizes")
        _require(len(regions) <= MAX_REGIONS, f"manifest lists more than {MAX_REGIONS} regions")
        algorithm, digests = _algorithms(data)
        return cls(
            identity=ModelIdentity.from_dict(data.get("identity")),
            tensors=tuple(
                TensorSpec(*row)
                for row in zip(
                    names, dtypes, map(tuple, shapes), region, offset, checksum, digest, strict=True
                )
            ),
            regions=tuple(Region(n) for n in regions),
            checksum_algorithm=algorithm,
            digest_algorithm=digests,
        )


def _algorithms(data: Mapping[str, Any]) -> tuple[str, str]:
    """A manifest's checksum and digest algorithm names (untrusted); a manifest without the
    digest's names an older source's flat SHA-256."""
    checksum = data.get("checksum_algorithm", "xxh3_64")
    digest = data.get("digest_algorithm", "sha256")
    _require(isinstance(checksum, str) and len(checksum) < 32, "bad checksum_algorithm")
    _require(isinstance(digest, str) and len(digest) < 32, "bad digest_algorithm")
    return checksum, digest


@dataclass(frozen=True, slots=True)
class StoredManifest:
    """A manifest as a registry stores it: ``key`` names ``blob`` by content."""

    key: str
    blob: bytes


class SourceState(enum.Enum):
    READY = "READY"
    STALE = "STALE"
    DRAINING = "DRAINING"


#: the longest reader lease a source grants unless it says otherwise (seconds)
DEFAULT_MAX_LEASE = 60.0


@dataclass(frozen=True)
class SourceRecord:
    """A serving process as the registry knows it.

    ``generation`` is new for every process start: a restarted source with the
    same ``source_id`` is a different generation and starts with a clean record.
    ``transport`` carries strategy-specific connection data (for NIXL: the
    agent name and its serialised metadata), opaque to the core.
    """

    source_id: str
    identity_key: str
    generation: str
    endpoint: str = ""
    state: SourceState = SourceState.READY
    load: int = 0
    heartbeat_at: float = 0.0
    ttl: float = 15.0
    labels: Mapping[str, str] = field(default_factory=dict)
    transport: Mapping[str, str] = field(default_factory=dict)
    times_ejected: int = 0
    ejected_until: float = 0.0
    stale_reason: str = ""
    unreachable_reports: int = 0
    #: reader leases: target reader id -> when its lease expires (unix time); ``load`` counts the live ones
    readers: Mapping[str, float] = field(default_factory=dict)
    #: how many readers the source admits at once (0: no cap)
    max_readers: int = 0
    #: fan-out distance: 0 for a seed, 1 for a target that loaded from a seed and republished, ...
    hops: int = 0
    #: the stored manifest this source serves (:attr:`Manifest.stored`), set by the registry on publish
    manifest_key: str = ""
    #: the longest reader lease the source grants (seconds): a longer one is cut to it where it is
    #: written, so a reader that asked for years and died holds a slot for this long at most
    max_lease: float = DEFAULT_MAX_LEASE
    #: a target still loading (issue 24): it serves the tensors it has landed and verified, which
    #: it answers itself (its advert's holdings, read one-sided), never through the registry
    partial: bool = False

    def lease_until(self, now: float, seconds: float) -> float:
        """When a lease asked for ``seconds`` at ``now`` ends: never later than :attr:`max_lease`
        from now; a nonsensical ask (negative, NaN) ends at once."""
        granted = seconds if 0.0 <= seconds <= self.max_lease else (self.max_lease if seconds > 0 else 0.0)
        return now + granted

    def at_capacity(self, now: float) -> bool:
        return self.max_readers > 0 and self.live_readers(now) >= self.max_readers

    @property
    def listed_full(self) -> bool:
        """At its reader cap by the count the registry wrote (``load``): what a target that only
        listed the record knows, with no clock (ranking and planning are pure)."""
        return self.max_readers > 0 and self.load >= self.max_readers

    def live_readers(self, now: float) -> int:
        """Readers whose lease has not expired at ``now`` (a crashed target's lease simply runs out)."""
        return sum(1 for expires in self.readers.values() if expires > now)

    def __post_init__(self) -> None:
        # records are written by anyone who can write the registry: every field is checked (and a
        # fleet lists hundreds of them per evaluation: messages are formatted only on failure)
        for name in ("source_id", "identity_key", "generation"):
            value = getattr(self, name)
            if not (isinstance(value, str) and 0 < len(value) <= 512 and value.isprintable()):
                _fail(f"source record {name} must be a non-empty printable string, got {value!r:.80}")
        if not (
            isinstance(self.endpoint, str) and len(self.endpoint) <= 1024 and self.endpoint.isprintable()
        ):
            _fail("source record endpoint must be a printable string")
        if not isinstance(self.state, SourceState):
            _fail("source record state is not a SourceState")
        for name in ("load", "times_ejected", "unreachable_reports", "max_readers", "hops"):
            value = getattr(self, name)
            if not (type(value) is int and 0 <= value < 1 << 31):
                _fail(f"source record {name} must be in 0..2**31")
        for name, low, high in (
            ("heartbeat_at", 0.0, 1e11),
            ("ejected_until", 0.0, 1e11),
            ("ttl", 1e-3, 86400.0),
            ("max_lease", 1e-3, 86400.0),
        ):
            value = getattr(self, name)
            if not (
                isinstance(value, (int, float))
                and not isinstance(value, bool)
                and math.isfinite(value)
                and low <= value <= high
            ):
                _fail(f"source record {name} must be a finite number in {low}..{high}, got {value!r:.40}")
        if not (isinstance(self.stale_reason, str) and len(self.stale_reason) <= 4096):
            _fail("bad stale_reason")
        if type(self.partial) is not bool:
            _fail("source record partial must be true or false")
        key = self.manifest_key
        if key and not (isinstance(key, str) and MANIFEST_KEY.fullmatch(key) is not None):
            _fail("source record manifest_key must be mxm1-<64 hex>")
        if len(self.readers) > 65_536:
            _fail("source record lists too many readers")
        for reader, expires in self.readers.items():
            if not (
                isinstance(reader, str) and 0 < len(reader) <= 256 and reader.isprintable()
                and isinstance(expires, float) and math.isfinite(expires)
            ):  # fmt: skip
                _fail("source record readers must map printable ids to finite expiry times")
        for key, value in self.labels.items():
            if not (
                isinstance(key, str) and isinstance(value, str) and key.isprintable() and value.isprintable()
            ):
                _fail("source record labels must be printable strings")

    def to_dict(self) -> dict[str, Any]:
        return {
            "source_id": self.source_id,
            "identity_key": self.identity_key,
            "generation": self.generation,
            "endpoint": self.endpoint,
            "state": self.state.value,
            "load": self.load,
            "heartbeat_at": self.heartbeat_at,
            "ttl": self.ttl,
            "labels": dict(self.labels),
            "transport": dict(self.transport),
            "times_ejected": self.times_ejected,
            "ejected_until": self.ejected_until,
            "stale_reason": self.stale_reason,
            "unreachable_reports": self.unreachable_reports,
            "readers": dict(self.readers),
            "max_readers": self.max_readers,
            "hops": self.hops,
            "manifest_key": self.manifest_key,
            "max_lease": self.max_lease,
            "partial": self.partial,
        }

    @classmethod
    def from_dict(cls, data: Any) -> SourceRecord:
        _require(isinstance(data, Mapping), "source record must be an object")
        try:
            labels = data.get("labels") or {}
            transport = data.get("transport") or {}
            _require(isinstance(labels, Mapping), "labels must be an object")
            _require(isinstance(transport, Mapping), "transport must be an object")
            return cls(
                source_id=data["source_id"],
                identity_key=data["identity_key"],
                generation=data["generation"],
                endpoint=str(data.get("endpoint", "")),
                state=SourceState(data.get("state", "READY")),
                load=int(data.get("load", 0)),
                heartbeat_at=float(data.get("heartbeat_at", 0.0)),
                ttl=float(data.get("ttl", 15.0)),
                labels={str(k): str(v) for k, v in labels.items()},
                transport={str(k): str(v) for k, v in transport.items()},
                times_ejected=int(data.get("times_ejected", 0)),
                ejected_until=float(data.get("ejected_until", 0.0)),
                stale_reason=str(data.get("stale_reason", "")),
                unreachable_reports=int(data.get("unreachable_reports", 0)),
                readers={str(k): float(v) for k, v in (data.get("readers") or {}).items()},
                max_readers=int(data.get("max_readers", 0)),
                hops=int(data.get("hops", 0)),
                manifest_key=str(data.get("manifest_key", "")),
                max_lease=float(data.get("max_lease", DEFAULT_MAX_LEASE)),
                partial=data.get("partial", False),
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, ManifestError):
                raise
            raise ManifestError(f"malformed source record: {exc!r}") from None


@dataclass(frozen=True)
class Candidate:
    """A source record plus what evaluation learned about it."""

    record: SourceRecord
    manifest: Manifest | None = None

    @property
    def source_id(self) -> str:
        return self.record.source_id
