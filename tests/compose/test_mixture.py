"""Mixture of LoRA experts (`lk.add_mixture`): the gate math against closed forms on a tiny layer,
the uniform start against PEFT's `add_weighted_adapter(..., combination_type="cat")`, the auxiliary
losses against their definitions, trainability, save/load, and the errors.

A tiny one-layer model (d_in 6, d_out 5) makes the closed forms explicit: each expert's term is
s_e B_e A_e x (+ s_e b_e), materialised here one by one, which the mixture never does. fp32, CPU.
"""

from __future__ import annotations

import json
import re
import shutil

import peft
import pytest
import torch
from mixture_support import (
    NAMES,
    TASKS,
    Tiny,
    X,
    base_model,
    eval_loss,
    expert_terms,
    mixed_eval,
    mixture_args,
    randomise,
    single_expert_losses,
    split_args,
    task_experts,
    tiny_with_experts,
)
from safetensors.torch import load_file, save_file
from tiny_models import tiny_gpt2, tiny_llama
from torch import nn

import lorakit as lk
from lorakit import cli
from lorakit.compose.mixture import MixtureOfExperts, composers
from lorakit.compose.mixture_files import CONFIG_NAME, WEIGHTS_NAME, load_mixture_weights
from lorakit.inject import lora_layers
from lorakit.train.config import load_config
from lorakit.train.evaluate import evaluate
from lorakit.train.loop import train

ATOL = 1e-6




def set_router(model: nn.Module, seed: int = 5, scale: float = 1.0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, c in composers(model):
            c.router.weight.copy_(torch.randn(c.router.weight.shape, generator=gen) * scale)


@pytest.mark.parametrize("temperature", [1.0, 0.5, 3.0])
def test_dense_gate_is_the_softmax_weighted_sum_of_the_experts(temperature):
    model = tiny_with_experts()
    lk.add_mixture(model, NAMES, lk.MixtureConfig(temperature=temperature))
    set_router(model)
    W = model.proj.composer.router.weight                                  # (E, d_in)
    g = torch.softmax(X @ W.t() / temperature, dim=-1)                     # (2, 4, E)
    expected = model.proj.base_layer(X) + (g[..., None] * expert_terms(model, X, NAMES)).sum(-2)
    with torch.no_grad():
        got = model.proj(X)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert not torch.allclose(g, torch.full_like(g, 1 / 3), atol=0.05)    # the gate really varies per token


def test_top_k_keeps_the_k_most_probable_experts_renormalised():
    model = tiny_with_experts()
    lk.add_mixture(model, NAMES, lk.MixtureConfig(top_k=2))
    set_router(model)
    p = torch.softmax(X @ model.proj.composer.router.weight.t(), dim=-1)  # (2, 4, 3)
    keep = p > p.min(-1, keepdim=True).values                               # drop the least probable of 3
    g = torch.where(keep, p, 0.0)
    g = g / g.sum(-1, keepdim=True)
    expected = model.proj.base_layer(X) + (g[..., None] * expert_terms(model, X, NAMES)).sum(-2)
    with torch.no_grad():
        torch.testing.assert_close(model.proj(X), expected, atol=ATOL, rtol=0)
    # without renormalisation the kept probabilities are used as they are
    model.proj.composer.config = lk.MixtureConfig(top_k=2, renormalize=False)
    expected = model.proj.base_layer(X) + (torch.where(keep, p, 0.0)[..., None] * expert_terms(model, X, NAMES)).sum(-2)
    with torch.no_grad():
        torch.testing.assert_close(model.proj(X), expected, atol=ATOL, rtol=0)


def test_top_1_gives_each_token_exactly_its_best_expert():
    model = tiny_with_experts()
    lk.add_mixture(model, NAMES, lk.MixtureConfig(top_k=1))
    set_router(model)
    best = (X @ model.proj.composer.router.weight.t()).argmax(-1)          # (2, 4)
    terms = expert_terms(model, X, NAMES)                                   # (2, 4, 3, 5)
    expected = model.proj.base_layer(X) + terms.gather(-2, best[..., None, None].expand(2, 4, 1, 5)).squeeze(-2)
    with torch.no_grad():
        torch.testing.assert_close(model.proj(X), expected, atol=ATOL, rtol=0)
    assert len(set(best.flatten().tolist())) > 1


def _peft_llama_with(tmp_path, names):
    """PEFT's model of the same base with lorakit's saved experts loaded."""
    ref = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / names[0]), adapter_name=names[0])
    for n in names[1:]:
        ref.load_adapter(str(tmp_path / n), adapter_name=n)
    return ref.eval()


