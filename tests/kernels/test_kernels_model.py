"""`lorakit.train.kernels.use_kernels`: which modules of a transformers model it routes through the
Triton kernels (run here in Triton's interpreter, tests/conftest.py), that the adapted model's loss
and gradients are unchanged, that the adapters' inputs are still rebuilt rather than kept, and that
`remove` puts the PyTorch code back."""

from __future__ import annotations

import re

import pytest
import torch
from tiny_models import tiny_gpt2, tiny_llama, tiny_model
from transformers.models.llama import modeling_llama

import lorakit as lk
from lorakit.train import kernels as km


def adapted_llama(dropout=0.0):
    model = tiny_llama()
    lk.add_adapter(model, lk.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear"))
    with torch.no_grad():   # B != 0, so the adapters' gradients depend on everything they read
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model.train()


def loss_and_grads(model, ids):
    loss = model(input_ids=ids, labels=ids).loss
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for n, p in model.named_parameters() if p.requires_grad])
    return loss.detach(), dict(zip(names, grads, strict=True))


@pytest.fixture
def patched():
    patches = []
    yield patches
    for p in patches:
        p.remove()


def test_llama_modules_are_routed_through_the_kernels(patched):
    model = adapted_llama()
    patch = km.use_kernels(model)
    patched.append(patch)
    layers = model.config.num_hidden_layers
    assert len(patch.norms) == 2 * layers + 1           # input, post-attention, final
    assert all(isinstance(m, modeling_llama.LlamaRMSNorm) for m in patch.norms)
    assert len(patch.mlps) == layers
    assert all(isinstance(m, modeling_llama.LlamaAttention) for m in patch.attentions)
    assert len(patch.attentions) == layers
    assert patch.rope_modules == [modeling_llama]
    assert modeling_llama.apply_rotary_pos_emb.__wrapped__ is not None
    assert all(isinstance(m, lk.layers.LoraLinear) and m.dropout_kernel for m in patch.adapted)
    assert len(patch.adapted) == 7 * layers
    assert patch.describe() == (f"Triton kernels: {2 * layers + 1} RMSNorm, {layers} SwiGLU MLP, "
                                f"{layers} RoPE attention modules, dropout in {7 * layers} adapted layers, "
                                "the chunked loss")


def test_gpt2_has_nothing_to_route(patched):
    patch = km.use_kernels(tiny_gpt2())
    patched.append(patch)
    assert (patch.norms, patch.mlps, patch.attentions, patch.adapted, patch.rope_modules) == ([], [], [], [], [])


def test_loss_and_adapter_gradients_are_unchanged(patched, ids):
    model = adapted_llama()
    want_loss, want = loss_and_grads(model, ids)
    patched.append(km.use_kernels(model))
    got_loss, got = loss_and_grads(model, ids)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-5)
    assert got.keys() == want.keys() and len(got) == 7 * 2 * 2
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_dropout_masks_follow_the_seed_and_checkpointing_draws_them_again(patched, ids):
    """With dropout the kernels draw other masks than PyTorch's generator, so the reference is the
    kernels themselves: a seeded step is reproducible, and activation checkpointing, which restores
    the RNG state before recomputing a layer, gets the same masks (same loss and gradients)."""
    model = adapted_llama(dropout=0.2)
    patched.append(km.use_kernels(model))

    def seeded():
        torch.manual_seed(5)
        return loss_and_grads(model, ids)
    loss, grads = seeded()
    again, grads_again = seeded()
    assert torch.equal(loss, again) and all(torch.equal(grads[n], grads_again[n]) for n in grads)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ckpt_loss, ckpt_grads = seeded()
    torch.testing.assert_close(ckpt_loss, loss, rtol=1e-6, atol=0)
    for name in grads:
        torch.testing.assert_close(ckpt_grads[name], grads[name], rtol=1e-5, atol=1e-7)
    torch.manual_seed(6)
    other, _ = loss_and_grads(model, ids)
    assert not torch.equal(other, loss)          # another seed, other masks


