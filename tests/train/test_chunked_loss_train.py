"""`training.chunked_loss` and `training.compile`: the same training as the plain path.

`loss_sum(..., chunked=True)` against the full-logits path on the models and heads it applies to
and on those where it must fall back; then whole `lorakit train` runs with each option on and off.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny_model
from transformers import LlamaForCausalLM

import lorakit as lk
import lorakit.train.loss as loss_module
from lorakit.train.config import load_config
from lorakit.train.loop import train
from lorakit.train.loss import loss_sum

VOCAB = 300


def llama(tie: bool = False) -> LlamaForCausalLM:
    """The tiny Llama at vocab 300, without a padding row, in training mode."""
    return tiny_model(vocab=VOCAB, tie=tie, pad_token_id=None, training=True)


def a_batch(rows: int = 3, length: int = 20) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (rows, length), generator=g)
    labels = ids.clone()
    labels[:, :6] = -100                      # a prompt
    labels[1, 14:] = -100                     # padding
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def loss_and_grads(model, batch, chunked, autocast=False):
    torch.manual_seed(7)                      # the same dropout masks for both paths
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        s, n = loss_sum(model, batch, chunked=chunked)
    s.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return s.detach(), n, grads


def assert_same(model, batch, autocast=False, rtol=1e-5, atol=1e-6):
    s0, n0, g0 = loss_and_grads(model, batch, False, autocast)
    s1, n1, g1 = loss_and_grads(model, batch, True, autocast)
    assert n0 == n1 == int((batch["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(s1, s0, rtol=rtol, atol=0)
    assert g0.keys() == g1.keys() and g0
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


@pytest.fixture
def count_chunked(monkeypatch):
    """How many times the loss went through the chunked op."""
    calls = []
    real = loss_module.chunked_cross_entropy
    monkeypatch.setattr(loss_module, "chunked_cross_entropy", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("tie", [False, True], ids=["separate_head", "tied_head"])
def test_loss_and_gradients_equal_the_full_logits(tie, count_chunked):
    model = llama(tie)
    lk.add_adapter(model, lk.LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.1, init_lora_weights=False))
    model.train()
    assert_same(model, a_batch())
    assert len(count_chunked) == 1


def test_bf16_autocast_within_rounding(count_chunked):
    model = llama()
    lk.add_adapter(model, lk.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    assert_same(model, a_batch(), autocast=True, rtol=2e-2, atol=2e-3)
    assert len(count_chunked) == 1


def test_trained_head_through_modules_to_save(count_chunked):
    """A head trained in full (modules_to_save) keeps the chunked path and gets the same gradient."""
    model = llama()
    lk.add_adapter(model, lk.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"],
                                        init_lora_weights=False))
    s0, _, g0 = loss_and_grads(model, a_batch(), False)
    s1, _, g1 = loss_and_grads(model, a_batch(), True)
    head = [k for k in g0 if "lm_head" in k]
    assert head and len(count_chunked) == 1
    torch.testing.assert_close(s1, s0, rtol=1e-5, atol=0)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-6)


def test_head_with_its_own_adapter_takes_the_plain_path(count_chunked):
    model = llama()
    lk.add_adapter(model, lk.LoraConfig(r=4, target_modules=["q_proj", "lm_head"], init_lora_weights=False))
    assert_same(model, a_batch())
    assert count_chunked == []


def test_logits_changed_after_the_head_fall_back_with_one_warning(count_chunked):
    """Gemma 2 soft-caps its logits after the head: the first call is run again on the plain path with
    the same dropout masks, one warning says so, and later calls take the plain path directly."""
    model = tiny_model("gemma2", vocab=VOCAB, final_logit_softcapping=3.0, training=True)   # head_dim 8
    lk.add_adapter(model, lk.LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.2, init_lora_weights=False))
    model.train()
    s0, _, g0 = loss_and_grads(model, a_batch(), False)
    with pytest.warns(UserWarning, match="Gemma2ForCausalLM changes its logits after the output head"):
        s1, _, g1 = loss_and_grads(model, a_batch(), True)
    assert torch.equal(s1, s0) and all(torch.equal(g1[k], g0[k]) for k in g0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s2, _, _ = loss_and_grads(model, a_batch(), True)
    assert torch.equal(s2, s0) and count_chunked == []
    assert "forward" not in vars(model.get_output_embeddings())     # the head's own forward is back


# ---- whole training runs ------------------------------------------------------------------------


def adapter(path):
    return load_file(Path(path) / "adapter_model.safetensors")


def run(overrides):
    return train(load_config(None, overrides))


@pytest.mark.parametrize("extra", [[], ["lora.lora_dropout=0.1", "training.gradient_checkpointing=true"]],
                         ids=["plain", "dropout_checkpointing"])
def test_training_steps_equal_with_and_without_chunked_loss(base_overrides, tmp_path, extra):
    full = run(base_overrides + extra + ["training.chunked_loss=false", f"output.dir={tmp_path / 'full'}"])
    chunked = run(base_overrides + extra + ["training.chunked_loss=true", f"output.dir={tmp_path / 'chunked'}"])
    assert chunked.losses == pytest.approx(full.losses, rel=1e-5)
    a, b = adapter(tmp_path / "full"), adapter(tmp_path / "chunked")
    assert a.keys() == b.keys()
    for k in a:   # Adam divides by the gradient's scale, so float rounding shows at ~1e-6
        torch.testing.assert_close(b[k], a[k], atol=2e-5, rtol=1e-4)
    assert chunked.peak_memory_bytes < full.peak_memory_bytes


@pytest.mark.slow   # inductor compiles each decoder layer for static, then dynamic shapes: 25-100 s on 2 cores
def test_compiled_layers_train_the_same(base_overrides, tmp_path):
    """Steps that PeakMemory watches on a CPU run eagerly (see lorakit.train.compilation), so the run
    is long enough for compiled steps, and the test checks that dynamo did compile."""
    from torch._dynamo.utils import counters

    common = base_overrides + ["training.max_steps=5", "data.eval=null"]
    eager = run(common + [f"output.dir={tmp_path / 'e'}"])
    torch._dynamo.reset()
    counters.clear()
    try:
        compiled = run(common + ["training.compile=true", f"output.dir={tmp_path / 'c'}"])
        assert counters["frames"]["ok"] >= 2 and counters["stats"]["unique_graphs"] >= 2
    finally:
        torch._dynamo.reset()
    assert compiled.losses == pytest.approx(eager.losses, abs=1e-4)