def test_uniform_start_equals_peft_cat_combination_with_equal_weights(tmp_path):
    """A zero gate mixes uniformly: sum_e s_e B_e A_e / E, which is PEFT's exact `cat` combination
    with weights 1/E (on Llama, ranks and targets differing between experts)."""
    model = tiny_llama()
    configs = {"a": lk.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
               "b": lk.LoraConfig(r=2, lora_alpha=5, target_modules=["q_proj", "v_proj", "down_proj"])}
    for seed, (name, cfg) in enumerate(configs.items()):
        lk.add_adapter(model, cfg, name=name)
        randomise(model, name, seed)
        lk.save_adapter(model, tmp_path / name, name=name)
    lk.add_mixture(model, ["a", "b"])
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model(ids).logits
    ref = _peft_llama_with(tmp_path, ["a", "b"])
    # PEFT's cat needs every adapter in every layer: b is missing from most, so weight it per layer
    # the way the mixture does there (a alone gets weight 1 in layers without b)
    only_a = ["k_proj", "o_proj", "gate_proj", "up_proj"]
    ref.add_weighted_adapter(["a", "b"], [0.5, 0.5], "mix", combination_type="cat")
    for name, module in ref.named_modules():
        if name.endswith(tuple(only_a)) and hasattr(module, "lora_A") and "mix" in module.lora_A:
            module.lora_A["mix"].weight.data *= 2
    ref.set_adapter("mix")
    with torch.no_grad():
        expected = ref(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_uniform_start_on_gpt2_conv1d_is_the_halved_sum():
    """GPT-2's Conv1D (weights stored transposed): the zero gate gives half of each expert."""
    model = tiny_gpt2()
    for seed, name in enumerate("ab"):
        lk.add_adapter(model, lk.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"), name=name)
        randomise(model, name, seed)
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    lk.add_mixture(model, ["a", "b"])
    with torch.no_grad():
        got = model(ids).logits
    lk.remove_mixture(model)
    for _, layer in lora_layers(model):
        for n in "ab":
            layer.scaling[n] *= 0.5
    with torch.no_grad():
        expected = model(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_experts_with_different_dropout_rates_keep_their_columns():
    """Columns are grouped by dropout rate (a, c | b below); the mixture still pairs each column with
    its own expert's gate (eval mode: no dropout, so the closed form holds)."""
    model = tiny_with_experts({
        "a": lk.LoraConfig(r=2, lora_alpha=4, target_modules=["proj"], lora_dropout=0.0),
        "b": lk.LoraConfig(r=3, lora_alpha=2, target_modules=["proj"], lora_dropout=0.2),
        "c": lk.LoraConfig(r=1, lora_alpha=3, target_modules=["proj"], lora_dropout=0.0),
    })
    lk.add_mixture(model, NAMES)
    set_router(model)
    assert model.proj.composer.col_expert.tolist() == [0, 0, 2, 1, 1, 1]
    g = torch.softmax(X @ model.proj.composer.router.weight.t(), dim=-1)
    expected = model.proj.base_layer(X) + (g[..., None] * expert_terms(model, X, NAMES)).sum(-2)
    with torch.no_grad():
        torch.testing.assert_close(model.proj(X), expected, atol=ATOL, rtol=0)
    model.train()   # dropout on b's columns only: a token's output changes, a and c's parts do not
    torch.manual_seed(0)
    with torch.no_grad():
        assert not torch.allclose(model.proj(X), expected, atol=1e-4)


def test_aux_losses_match_their_definitions_and_average_over_layers():
    model = tiny_with_experts({
        "a": lk.LoraConfig(r=2, lora_alpha=4, target_modules=["proj", "proj2"]),
        "b": lk.LoraConfig(r=3, lora_alpha=2, target_modules=["proj", "proj2"]),
    })
    lk.add_mixture(model, ["a", "b"], lk.MixtureConfig(temperature=2.0), trainable=True)
    set_router(model)
    model.train()
    model(X)
    expected_b, expected_z = [], []
    h = X
    for layer in (model.proj, model.proj2):
        logits = h.reshape(-1, h.shape[-1]) @ layer.composer.router.weight.t()     # (8, 2)
        p = torch.softmax(logits / 2.0, dim=-1)
        f = torch.stack([(p.argmax(-1) == e).float().mean() for e in range(2)])
        expected_b.append(2 * (f * p.mean(0)).sum())
        expected_z.append((torch.logsumexp(logits, -1) ** 2).mean())
        h = layer(h)
    losses = lk.mixture_aux_loss(model)
    torch.testing.assert_close(losses.balance, torch.stack(expected_b).mean(), atol=ATOL, rtol=0)
    torch.testing.assert_close(losses.z, torch.stack(expected_z).mean(), atol=ATOL, rtol=0)
    assert losses.balance > 1   # unbalanced random gate: the Switch loss is 1 only when balanced
    (losses.balance + losses.z).backward()
    assert model.proj.composer.router.weight.grad.abs().sum() > 0


def test_aux_loss_gradients_are_the_same_with_gradient_checkpointing():
    """The recorded losses keep their graph through recomputation (non-reentrant checkpointing)."""
    def grads(checkpointing: bool) -> list[torch.Tensor]:
        model = tiny_llama()
        for seed, name in enumerate("ab"):
            lk.add_adapter(model, lk.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"), name=name)
            randomise(model, name, seed)
        lk.add_mixture(model, ["a", "b"], lk.MixtureConfig(top_k=1, renormalize=False), train_experts=True)
        set_router(model)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(1))
        out = model(ids, use_cache=False).logits.square().mean()
        aux = lk.mixture_aux_loss(model)
        (out + aux.balance + aux.z).backward()
        return [p.grad for p in model.parameters() if p.requires_grad]

    plain, recomputed = grads(False), grads(True)
    assert len(plain) == 14 + 2 * 2 * 14
    for a, b in zip(plain, recomputed, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_balance_loss_of_a_uniform_gate_is_one():
    """Zero gate: P = 1/E for every expert and every token's top-1 is expert 0 (a tie), so
    E * sum_e f_e P_e = E * 1 * 1/E = 1; z = log(E)^2."""
    model = tiny_with_experts()
    lk.add_mixture(model, NAMES)
    model.train()
    model(X)
    losses = lk.mixture_aux_loss(model)
    assert losses.balance.item() == pytest.approx(1.0) and losses.z.item() == pytest.approx(torch.log(torch.tensor(3.0)).item() ** 2)


def test_gate_only_training_leaves_the_experts_untouched():
    model = tiny_with_experts()
    lk.add_mixture(model, NAMES)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"proj.composer.router.weight"}
    assert lk.trainable_parameters(model)[0] == 3 * 6
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    for _ in range(3):
        loss = model(X).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"proj.composer.router.weight"}


def test_joint_training_trains_experts_and_gate():
    model = tiny_with_experts()
    lk.add_mixture(model, NAMES, train_experts=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"proj.composer.router.weight"} | {f"proj.lora_{m}.{e}.weight" for m in "AB" for e in NAMES} \
        | {"proj.lora_B.b.bias"}
    model.train()
    model(X).square().mean().backward()
    assert all(model.get_parameter(n).grad is not None for n in trainable)


def test_save_load_round_trip_gives_identical_logits(tmp_path):
    model = tiny_llama()
    for seed, name in enumerate(["math", "chat"]):
        lk.add_adapter(model, lk.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"), name=name)
        randomise(model, name, seed)
    lk.add_mixture(model, ["math", "chat"], lk.MixtureConfig(top_k=1, temperature=0.7))
    set_router(model, scale=0.5)
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
    lk.save_mixture(model, tmp_path / "mix")
    files = sorted(p.relative_to(tmp_path / "mix").as_posix() for p in (tmp_path / "mix").rglob("*") if p.is_file())
    assert files == sorted([CONFIG_NAME, WEIGHTS_NAME, "chat/adapter_config.json", "chat/adapter_model.safetensors",
                            "math/adapter_config.json", "math/adapter_model.safetensors"])
    meta = json.loads((tmp_path / "mix" / CONFIG_NAME).read_text())
    assert meta == {"format": "lorakit-mixture", "format_version": 1, "kind": "moe", "experts": ["math", "chat"],
                    "config": {"top_k": 1, "temperature": 0.7, "renormalize": True}}
    gates = load_file(tmp_path / "mix" / WEIGHTS_NAME)
    assert gates["model.layers.0.self_attn.q_proj.router.weight"].shape == (2, 32) and len(gates) == 14

    fresh = lk.load_mixture(tiny_llama(), tmp_path / "mix")
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, expected)
    assert lk.trainable_parameters(fresh)[0] == 0     # loaded for inference by default
    assert lk.active_adapters(fresh) == ["math", "chat"]
    # each expert is a plain PEFT-format adapter
    alone = lk.load_adapter(tiny_llama(), tmp_path / "mix" / "math")
    with torch.no_grad():
        lk.remove_mixture(model)
        lk.set_active_adapters(model, ["math"])
        assert torch.equal(alone(ids).logits, model(ids).logits)


def test_load_for_training_and_load_weights_into_an_existing_mixture(tmp_path):
    model = tiny_with_experts()
    lk.add_mixture(model, NAMES)
    set_router(model)
    lk.save_mixture(model, tmp_path / "mix")
    again = lk.load_mixture(Tiny().eval(), tmp_path / "mix", trainable=True, train_experts=True)
    assert lk.trainable_parameters(again)[0] == lk.trainable_parameters(tiny_with_experts())[0] + 18
    with torch.no_grad():
        again.proj.composer.router.weight.zero_()
        again.proj.lora_A["a"].weight.zero_()
    load_mixture_weights(again, tmp_path / "mix")
    with torch.no_grad():
        assert torch.equal(again(X), model(X))


def test_disable_adapters_and_remove_mixture():
    model = tiny_with_experts()
    with torch.no_grad():
        base = model.proj2(model.proj.base_layer(X))
        lk.set_active_adapters(model, NAMES)
        summed = model(X)
        lk.add_mixture(model, NAMES)
        with lk.disable_adapters(model):
            assert torch.equal(model(X), base)
        assert not torch.allclose(model(X), summed)
        lk.remove_mixture(model)
        assert torch.equal(model(X), summed)
        assert model.proj.composer is None and "composer" not in dict(model.proj.named_children())
        with lk.per_sample_adapters(model, ["a", "b"]):   # the hook takes a plain composer again
            model(X)


def test_bf16_autocast_runs_close_to_fp32():
    model = tiny_llama()
    for seed, name in enumerate("ab"):
        lk.add_adapter(model, lk.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"), name=name)
        randomise(model, name, seed, scale=0.1)
    lk.add_mixture(model, ["a", "b"], lk.MixtureConfig(top_k=1))
    set_router(model, scale=0.3)
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(ids).logits
    assert (low.float() - ref).abs().max() < 0.1


# ---- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("experts, error, message", [
    (["a", "zz"], lk.AdapterStateError, "no adapter named 'zz'; adapters on this model: ['a', 'b', 'c']"),
    ([], lk.LoraError, "mixture of experts needs at least one adapter name"),
    ("a", lk.LoraError, "mixture of experts needs a list of adapter names, got 'a'"),
    (["a", "a"], lk.LoraError, "mixture of experts was given an adapter more than once: ['a', 'a']"),
])
def test_bad_expert_lists(experts, error, message):
    model = tiny_with_experts()
    with pytest.raises(error, match=re.escape(message)):
        lk.add_mixture(model, experts)
    assert not composers(model)


def test_unsupported_experts_are_refused():
    model = tiny_llama()
    lk.add_adapter(model, lk.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True), name="d")
    lk.add_adapter(model, lk.LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"]), name="e")
    lk.add_adapter(model, lk.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]), name="m")
    lk.add_adapter(model, lk.LoraConfig(r=2, target_modules=["q_proj"]), name="p")
    with pytest.raises(lk.AdapterStateError, match=r"does not support DoRA adapters: \['d'\] use DoRA in "
                                                    r"model.layers.0.self_attn.q_proj"):
        lk.add_mixture(model, ["d", "p"])
    with pytest.raises(lk.AdapterStateError, match=r"Linear layers only; model.embed_tokens \(Embedding\) holds \['e'\]"):
        lk.add_mixture(model, ["e", "p"])
    with pytest.raises(lk.AdapterStateError, match=r"adapters \['m'\] have modules_to_save copies"):
        lk.add_mixture(model, ["m", "p"])
    with pytest.raises(lk.ConfigError, match="top_k=3 is more than the 2 experts given"):
        lk.add_mixture(model, ["p", "m"], lk.MixtureConfig(top_k=3))
    lk.set_active_adapters(model, ["p"])
    lk.merge_adapters(model)
    with pytest.raises(lk.AdapterStateError, match=r"adapters \['p'\] are merged into model.layers.0.self_attn.q_proj"):
        lk.add_mixture(model, ["p"])
    assert not composers(model)