def saved_bytes(model, ids):
    """Bytes autograd keeps for backward at the end of forward, each storage once, parameters out."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    del loss
    return sum(seen.values())


def test_adapters_still_rebuild_their_inputs(patched, ids, monkeypatch):
    """With the kernels the down_proj adapter's input (the SwiGLU product) is rebuilt from the
    factors swiglu keeps, as on the PyTorch path: without that recipe each layer would keep the
    product, B x T x intermediate fp32 more. And the norm kernel keeps less than PyTorch's norm."""
    model = adapted_llama()
    before = saved_bytes(model, ids)
    patched.append(km.use_kernels(model))
    after = saved_bytes(model, ids)
    assert after < before, (after, before)
    monkeypatch.setattr(km.recompute, "record_output", lambda out, recipe: None)
    product = ids.numel() * model.config.intermediate_size * 4
    assert saved_bytes(model, ids) - after == model.config.num_hidden_layers * product


def test_dropout_kernels_keep_the_same_bits(patched, ids):
    """The kernels keep each mask as the same number of bits as the PyTorch path."""
    model = adapted_llama(dropout=0.2)
    torch_bytes = saved_bytes(model, ids)
    patch = km.use_kernels(model)
    patched.append(patch)
    for m in patch.norms + patch.mlps + patch.attentions:    # only the dropout kernels
        vars(m).pop("forward")
    assert saved_bytes(model, ids) == torch_bytes


def test_remove_restores_the_pytorch_code(patched):
    original = modeling_llama.apply_rotary_pos_emb
    model = adapted_llama()
    first, second = km.use_kernels(model), km.use_kernels(tiny_llama())
    assert modeling_llama.apply_rotary_pos_emb is not original
    assert all("forward" in vars(m) for m in first.norms + first.mlps + first.attentions)
    first.remove()
    assert not any("forward" in vars(m) or "dropout_kernel" in vars(m) for m in model.modules())
    assert modeling_llama.apply_rotary_pos_emb is not original      # the second model still uses it
    second.remove()
    assert modeling_llama.apply_rotary_pos_emb is original


def test_tensors_the_kernels_cannot_take_go_to_pytorch(patched, ids, monkeypatch):
    """A patched model moved where Triton cannot run (CPU outside the interpreter) runs PyTorch."""
    model = adapted_llama()
    want, _ = loss_and_grads(model, ids)
    patched.append(km.use_kernels(model))
    monkeypatch.setattr(km, "runs_on", lambda t: False)
    refuse_kernels(monkeypatch)
    got, _ = loss_and_grads(model, ids)
    assert torch.equal(got, want)


