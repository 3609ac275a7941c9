"""Merging an adapter of a model whose input embeddings and output head share one weight
(`tie_word_embeddings`: a tied tiny Llama, Gemma 2 and GPT-2 by default). The adapter adapts one
module; merging it must not change the other one (lorakit.tied): `unload(merge=True)` and
`lorakit merge` give the merged module its own weight and the config `tie_word_embeddings=False`,
so the merged model, in memory and saved and reloaded by plain transformers, gives the adapted
model's logits; `merge_adapters` refuses, naming the tie."""

from __future__ import annotations

import re

import pytest
import torch
from adapter_support import randomise
from safetensors import safe_open
from tiny_models import tiny_model, tiny_model_dir
from transformers import AutoModelForCausalLM

import lorakit as lk
from lorakit.builtin import build_tokenizer
from lorakit.verbs.merge import merge_to_model_dir

# each arch's tied pair (input embeddings, output head) and a linear layer to adapt next to them
NAMES = {"llama": ("embed_tokens", "lm_head", "q_proj"), "gemma2": ("embed_tokens", "lm_head", "q_proj"),
         "gpt2": ("wte", "lm_head", "c_attn")}


def tied_model(arch: str, **config):
    model = tiny_model(arch, tie=True, **config)
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    return model


def lora_config(arch: str, case: str) -> lk.LoraConfig:
    embed, head, linear = NAMES[arch]
    return {
        "head": lk.LoraConfig(r=4, lora_alpha=8, target_modules=[head]),
        "embed": lk.LoraConfig(r=4, lora_alpha=8, target_modules=[embed]),
        "both": lk.LoraConfig(r=4, lora_alpha=8, target_modules=[embed, head, linear]),
        "head-copy": lk.LoraConfig(r=4, lora_alpha=8, target_modules=[linear], modules_to_save=[head]),
        "embed-copy": lk.LoraConfig(r=4, lora_alpha=8, target_modules=[linear], modules_to_save=[embed]),
    }[case]


def adapt(model, config: lk.LoraConfig) -> None:
    """The adapter of `config`, with random factors and changed modules_to_save copies."""
    lk.add_adapter(model, config)
    randomise(model, "default", seed=3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".modules_to_save.default." in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(4)) * 0.1)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


# Gemma's embedding multiplies its lookup by embed_scale = sqrt(hidden), and so the adapter's rows
# (lorakit.layers.LoraEmbedding.output_scale): its merge computes what the adapter did
CASES = [pytest.param(arch, case, id=f"{arch}-{case}")
         for arch in NAMES for case in ("head", "embed", "both", "head-copy", "embed-copy")]


@pytest.mark.parametrize(("arch", "case"), CASES)
def test_unload_merge_unties_and_keeps_the_adapted_logits(arch, case, ids, tmp_path):
    model = tied_model(arch)
    weight = model.get_input_embeddings().weight.detach().clone()
    adapt(model, lora_config(arch, case))
    expected = logits(model, ids)

    merged = lk.unload(model, merge=True)
    embeddings, head = merged.get_input_embeddings(), merged.get_output_embeddings()
    assert embeddings.weight is not head.weight and merged.config.tie_word_embeddings is False
    kept = {"head": embeddings, "head-copy": embeddings, "embed": head, "embed-copy": head}.get(case)
    if kept is not None:   # the module without an adapter computes with the original weight
        assert torch.equal(kept.weight, weight)
    assert embeddings.weight.requires_grad and head.weight.requires_grad   # a plain model again
    torch.testing.assert_close(logits(merged, ids), expected, rtol=1e-5, atol=1e-5)

    merged.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert "lm_head.weight" in set(f.keys())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.tie_word_embeddings is False
    torch.testing.assert_close(logits(reloaded, ids), expected, rtol=1e-5, atol=1e-5)