def test_state_errors():
    model = tiny_with_experts()
    with pytest.raises(lk.AdapterStateError, match="no mixture of experts; call add_mixture first"):
        lk.mixture_aux_loss(model)
    with pytest.raises(lk.AdapterStateError, match="no mixture or fusion to remove"):
        lk.remove_mixture(model)
    with pytest.raises(lk.AdapterStateError, match="no mixture or fusion to save"):
        lk.save_mixture(model, "unused")
    lk.add_mixture(model, ["a", "b"])
    with pytest.raises(lk.AdapterStateError, match="no training-mode forward has run"):
        lk.mixture_aux_loss(model)
    with pytest.raises(lk.AdapterStateError, match="already has a mixture or fusion; call remove_mixture"):
        lk.add_mixture(model, ["a", "c"])
    lk.set_active_adapters(model, ["a", "b"])
    lk.merge_adapters(model)
    with pytest.raises(lk.AdapterStateError, match=r"merged into proj, so the moe would add them twice"):
        model(X)
    lk.unmerge_adapters(model)
    model.proj.delete_adapter("b")
    with pytest.raises(lk.AdapterStateError, match=r"experts \['b'\] of the moe in proj were deleted"):
        model(X)


@pytest.mark.parametrize("field, value, message", [
    ("top_k", 0, "MixtureConfig.top_k must be an integer >= 1 or None (dense), got 0"),
    ("top_k", 1.5, "MixtureConfig.top_k must be an integer >= 1 or None (dense), got 1.5"),
    ("temperature", 0, "MixtureConfig.temperature must be a number > 0, got 0"),
    ("temperature", float("nan"), "MixtureConfig.temperature must be a number > 0, got nan"),
])
def test_bad_config(field, value, message):
    with pytest.raises(lk.ConfigError, match=re.escape(message)):
        lk.MixtureConfig(**{field: value})


