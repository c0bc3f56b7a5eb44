"""load_module: transformers models filled in place from a real source process (NIXL on loopback, CPU).

The reference is the same model loaded by transformers itself from the
checkpoint file; equality is bitwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from hypothesis import given
from hypothesis import strategies as st

from mx_orchestrator import ModelIdentity, SourceState, load_module
from mx_orchestrator.models import Manifest, TensorSpec
from mx_orchestrator.module import bind, default_rename
from mx_orchestrator.registry.sqlite import SqliteRegistry
from mx_orchestrator.target import TargetMismatch
from mx_orchestrator.testing.peers import MODEL_ID, Peers, minilm_dir

pytestmark = pytest.mark.usefixtures("no_nixl_leaks")

SENTENCES = ["Weights move at the speed of the link.", "A tied embedding is filled once, not twice."]


def empty_bert(**kwargs: Any) -> Any:
    config = transformers.BertConfig.from_pretrained(str(minilm_dir()))
    with torch.device("meta"):
        model = transformers.BertModel(config, **kwargs)
    return model.to_empty(device="cpu").eval()


def storage(module: Any) -> dict[str, int]:
    return {n: p.data_ptr() for n, p in module.named_parameters()}


def hidden_states(model: Any) -> torch.Tensor:
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm_dir()))
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).last_hidden_state  # type: ignore[no-any-return]


async def test_an_empty_bert_filled_from_a_peer_equals_transformers_own_load_bitwise(
    peers: Peers, registry_url: str
) -> None:
    peers.start(("minilm", "arena"))
    model = empty_bert(add_pooling_layer=False)
    before = storage(model)
    report = await load_module(model, MODEL_ID, registry=registry_url, rank_window=2.0)
    assert report.loaded, report.reason
    assert report.final is not None and report.final.verified
    assert storage(model) == before  # every parameter kept its storage
    reference = transformers.BertModel.from_pretrained(str(minilm_dir()), add_pooling_layer=False).eval()
    assert torch.equal(hidden_states(model), hidden_states(reference))
    module = report.to_dict()["module"]
    assert module["checkpoint_only"] == ["pooler.dense.bias", "pooler.dense.weight"]
    # the position ids buffer is in the checkpoint, so it was filled, garbage after to_empty or not
    assert "embeddings.position_ids" not in module["module_only"]


async def test_a_tied_llama_served_in_tensor_layout_fills_the_tied_weight_once(
    peers: Peers, registry_url: str, tmp_path: Path
) -> None:
    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM(config).eval()
    reference.save_pretrained(tmp_path / "llama")
    peers.start(("llama-src", "tensor"), weights=tmp_path / "llama", model_id="acme/tiny-llama")
    with torch.device("meta"):
        empty = transformers.LlamaForCausalLM(config)
    empty = empty.to_empty(device="cpu").eval()
    empty.tie_weights()  # to_empty makes new storage per name: tie again, as loaders do
    assert empty.lm_head.weight is empty.model.embed_tokens.weight
    report = await load_module(empty, "acme/tiny-llama", registry=registry_url, rank_window=2.0)
    assert report.loaded, report.reason
    module = report.module
    assert module is not None
    assert module["tied"] == {"model.embed_tokens.weight": ["lm_head.weight"]}
    embed_bytes = 512 * 64 * 4
    assert report.final is not None
    assert report.final.bytes_moved == sum(p.numel() * 4 for p in reference.parameters())  # tied counted once
    assert embed_bytes < report.final.bytes_moved
    # buffers the checkpoint does not hold (non-persistent: the rotary inv_freq) are the module's own
    for name in module["module_only"]:
        empty.get_buffer(name).copy_(reference.get_buffer(name))
    ids = torch.tensor([[1, 5, 9, 42, 7, 300]])
    with torch.no_grad():
        assert torch.equal(empty(ids).logits, reference(ids).logits)


async def test_a_parameter_of_another_shape_or_dtype_is_a_manifest_mismatch_naming_it_and_moves_nothing(
    peers: Peers, registry_url: str
) -> None:
    peers.start(("minilm", "arena"))
    registry = SqliteRegistry(registry_url.removeprefix("sqlite://"))
    for change in ("shape", "dtype"):
        model = empty_bert(add_pooling_layer=False)
        layer = model.encoder.layer[0].attention.self.query
        if change == "shape":
            layer.weight = torch.nn.Parameter(torch.empty(384, 128))
        else:
            layer.weight = torch.nn.Parameter(torch.empty(384, 384, dtype=torch.float16))
        report = await load_module(model, MODEL_ID, registry=registry, rank_window=2.0)
        assert not report.loaded
        assert {a.outcome.name for a in report.attempts} == {"ManifestMismatch"}
        assert all(a.outcome.bytes_moved == 0 and not a.marked_stale for a in report.attempts)
        assert "encoder.layer.0.attention.self.query.weight" in report.attempts[0].outcome.detail
        assert (await registry.get("minilm")).state is SourceState.READY  # type: ignore[union-attr]
    await registry.aclose()


@pytest.mark.parametrize("stripe", [1, 2])
async def test_a_module_missing_a_checkpoint_tensor_loads_and_says_so_and_strict_refuses_missing_parameters(
    peers: Peers, registry_url: str, stripe: int
) -> None:
    peers.start(("minilm", "arena"))
    model = empty_bert(add_pooling_layer=True)
    del model.pooler  # the checkpoint has the pooler; this module does not
    report = await load_module(model, MODEL_ID, registry=registry_url, rank_window=2.0, stripe=stripe)
    assert report.loaded and "pooler.dense.weight" in report.module["checkpoint_only"]  # type: ignore[index]
    extra = empty_bert(add_pooling_layer=False)
    extra.register_parameter("adapter", torch.nn.Parameter(torch.empty(4)))
    refused = await load_module(extra, MODEL_ID, registry=registry_url, rank_window=2.0, stripe=stripe)
    assert not refused.loaded and "adapter" in refused.attempts[0].outcome.detail
    assert {a.outcome.name for a in refused.attempts} == {"ManifestMismatch"}
    assert all(a.outcome.bytes_moved == 0 for a in refused.attempts)
    lenient = await load_module(
        extra, MODEL_ID, registry=registry_url, rank_window=2.0, strict=False, stripe=stripe
    )
    assert lenient.loaded and "adapter" in lenient.module["module_only"]  # type: ignore[index]


@pytest.mark.parametrize("stripe", [1, 2])
async def test_a_non_contiguous_parameter_is_a_manifest_mismatch_naming_it_in_every_mode(
    peers: Peers, registry_url: str, stripe: int
) -> None:
    """It cannot be filled in place: a typed outcome naming it, 0 bytes moved, the source READY."""
    peers.start(("minilm", "arena"))
    model = empty_bert(add_pooling_layer=False)
    layer = model.encoder.layer[0].attention.self.query
    layer.weight = torch.nn.Parameter(torch.empty(384, 384).t())  # a transposed view: not contiguous
    report = await load_module(model, MODEL_ID, registry=registry_url, rank_window=2.0, stripe=stripe)
    assert not report.loaded
    assert {a.outcome.name for a in report.attempts} == {"ManifestMismatch"}
    assert "not contiguous" in report.attempts[0].outcome.detail
    assert all(a.outcome.bytes_moved == 0 and not a.marked_stale for a in report.attempts)


# -- the pure binding -------------------------------------------------------------------


def manifest(names: list[str], shape: tuple[int, ...] = (2,)) -> Manifest:
    from mx_orchestrator.layout import LayoutSpec, plan_layout

    specs = [TensorSpec(n, "F32", shape) for n in names]
    return plan_layout(ModelIdentity("m"), specs, LayoutSpec("arena"), "xxh3_64")


def test_the_default_rename_finds_a_prefix_difference_and_prefers_the_identity() -> None:
    mapping, how = default_rename(["model.a.w", "model.b.w"], ["a.w", "b.w"])
    assert how == "strip 'model.'" and mapping("model.a.w") == "a.w"
    mapping, how = default_rename(["a.w", "b.w"], ["bert.a.w", "bert.b.w"])
    assert how == "add 'bert.'" and mapping("a.w") == "bert.a.w"
    mapping, how = default_rename(["a.w"], ["a.w"])
    assert how == "identity"


def test_two_checkpoint_names_landing_on_one_module_tensor_are_refused_by_name() -> None:
    tensors = {"w": torch.zeros(2)}
    with pytest.raises(TargetMismatch, match=r"'a'.*'b'.*'w'"):
        bind(tensors, ["w"], manifest(["a", "b"]), rename=lambda c: "w")


@given(st.lists(st.sampled_from(["x", "y", "z", "t"]), min_size=1, max_size=4, unique=True))
def test_a_binding_fills_each_storage_once_and_accounts_for_every_name(names: list[str]) -> None:
    shared = torch.zeros(2)
    tensors = {"x": shared, "y": shared, "z": torch.zeros(2), "t": torch.zeros(2)}
    binding, chosen = bind(tensors, [], manifest(names), strict=False)
    assert len({t.data_ptr() for t in chosen.values()}) == len(chosen)
    read = set(binding.names) | {d for ds in binding.duplicates.values() for d in ds}
    assert read | set(binding.checkpoint_only) == set(names)
    filled = {binding.names[c] for c in binding.names}
    for module_name in tensors:
        tied_to = [m for m, others in binding.tied.items() if module_name in others]
        assert (module_name in filled) or tied_to or (module_name in binding.module_only)
