"""Adapter inputs rebuilt in backward (lorakit.ops.recompute): the same gradients, bit for bit, as
keeping the input, and saved activations down to the frozen base's."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_gpt2, tiny_llama

import lorakit as lk
from lorakit import layers
from lorakit.ops import recompute


def _adapted(model, dropout=0.0, targets="all-linear"):
    lk.add_adapter(model, lk.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.train()


def _grads(model, ids, autocast=False):
    torch.manual_seed(11)   # the same dropout masks in every run
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(ids, labels=ids).loss
    loss.backward()
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), out


def _keep_inputs(monkeypatch):
    monkeypatch.setattr(layers, "find_recipe", lambda x: None)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_gradients_are_bit_identical_to_keeping_the_input(make, dropout, autocast, ids, monkeypatch):
    model = _adapted(make(), dropout)
    loss, grads = _grads(model, ids, autocast)
    _keep_inputs(monkeypatch)
    loss_kept, kept = _grads(model, ids, autocast)
    assert torch.equal(loss, loss_kept)
    assert grads.keys() == kept.keys() and len(grads) > 0
    for name in grads:
        assert torch.equal(grads[name], kept[name]), name


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_each_norm_output_is_rebuilt_once_for_all_its_adapters(ids, checkpointing, monkeypatch):
    """q, k and v read one norm output, gate and up another: backward rebuilds each once, not once
    per adapter."""
    model = _adapted(tiny_llama())
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    calls = []
    norm_class = type(model.model.norm)
    forward = norm_class.forward

    def counted(self, x):
        if self is not model.model.norm:     # the final norm feeds the head, no adapter
            calls.append(torch.is_grad_enabled())
        return forward(self, x)
    monkeypatch.setattr(norm_class, "forward", counted)
    loss = model(ids, labels=ids).loss
    forward_calls = len(calls)
    calls.clear()
    loss.backward()
    layers_n = model.config.num_hidden_layers
    assert forward_calls == 2 * layers_n
    # backward: the rebuilds run without grad (plus, with checkpointing, the recomputed forward's);
    # the first norm's input (the frozen embeddings' output) has no graph unless checkpointing
    # makes it require grad, so its adapters keep their input instead
    assert calls.count(False) == 2 * layers_n - (0 if checkpointing else 1)
    assert calls.count(True) == (2 * layers_n if checkpointing else 0)


def test_a_backward_that_reaches_some_adapters_drops_the_rebuilt_input(ids):
    """autograd.grad on one adapter's A: the others' backward never asks for the shared x, which
    is dropped when that backward ends, not kept until the graph dies."""
    model = _adapted(tiny_llama())
    recipes = []
    original = recompute.find_recipe

    def spy(x):
        recipe = original(x)
        if recipe is not None:
            recipes.append(recipe)
        return recipe
    layers.find_recipe, saved = spy, layers.find_recipe
    try:
        loss = model(ids, labels=ids).loss
    finally:
        layers.find_recipe = saved
    shared_q = next(r.shared for r in recipes if r.shared.pending == 3)      # layer 1's q/k/v input
    target = model.model.layers[1].self_attn.q_proj.lora_A["default"].weight
    torch.autograd.grad(loss, [target])
    assert shared_q.pending == 2 and shared_q.x is None


def test_gradients_with_activation_checkpointing(ids, monkeypatch):
    model = _adapted(tiny_llama(), 0.1)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _, grads = _grads(model, ids)
    _keep_inputs(monkeypatch)
    _, kept = _grads(model, ids)
    for name in grads:
        assert torch.equal(grads[name], kept[name]), name


def _recipes_seen(model, ids) -> dict[str, str | None]:
    """Which recipe each adapted layer found for its input (None: it keeps the input)."""
    seen = {}
    original = layers.find_recipe

    def spy(x):
        recipe = original(x)
        seen[len(seen)] = None if recipe is None else recipe.fn.__name__
        return recipe

    layers.find_recipe = spy
    try:
        model(ids).logits.sum().backward()
    finally:
        layers.find_recipe = original
    model.zero_grad(set_to_none=True)
    names = [n for n, _ in lk.inject.lora_layers(model)]
    return {name.split(".", 3)[-1]: seen[i] for i, name in enumerate(names) if name.startswith("model.layers.1.")}


def test_which_inputs_are_rebuilt(ids):
    """Layer 1 (layer 0's first norm reads the frozen embeddings: its output needs no graph, so
    keeping it costs what keeping its input would)."""
    model = _adapted(tiny_llama())
    assert _recipes_seen(model, ids) == {
        "self_attn.q_proj": "forward", "self_attn.k_proj": "forward", "self_attn.v_proj": "forward",
        "self_attn.o_proj": None,    # the attention keeps its output itself
        "mlp.gate_proj": "forward", "mlp.up_proj": "forward", "mlp.down_proj": "mul",
    }


def _saved_bytes(model, ids) -> int:
    """Bytes autograd keeps for backward, each storage once, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            kept[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, labels=ids).loss
    del loss
    return sum(kept.values())