def test_a_tied_module_whose_adapter_is_not_merged_stays_tied(ids):
    model = tied_model("llama")
    adapt(model, lora_config("llama", "head"))
    lk.set_active_adapters(model, [])
    base = logits(model, ids)
    plain = lk.unload(model, merge=True)
    assert plain.lm_head.weight is plain.model.embed_tokens.weight and plain.config.tie_word_embeddings is True
    torch.testing.assert_close(logits(plain, ids), base, rtol=0, atol=0)


def test_unload_without_merge_gives_the_tied_base_back(ids):
    model = tied_model("gemma2")
    base = logits(model, ids)
    adapt(model, lora_config("gemma2", "both"))
    plain = lk.unload(model, merge=False)
    assert plain.lm_head.weight is plain.model.embed_tokens.weight and plain.config.tie_word_embeddings is True
    torch.testing.assert_close(logits(plain, ids), base, rtol=0, atol=0)


@pytest.mark.parametrize("case", ["head", "embed", "both"])
def test_merge_adapters_refuses_a_tied_target_and_merges_nothing(case, ids):
    model = tied_model("llama")
    adapt(model, lora_config("llama", case))
    expected, before = logits(model, ids), {k: v.clone() for k, v in model.state_dict().items()}
    wrapper = "lm_head" if case == "head" else "model.embed_tokens"
    tied_to = "model.embed_tokens.weight" if case == "head" else "lm_head.weight"
    with pytest.raises(lk.AdapterStateError, match="^" + re.escape(
            f"cannot merge into {wrapper}: its weight is tied to {tied_to} (tie_word_embeddings), which would "
            "change too. lorakit.unload(model, merge=True) merges into an untied copy; otherwise keep the adapter "
            "unmerged") + "$"):
        lk.merge_adapters(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    torch.testing.assert_close(logits(model, ids), expected, rtol=0, atol=0)
    torch.testing.assert_close(logits(lk.unload(model, merge=True), ids), expected, rtol=1e-5, atol=1e-5)


def test_merge_adapters_still_merges_untied_targets_of_a_tied_model(ids):
    """A modules_to_save copy of the tied head is its own weight: only the LoRA layers merge."""
    model = tied_model("llama")
    adapt(model, lora_config("llama", "head-copy"))
    expected = logits(model, ids)
    lk.merge_adapters(model)
    torch.testing.assert_close(logits(model, ids), expected, rtol=1e-5, atol=1e-5)
    assert model.lm_head.original_module.weight is model.model.embed_tokens.weight


def test_lorakit_merge_of_a_tied_model_writes_a_separate_head(tmp_path, ids):
    tokenizer = build_tokenizer()
    model = tiny_model_dir(tmp_path / "base", tokenizer, tie=True)
    adapt(model, lora_config("llama", "both"))
    expected = logits(model, ids)
    lk.save_adapter(model, tmp_path / "adapter")

    out = merge_to_model_dir(tmp_path / "adapter", tmp_path / "merged", base=str(tmp_path / "base"))
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {"lm_head.weight", "model.embed_tokens.weight"} <= set(f.keys())
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.config.tie_word_embeddings is False
    torch.testing.assert_close(logits(reloaded, ids), expected, rtol=1e-5, atol=1e-5)


def test_gemma_embedding_adapter_scales_its_rows_like_peft(ids, tmp_path):
    """Gemma multiplies its embedding lookup by embed_scale; the adapter's rows too, as in PEFT (so
    that the file means the same in both), in per-sample batches as well."""
    from peft import PeftModel

    model = tiny_model("gemma2")
    lk.add_adapter(model, lk.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]))
    randomise(model, "default", seed=3)
    expected = logits(model, ids)
    lk.save_adapter(model, tmp_path)
    torch.testing.assert_close(logits(PeftModel.from_pretrained(tiny_model("gemma2"), tmp_path), ids), expected,
                               rtol=0, atol=1e-5)
    with lk.per_sample_adapters(model, ["default"] * ids.shape[0]):
        torch.testing.assert_close(logits(model, ids), expected, rtol=0, atol=1e-5)