def _saved(tmp_path):
    model = tiny_with_experts()
    lk.add_mixture(model, ["a", "b"])
    lk.save_mixture(model, tmp_path)
    return tmp_path


def _edit_config(path, **changes):
    file = path / CONFIG_NAME
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


@pytest.mark.parametrize("edit, error, message", [
    (lambda p: (p / CONFIG_NAME).unlink(), FileNotFoundError, "mixture_config.json not found: a saved mixture"),
    (lambda p: (p / CONFIG_NAME).write_text("{"), lk.AdapterFileError, "mixture_config.json:1: not valid JSON"),
    (lambda p: _edit_config(p, format="x"), lk.AdapterFileError, "is not a lorakit mixture config"),
    (lambda p: _edit_config(p, format_version=9), lk.AdapterFileError, "format_version 9 is not one this lorakit reads"),
    (lambda p: _edit_config(p, extra=1), lk.AdapterFileError, "unknown keys ['extra']"),
    (lambda p: _edit_config(p, kind="mlp"), lk.AdapterFileError, "kind must be one of moe, fusion, got 'mlp'"),
    (lambda p: _edit_config(p, experts=["a", "a"]), lk.AdapterFileError, "experts must be a non-empty list of distinct"),
    (lambda p: _edit_config(p, config={"top_k": 0}), lk.AdapterFileError, "MixtureConfig.top_k must be an integer"),
    (lambda p: _edit_config(p, config={"topk": 1}), lk.AdapterFileError, "unknown config key 'config.topk'; did you "
                                                                        "mean 'config.top_k'?"),
    (lambda p: (p / WEIGHTS_NAME).write_bytes(b"junk"), lk.AdapterFileError, "is truncated or corrupt"),
    (lambda p: save_file({}, p / WEIGHTS_NAME), lk.AdapterFileError, "does not fit this model's mixture (missing "
                                                                      "proj.router.weight)"),
    (lambda p: save_file({"proj.router.weight": torch.zeros(2, 7)}, p / WEIGHTS_NAME), lk.AdapterFileError,
     "proj.router.weight has shape (2, 7) but this model's mixture expects (2, 6)"),
    (lambda p: (p / "b" / "adapter_model.safetensors").unlink(), FileNotFoundError, "adapter_model.safetensors not found"),
])
def test_bad_files_are_refused_and_nothing_stays_loaded(tmp_path, edit, error, message):
    path = _saved(tmp_path)
    edit(path)
    model = Tiny()
    with pytest.raises(error, match=re.escape(message)):
        lk.load_mixture(model, path)
    assert lk.list_adapters(model) == [] and isinstance(model.proj, nn.Linear)


