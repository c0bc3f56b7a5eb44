"""Models validate untrusted input on construction and fingerprint what matters."""

from __future__ import annotations

import functools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mx_orchestrator import Manifest, ManifestError, ModelIdentity, Region, SourceRecord, TensorSpec
from mx_orchestrator.layout import describe_layout_difference, parse_layout, parse_size, plan_layout
from mx_orchestrator.testing import make_manifest


def test_identity_key_is_stable_and_distinguishes_shards() -> None:
    a = ModelIdentity("org/m", "abc", 0, 2)
    assert a.key == ModelIdentity("org/m", "abc", 0, 2).key
    assert a.key != ModelIdentity("org/m", "abc", 1, 2).key


@pytest.mark.parametrize(
    "kwargs",
    [
        {"model_id": ""},
        {"model_id": "../etc"},
        {"model_id": "org/m", "shard_rank": 2, "shard_count": 2},
        {"model_id": "org/m", "shard_count": 0},
        {"model_id": "org/m", "revision": "bad rev"},
    ],
)
def test_identity_rejects_invalid_fields(kwargs: dict[str, object]) -> None:
    with pytest.raises(ManifestError):
        ModelIdentity(**kwargs)  # type: ignore[arg-type]


def test_tensor_nbytes_follows_dtype_and_shape() -> None:
    assert TensorSpec("w", "BF16", (3, 5)).nbytes == 30
    assert TensorSpec("s", "F32", ()).nbytes == 4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dtype": "F17"}, "unknown dtype"),
        ({"shape": (-1, 4)}, "shape"),
        ({"offset": -8}, "offset"),
        ({"name": ""}, "name"),
        ({"shape": (1 << 40, 1 << 20)}, "exceeds"),
    ],
)
def test_tensor_spec_rejects_bad_fields(kwargs: dict[str, object], message: str) -> None:
    base: dict[str, object] = {"name": "w", "dtype": "F32", "shape": (4,)}
    base.update(kwargs)
    with pytest.raises(ManifestError, match=message):
        TensorSpec(**base)  # type: ignore[arg-type]


@pytest.mark.faults
def test_manifest_rejects_duplicates_out_of_region_and_overlap(identity: ModelIdentity) -> None:
    with pytest.raises(ManifestError, match="duplicate"):
        Manifest(identity, (TensorSpec("a", "F32", (4,)), TensorSpec("a", "F32", (4,), 0, 16)), (Region(64),))
    with pytest.raises(ManifestError, match="outside region"):
        Manifest(identity, (TensorSpec("a", "F32", (4,), 0, 56),), (Region(64),))
    with pytest.raises(ManifestError, match="names region 1"):
        Manifest(identity, (TensorSpec("a", "F32", (4,), 1, 0),), (Region(64),))
    with pytest.raises(ManifestError, match="overlap"):
        Manifest(identity, (TensorSpec("a", "F32", (4,)), TensorSpec("b", "F32", (4,), 0, 8)), (Region(64),))
    with pytest.raises(ManifestError, match="region size"):
        Region(-1)


def test_manifest_json_round_trip_keeps_fingerprints(identity: ModelIdentity) -> None:
    manifest = make_manifest(identity, 5, layout="chunked:2KiB")
    again = Manifest.from_json(manifest.to_json())
    assert again == manifest
    assert again.layout_fingerprint == manifest.layout_fingerprint
    assert again.manifest_fingerprint == manifest.manifest_fingerprint


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[]",
        '{"regions": 3, "tensors": []}',
        '{"identity": {"model_id": "a/b"}, "regions": [8], "tensors": [{"name": "x", "dtype": "F32", "shape": "4"}]}',
        '{"identity": {"model_id": "a/b"}, "regions": [-5], "tensors": []}',
        '{"identity": {}, "regions": [], "tensors": []}',
    ],
)
@pytest.mark.faults
def test_manifest_from_untrusted_json_raises_typed_error(text: str) -> None:
    with pytest.raises(ManifestError):
        Manifest.from_json(text)