def refuse_kernels(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a kernel ran")
    for name in ("rms_norm", "swiglu", "rope"):
        module = __import__(f"lorakit.kernels.{name}", fromlist=[name])
        monkeypatch.setattr(module, name, refuse)


def test_other_models_keep_pytorch(patched, ids, monkeypatch):
    """The RoPE replacement is a global of the modeling module, but it runs the kernel only for the
    attention modules of a patched model."""
    other = adapted_llama()
    want, _ = loss_and_grads(other, ids)
    patched.append(km.use_kernels(adapted_llama()))
    refuse_kernels(monkeypatch)
    got, _ = loss_and_grads(other, ids)
    assert torch.equal(got, want)


def test_kernels_wanted(monkeypatch):
    monkeypatch.setattr(km.kernel_check, "self_check", lambda device: None)   # no CUDA device to check here
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert km.kernels_wanted("torch", cuda, compiling=False) is False
    assert km.kernels_wanted("auto", cpu, compiling=False) is False
    assert km.kernels_wanted("auto", cuda, compiling=True) is False       # inductor writes its own
    assert km.kernels_wanted("auto", cuda, compiling=False) is True
    assert km.kernels_wanted("triton", cpu, compiling=False) is True      # the interpreter is on here


def test_kernels_that_fail_their_check_are_not_used(monkeypatch):
    monkeypatch.setattr(km.kernel_check, "self_check", lambda device: "swiglu (torch.float32) differs")
    with pytest.warns(UserWarning, match=re.escape(
            "training.kernels: auto: the Triton kernels failed their check against PyTorch on cuda "
            "(swiglu (torch.float32) differs); this run uses the PyTorch path")):
        assert km.kernels_wanted("auto", torch.device("cuda"), compiling=False) is False
    with pytest.raises(RuntimeError, match="^" + re.escape(
            "training.kernels: triton: the Triton kernels failed their check against PyTorch on cpu: "
            "swiglu (torch.float32) differs; set training.kernels: torch") + "$"):
        km.kernels_wanted("triton", torch.device("cpu"), compiling=False)


def test_kernels_wanted_errors(monkeypatch):
    monkeypatch.setattr(km, "interpreting", lambda: False)
    with pytest.raises(ValueError, match=re.escape(
            "training.kernels: triton runs on CUDA, not cpu; set training.kernels: torch (or auto), or "
            "TRITON_INTERPRET=1 to run the kernels in Triton's interpreter (slow: for tests)")):
        km.kernels_wanted("triton", torch.device("cpu"), compiling=False)
    monkeypatch.setattr(km, "triton_importable", lambda: False)
    assert km.kernels_wanted("auto", torch.device("cuda"), compiling=False) is False
    with pytest.raises(ImportError, match=re.escape(
            "training.kernels: triton needs triton: pip install 'lorakit[kernels]' (CUDA builds of torch "
            "include it), or set training.kernels: torch")):
        km.kernels_wanted("triton", torch.device("cuda"), compiling=False)
    with pytest.raises(ImportError, match=re.escape("lorakit's Triton kernels need triton")):
        km.use_kernels(tiny_llama())


def test_a_deep_copy_runs_on_its_own_weights(patched, ids):
    """modules_to_save deep-copies a module: the copy's replacement forward is bound to the copy."""
    import copy

    model = adapted_llama()
    patched.append(km.use_kernels(model))
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone.model.norm.weight.mul_(3)
    plain = adapted_llama()
    plain.load_state_dict(clone.state_dict())
    torch.testing.assert_close(clone(ids).logits, plain(ids).logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(clone(ids).logits, model(ids).logits)


def test_modules_to_save_after_the_kernels_trains_the_copy(patched, ids):
    model = tiny_llama()
    patched.append(km.use_kernels(model))
    lk.add_adapter(model, lk.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["norm"]))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    trained = [p for n, p in model.named_parameters() if "modules_to_save" in n and n.endswith("norm.modules_to_save.default.weight")]
    assert len(trained) == 1 and trained[0].grad is not None and trained[0].grad.abs().sum() > 0


def test_rope_is_routed_for_a_family_patched_after_llama(patched):
    patched.append(km.use_kernels(tiny_llama()))
    mistral = tiny_model("mistral", seed=None, pad_token_id=None, training=True)
    patch = km.use_kernels(mistral)
    patched.append(patch)
    assert len(patch.attentions) == 2 and len(patch.norms) == 5 and len(patch.mlps) == 2


def test_other_dtypes_go_to_pytorch(patched, ids, monkeypatch):
    model = adapted_llama().double()
    want, _ = loss_and_grads(model, ids)
    patched.append(km.use_kernels(model))
    refuse_kernels(monkeypatch)
    got, _ = loss_and_grads(model, ids)
    assert torch.equal(got, want)


def test_a_second_patch_of_the_same_model_changes_nothing_and_removes_nothing(patched):
    model = adapted_llama()
    first = km.use_kernels(model)
    patched.append(first)
    second = km.use_kernels(model)
    assert (second.norms, second.mlps, second.attentions, second.adapted) == ([], [], [], [])
    second.remove()
    assert all("forward" in vars(m) for m in first.norms + first.mlps + first.attentions)
    assert all(m.dropout_kernel for m in first.adapted)


def test_a_patch_that_fails_half_way_undoes_itself(monkeypatch):
    original = modeling_llama.apply_rotary_pos_emb
    calls = []

    def failing(module):   # fails once the first attention module and the RoPE global are patched
        calls.append(module)
        if modeling_llama.apply_rotary_pos_emb is not original:
            raise RuntimeError("boom")
        return False
    monkeypatch.setattr(km, "_is_swiglu_mlp", failing)
    model = adapted_llama()
    with pytest.raises(RuntimeError, match="boom"):
        km.use_kernels(model)
    assert modeling_llama.apply_rotary_pos_emb is original
    assert not any("forward" in vars(m) or "dropout_kernel" in vars(m) for m in model.modules())


def test_modules_someone_else_replaced_are_left_with_a_warning(patched):
    model = adapted_llama()
    norm = model.model.norm
    norm.forward = lambda x: x            # e.g. an accelerate hook
    with pytest.warns(UserWarning, match=re.escape(
            "use_kernels: 1 modules (LlamaRMSNorm) already have their forward replaced on the instance")):
        patch = km.use_kernels(model)
    patched.append(patch)
    assert norm not in patch.norms and len(patch.norms) == 4