def test_loading_next_to_an_adapter_of_the_same_name_is_refused(tmp_path):
    path = _saved(tmp_path)
    model = Tiny()
    lk.add_adapter(model, lk.LoraConfig(r=2, target_modules=["proj"]), name="b")
    with pytest.raises(lk.AdapterStateError, match="an adapter named 'b' already exists"):
        lk.load_mixture(model, path)
    assert lk.list_adapters(model) == ["b"] and not composers(model)


def test_load_weights_needs_the_same_mixture(tmp_path):
    path = _saved(tmp_path)
    model = tiny_with_experts()
    lk.add_mixture(model, ["a", "c"])
    with pytest.raises(lk.AdapterFileError, match=r"describes a moe of \['a', 'b'\] .* but this model has a moe of "
                                                  r"\['a', 'c'\]"):
        load_mixture_weights(model, path)
    assert isinstance(model.proj.composer, MixtureOfExperts)


# ---- `lorakit train` with a mixture section ----------------------------------------------------
#
# Two single-task experts (sentiment and parity of the built-in tasks), each trained alone with the
# quickstart settings on its own task, then a gate-only mixture over them trained on the two tasks
# mixed. On a held-out set of both tasks each expert is good at its own half only; the mixture must
# beat both, and beat its own uniform start (so the gate learnt something).