def test_layout_fingerprint_differs_between_layouts_but_manifest_fingerprint_does_not(
    identity: ModelIdentity,
) -> None:
    arena = make_manifest(identity, 8, layout="arena")
    chunked = make_manifest(identity, 8, layout="chunked:2KiB")
    assert len(arena.regions) == 1 and len(chunked.regions) > 1
    assert arena.manifest_fingerprint == chunked.manifest_fingerprint
    assert arena.layout_fingerprint != chunked.layout_fingerprint
    detail = describe_layout_difference(chunked, arena)
    assert f"source has {len(chunked.regions)} regions, target has 1" in detail


def test_chunked_layout_respects_chunk_size_except_for_oversized_tensors(identity: ModelIdentity) -> None:
    tensors = [("big", "F32", (1024,)), ("a", "F32", (100,)), ("b", "F32", (100,)), ("c", "F32", (100,))]
    manifest = plan_layout(identity, tensors, parse_layout("chunked:1KiB"))
    sizes = [r.nbytes for r in manifest.regions]
    assert sizes[0] == 4096  # the oversized tensor alone
    assert all(s <= 1024 for s in sizes[1:])
    assert manifest.total_bytes == 4096 + 1200


def test_parse_size_and_layout() -> None:
    assert parse_size("8MiB") == 8 << 20
    assert parse_size("500M") == 500_000_000
    assert parse_size("4096") == 4096
    assert str(parse_layout("chunked:8MiB")) == f"chunked:{8 << 20}"
    from mx_orchestrator import ConfigError

    for bad in ("chunked", "chunked:abc", "ring", "arena:5"):
        with pytest.raises(ConfigError):
            parse_layout(bad)


@pytest.mark.faults
def test_source_record_from_garbage_raises_typed_error() -> None:
    with pytest.raises(ManifestError):
        SourceRecord.from_dict({"source_id": "a"})
    with pytest.raises(ManifestError):
        SourceRecord.from_dict({"source_id": "a", "identity_key": "k", "generation": "g", "state": "ZOMBIE"})
    with pytest.raises(ManifestError):
        SourceRecord.from_dict({"source_id": "a", "identity_key": "k", "generation": "g", "load": -3})


def test_the_stored_form_round_trips_and_names_the_content(identity: ModelIdentity) -> None:
    from dataclasses import replace

    manifest = make_manifest(identity, 7)
    stored = manifest.stored
    assert stored.key.startswith("mxm1-") and Manifest.from_stored(stored.key, stored.blob) == manifest
    assert make_manifest(identity, 7).stored == stored  # the same content, the same name and bytes
    renamed = replace(manifest, tensors=(replace(manifest.tensors[0], name="other"), *manifest.tensors[1:]))
    assert renamed.stored.key != stored.key
    assert len(stored.blob) < len(manifest.to_json())
    with pytest.raises(ManifestError, match="inflates past the size limit"):
        Manifest.from_stored(stored.key, _zlib_bomb())


@functools.cache
def _zlib_bomb() -> bytes:
    """A stored-manifest blob that is tiny compressed and inflates past the size limit."""
    import zlib

    return b"MXM1" + zlib.compress(b" " * (65 << 20), 9)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=2048), cut=st.integers(0, 4096), flip=st.integers(0, 1 << 16))
def test_hostile_stored_manifests_are_refused_with_a_typed_error(data: bytes, cut: int, flip: int) -> None:
    """Random bytes, truncated or bit-flipped blobs, a zlib bomb, and blobs under another key:
    a ManifestError, or exactly the manifest the key names."""
    stored = make_manifest(ModelIdentity("org/m"), 3).stored
    flipped = bytearray(stored.blob)
    flipped[flip % len(flipped)] ^= 1 << (flip % 8)
    for key, blob in (
        (stored.key, b"MXM1" + data),
        (stored.key, data),
        (stored.key, stored.blob[:cut]),
        (stored.key, bytes(flipped)),
        ("mxm1-" + "0" * 64, stored.blob),
        ("not-a-key", stored.blob),
    ):
        try:
            decoded = Manifest.from_stored(key, blob)
        except ManifestError:
            continue
        # only the very content the key names gets through (a flip in deflate's padding bits
        # leaves the inflated bytes, and so the manifest, unchanged)
        assert key == stored.key and decoded == make_manifest(ModelIdentity("org/m"), 3)