@pytest.mark.parametrize("make, adapters, attn_out, extra", [
    (lambda: tiny_llama(intermediate_size=128), 7, False, 1.25),
    (tiny_gpt2, 4, True, 1.1),    # GPT-2's attention (math path, with dropout) does not keep its output
], ids=["llama", "gpt2"])
def test_saved_activations_are_those_of_the_frozen_base(make, adapters, attn_out, extra, monkeypatch):
    ids = torch.randint(3, 100, (4, 48), generator=torch.Generator().manual_seed(0))
    base = make()
    base.requires_grad_(False)
    base.enable_input_require_grads()
    torch.manual_seed(0)
    floor = _saved_bytes(base.train(), ids)
    model = _adapted(make())
    model.enable_input_require_grads()   # the same graph as the floor's, so the bytes compare exactly
    torch.manual_seed(0)
    rebuilt = _saved_bytes(model, ids)
    _keep_inputs(monkeypatch)
    torch.manual_seed(0)
    kept = _saved_bytes(model, ids)
    # what remains above the floor is h = x A^T, (tokens, r) per adapter, and the attention output
    # where the attention does not keep it itself
    h_bytes = adapters * 2 * ids.numel() * 4 * 4
    out_bytes = 2 * ids.numel() * 32 * 4 if attn_out else 0
    assert rebuilt == floor + h_bytes + out_bytes, (rebuilt, floor)
    assert kept > extra * floor, (kept, floor)     # the norm outputs and the MLP's inputs, per layer


def test_an_input_changed_in_place_is_kept_not_rebuilt(ids, monkeypatch):
    """A hook scales the norm output in place before q/k/v read it: the rebuilt value would be the
    unscaled one, so the adapters must keep the input (same gradients as with recipes off)."""
    model = _adapted(tiny_llama())
    model.model.layers[1].input_layernorm.register_forward_hook(lambda m, a, out: out.mul_(2.0))
    seen = _recipes_seen(model, ids)
    assert seen["self_attn.q_proj"] is None and seen["mlp.gate_proj"] == "forward"
    _, grads = _grads(model, ids)
    _keep_inputs(monkeypatch)
    _, kept = _grads(model, ids)
    for name in grads:
        assert torch.equal(grads[name], kept[name]), name


def test_nothing_is_recorded_without_a_graph(ids):
    model = _adapted(tiny_llama())
    recompute._registry.outputs.clear()
    recompute._registry.factors.clear()
    with torch.no_grad():
        model(ids)
    model.eval()
    with torch.inference_mode():
        model(ids)
    assert not recompute._registry.outputs and not recompute._registry.factors


def test_entries_vanish_with_their_tensors(ids):
    model = _adapted(tiny_llama())
    held: list[torch.Tensor] = []
    model.model.layers[1].input_layernorm.register_forward_hook(lambda m, a, out: held.append(out))
    loss = model(ids, labels=ids).loss
    assert id(held[0]) in recompute._registry.outputs and recompute._registry.factors
    loss.backward()
    held.clear()
    del loss
    assert not recompute._registry.outputs and not recompute._registry.factors


def test_unload_removes_the_hooks(ids):
    model = _adapted(tiny_llama())
    norm = model.model.layers[0].input_layernorm
    assert norm._forward_hooks
    lk.unload(model, merge=False)
    assert not norm._forward_hooks