def test_lorakit_train_gate_only_mixture_keeps_its_experts(tiny_experts, tmp_path):
    """The mechanics of the test below on the tiny experts, in the fast suite: `lorakit train` of a
    gate-only mixture writes the run and the experts it started from, unchanged."""
    out = tmp_path / "mix"
    assert cli.main(["train", *mixture_args(tiny_experts, out, 2)]) == 0
    for t in TASKS:
        start, written = (load_file(d / t / "adapter_model.safetensors") for d in (tiny_experts, out))
        assert written.keys() == start.keys() and all(torch.equal(v, start[k]) for k, v in written.items()), t
    meta = json.loads((out / CONFIG_NAME).read_text())
    assert meta["kind"] == "moe" and meta["experts"] == ["sentiment", "parity"]
    assert (out / "tokenizer_config.json").is_file() and (out / "metrics.csv").is_file()
    assert not (out / "adapter_config.json").exists()
    assert composers(lk.load_mixture(base_model(tiny_experts), out))


@pytest.mark.slow   # learning: the experts are trained on the built-in model first
def test_lorakit_train_gate_only_mixture_beats_each_expert_on_the_mixed_tasks(experts, tmp_path):
    out = tmp_path / "mix"
    assert cli.main(["train", *mixture_args(experts, out, 20)]) == 0
    single = single_expert_losses(experts)
    uniform = lk.add_mixture(lk.load_adapter(lk.load_adapter(base_model(), experts / "sentiment", "sentiment"),
                                             experts / "parity", "parity"), ["sentiment", "parity"])
    start = eval_loss(uniform, experts)
    trained = lk.load_mixture(base_model(), out)
    mixed = eval_loss(trained, experts)
    assert mixed < 0.8 * min(single.values()), (mixed, single)
    assert mixed < 0.8 * start, (mixed, start)
    # gate-only: the experts written with the mixture are the experts it started from
    for t in TASKS:
        assert load_file(out / t / "adapter_model.safetensors").keys() == load_file(experts / t / "adapter_model.safetensors").keys()
        for k, v in load_file(out / t / "adapter_model.safetensors").items():
            assert torch.equal(v, load_file(experts / t / "adapter_model.safetensors")[k]), k
    meta = json.loads((out / CONFIG_NAME).read_text())
    assert meta["kind"] == "moe" and meta["experts"] == ["sentiment", "parity"]
    assert (out / "tokenizer_config.json").is_file() and (out / "metrics.csv").is_file()
    assert not (out / "adapter_config.json").exists()


@pytest.mark.slow
def test_trained_mixture_answers_both_tasks(tmp_path):
    """Longer runs: experts that know their task, a gate that routes each prompt's tokens to the right
    one; the mixture's exact match on the mixed set beats each expert's (each knows half the set)."""
    root = task_experts(tmp_path / "experts", steps=150, n_eval=50)
    out = tmp_path / "mix"
    assert cli.main(["train", *mixture_args(root, out, 100)]) == 0
    tokenizer, examples = mixed_eval(root)
    cpu = torch.device("cpu")
    single = {t: evaluate(lk.load_adapter(base_model(), root / t), tokenizer, examples, 50, cpu) for t in TASKS}
    mixed = evaluate(lk.load_mixture(base_model(), out), tokenizer, examples, 50, cpu)
    assert all(mixed.loss < r.loss for r in single.values()), (mixed, single)
    assert mixed.exact_match >= 0.8 and all(mixed.exact_match > r.exact_match + 0.2 for r in single.values()), \
        (mixed.exact_match, {t: r.exact_match for t, r in single.items()})


def test_joint_training_resumes_exactly_with_the_aux_losses(tiny_experts, tmp_path):
    """train_experts=true with both aux losses: a run resumed from its step-2 checkpoint ends with the
    same gates, experts and logged losses as the uninterrupted run."""
    extra = ["mixture.train_experts=true", "mixture.z_loss=0.001", "training.micro_batch_size=4",
             "training.save_every=2", "training.lr=1e-3"]
    a, b = tmp_path / "a", tmp_path / "b"
    whole = train(load_config(*split_args(mixture_args(tiny_experts, a, 4, *extra))))
    assert sorted(p.name for p in (a / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    step2 = a / "checkpoints" / "step-00000002"
    assert (step2 / CONFIG_NAME).is_file() and (step2 / "parity" / "adapter_model.safetensors").is_file()
    shutil.copytree(step2, b / "checkpoints" / "step-00000002")
    resumed = train(load_config(*split_args(mixture_args(tiny_experts, b, 4, *extra, "training.resume=auto"))))
    assert resumed.losses == whole.losses[2:]
    for rel in (WEIGHTS_NAME, "sentiment/adapter_model.safetensors", "parity/adapter_model.safetensors"):
        x, y = load_file(a / rel), load_file(b / rel)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), rel
    # the experts trained: they moved away from where they started
    start = load_file(tiny_experts / "parity" / "adapter_model.safetensors")
    assert any(not torch.equal(v, start[k]) for k, v in load_file(a / "parity" / "adapter_model.safetensors").items())


def test_training_config_errors(tiny_experts, tmp_path):
    with pytest.raises(lk.ConfigError, match="output.merged_model cannot be used with mixture.experts"):
        load_config(*split_args(mixture_args(tiny_experts, tmp_path, 1, "output.merged_model=true")))
    with pytest.raises(lk.ConfigError, match=re.escape("mixture.moe.top_k=3 is more than the 2 experts")):
        load_config(*split_args(mixture_args(tiny_experts, tmp_path, 1, "mixture.moe.top_k=3")))
    with pytest.raises(FileNotFoundError, match="adapter directory .*nowhere does not exist"):
        train(load_config(*split_args(mixture_args(tiny_experts, tmp_path, 1, f"mixture.experts.parity={tmp_path / 'nowhere'}"))))


@pytest.mark.parametrize("overrides, message", [
    (["mixture.kind=mlp"], "mixture.kind must be one of moe, fusion, got 'mlp'"),
    (["mixture.moe.top_k=2"], "mixture settings are given but mixture.experts is empty"),
    (["mixture.experts.a=x", "mixture.fusion.key_dim=3"], "mixture.fusion is set but mixture.kind is moe"),
    (["mixture.experts.a=x", "mixture.kind=fusion", "mixture.z_loss=1", "mixture.moe.top_k=1"],
     "mixture.z_loss, mixture.moe: for kind moe only, but mixture.kind is fusion"),
    (["mixture.experts={a b: x}"], "mixture.experts names ['a b'] are not valid adapter names"),
    (["mixture.experts.a=3"], "mixture.experts maps expert names to adapter directories; {'a': 3} is not a path"),
    (["mixture.experts.a=x", "mixture.balance_loss=-1"], "mixture.balance_loss must be >= 0, got -1"),
    (["mixture.moe.tok_k=1"], "unknown config key 'mixture.moe.tok_k'; did you mean 'mixture.moe.top_k'?"),
    (["mixture.experts.a=x", "mixture.fusion.value_rank=0", "mixture.kind=fusion"],
     "FusionConfig.value_rank must be an integer >= 1 or None, got 0"),
])
def test_mixture_section_errors(overrides, message):
    with pytest.raises(lk.ConfigError, match=re.escape(message)):
        load_config(None, overrides)


def test_mixture_section_is_documented():
    from lorakit.schema import field_docs
    from lorakit.train.config import MixtureSection

    for cls in (MixtureSection, lk.MixtureConfig, lk.FusionConfig):
        assert set(field_docs(cls)) == set(cls.__dataclass_fields__), cls
    cfg = load_config(None, ["mixture.experts={a: runs/a, b: runs/b}", "mixture.kind=fusion",
                             "mixture.fusion.value_rank=null"])
    assert cfg.mixture.experts == {"a": "runs/a", "b": "runs/b"} and cfg.mixture.fusion.value_rank is None
