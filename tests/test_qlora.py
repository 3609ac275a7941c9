"""QLoRA: adapters over a frozen 4-bit NF4 base (bitsandbytes `Linear4bit`), on CPU.

The reference for every output is the closed form on the dequantized weight, deq(Q(W)):
    y = x deq(Q(W))^T + b + s (x A^T) B^T
and PEFT's own QLoRA layer on the same quantized model for parity.
"""

from __future__ import annotations

import copy
import csv
import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny_gpt2, tiny_llama, tiny_model_dir
from torch import nn
from transformers import AutoModelForCausalLM, GPT2LMHeadModel, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

import lorakit as lk
from lorakit.builtin import build_tokenizer
from lorakit.cli import main as cli_main
from lorakit.errors import AdapterStateError, ConfigError, LoraError
from lorakit.model_io import load_model
from lorakit.plan.estimate import NF4_BYTES
from lorakit.quantize import (
    NF4_BLOCKSIZE,
    dequantize_linears,
    dequantize_weight,
    import_bitsandbytes,
    quantize_linears,
)
from lorakit.train.config import load_config
from lorakit.train.loop import train

try:
    bnb = import_bitsandbytes()
except LoraError:
    pytest.skip("bitsandbytes is not installed (pip install 'lorakit[qlora]')", allow_module_level=True)

# NF4's 16 levels on [-1, 1]; the widest gap is between -1 and the next level, so rounding to the
# nearest level errs by at most half of it, times the block's absmax; the absmax itself is stored
# to 8 bits (double quantization), which adds at most about 1% of it.
NF4_HALF_GAP = (1.0 - 0.6961928009986877) / 2
NF4_BOUND = NF4_HALF_GAP + 0.01


def llama64(seed: int = 0) -> LlamaForCausalLM:
    """The tiny Llama at width 64: bitsandbytes' CPU kernel needs input widths in whole NF4 blocks."""
    return tiny_llama(seed, hidden_size=64, intermediate_size=128)


def gpt2_64(seed: int = 0) -> GPT2LMHeadModel:
    """A 2-layer GPT-2 (Conv1D layers), width 64, vocab 100, in eval mode."""
    return tiny_gpt2(seed, width=64)


def quantized_llama(seed: int = 0) -> LlamaForCausalLM:
    model = llama64(seed)
    quantize_linears(model, torch.float32, "cpu")
    return model


def one_linear(d_in: int = 64, d_out: int = 128, seed: int = 0) -> tuple[nn.Sequential, nn.Linear]:
    """A container holding one NF4 linear with a bias, and the full-precision original."""
    torch.manual_seed(seed)
    linear = nn.Linear(d_in, d_out)
    model = nn.Sequential(copy.deepcopy(linear))
    assert quantize_linears(model, torch.float32, "cpu") == 1
    return model, linear


def test_layout_is_the_one_lorakit_plan_counts():
    """Blocks of 64 with double quantization: 4.127 bits per weight, exactly plan's NF4_BYTES."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256, bias=False))
    w = model[0].weight.detach().clone()
    quantize_linears(model, torch.float32, "cpu")
    q = model[0]
    state = q.weight.quant_state
    assert isinstance(q, bnb.nn.Linear4bit) and not q.weight.requires_grad
    assert (state.quant_type, state.blocksize, state.nested, state.state2.blocksize) == ("nf4", NF4_BLOCKSIZE, True, 256)
    stored = q.weight.numel() * q.weight.element_size() + state.absmax.numel() * state.absmax.element_size() \
        + state.state2.absmax.numel() * state.state2.absmax.element_size()
    assert stored == round(w.numel() * NF4_BYTES)
    # every weight is within half an NF4 step of its block's absmax
    deq = dequantize_weight(q)
    assert deq.shape == w.shape and deq.dtype == torch.float32
    absmax = w.reshape(-1, NF4_BLOCKSIZE).abs().amax(1, keepdim=True)           # (blocks, 1)
    err = (deq - w).reshape(-1, NF4_BLOCKSIZE).abs()
    assert (err <= NF4_BOUND * absmax).all()
    assert err.max() > 0   # it really is quantized


def test_quantizes_decoder_linears_only():
    model = llama64()
    embed, head = model.model.embed_tokens.weight.clone(), model.lm_head.weight.clone()
    assert quantize_linears(model, torch.float32, "cpu") == 14   # 2 layers x (q, k, v, o, gate, up, down)
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, bnb.nn.Linear4bit)
    assert torch.equal(model.lm_head.weight, head) and torch.equal(model.model.embed_tokens.weight, embed)
    assert model.is_loaded_in_4bit
    lk.add_adapter(model, lk.LoraConfig(r=4, target_modules="all-linear"))
    with pytest.raises(LoraError, match="quantize the base before adding adapters"):
        quantize_linears(model, torch.float32, "cpu")


def test_cpu_refuses_widths_bitsandbytes_cpu_kernel_gets_wrong():
    """bitsandbytes' CPU kernel blocks each row; at width 32 a row is half a block. Its AVX-512 path
    then dequantizes a (96, 32) weight with errors of 3x the NF4 rounding bound (measured on an
    AVX-512 machine; the AVX2 path happens to stay within it), so lorakit refuses such widths on
    CPU whatever the machine, and a run does not change with the CPU it lands on."""
    model = tiny_llama()   # width 32
    with pytest.raises(LoraError, match=r"NF4 on CPU needs every quantized layer's input width to be a multiple of "
                                        r"64 .*; not so for model\.layers\.0\.self_attn\.q_proj \(d_in 32\), .* and "
                                        r"8 more\. Quantize on a CUDA device"):
        quantize_linears(model, torch.float32, "cpu")
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def test_forward_and_gradients_match_the_closed_form_on_the_dequantized_weight():
    model, _ = one_linear()
    lk.add_adapter(model, lk.LoraConfig(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights=False))
    layer = model[0]
    assert (layer.in_features, layer.out_features) == (64, 128)
    A, B, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, 2.0
    assert A.dtype == torch.float32   # the adapter takes the dtype the base had before quantizing
    W, b = dequantize_weight(layer.base_layer), layer.base_layer.bias.detach()   # W: (128, 64)
    x = torch.randn(3, 5, 64, requires_grad=True)
    y = model.train()(x)
    g = torch.randn_like(y)                                                         # (3, 5, 128)
    y.backward(g)
    x0, A0, B0 = x.detach(), A.detach(), B.detach()
    torch.testing.assert_close(y.detach(), x0 @ W.t() + b + s * (x0 @ A0.t()) @ B0.t(), atol=1e-5, rtol=1e-5)
    h, g2 = (x0 @ A0.t()).reshape(-1, 4), g.reshape(-1, 128)                         # (15, r), (15, d_out)
    torch.testing.assert_close(B.grad, s * g2.t() @ h, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(A.grad, s * (g2 @ B0).t() @ x0.reshape(-1, 64), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, g @ W + s * (g @ B0) @ A0, atol=1e-5, rtol=1e-5)
    # gradients reach the adapter only: the 4-bit weight cannot train and the bias is frozen
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"0.lora_A.default.weight", "0.lora_B.default.weight"}
    assert layer.base_layer.weight.grad is None and layer.base_layer.bias.grad is None


def test_eval_without_gradients_keeps_the_compute_dtype_and_layout():
    """bitsandbytes' fused CPU kernel (bf16 whatever the compute dtype) stays off, so eval outputs
    are the fp32 closed form and the weight still dequantizes."""
    model, _ = one_linear(d_in=64, d_out=64)
    W = dequantize_weight(model[0]).clone()
    x = torch.randn(4, 64)
    with torch.no_grad():
        y = model.eval()(x)
    torch.testing.assert_close(y, x @ W.t() + model[0].bias, atol=1e-6, rtol=1e-6)
    assert torch.equal(dequantize_weight(model[0]), W)


def test_dequantize_reads_the_weight_bitsandbytes_repacked_for_cpu_inference():
    """A Linear4bit made elsewhere (fused CPU kernel left on) repacks its weight on the first eval
    forward without gradients; dequantize_weight still returns deq(Q(W)), up to the bf16 rounding
    that repacking makes."""
    if not bnb.functional.has_avx512bf16():
        pytest.skip("bitsandbytes repacks only on CPUs with AVX512-BF16")
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 64), requires_grad=False, quant_type="nf4", module=layer)
    layer = layer.to("cpu").eval()
    W = dequantize_weight(layer).clone()
    with torch.no_grad():
        layer(torch.randn(2, 64))
    assert layer.weight.quant_state.packing_format_for_cpu
    # the repacked state is bf16 (scales and levels each rounded by up to 2^-9), so that much comes
    # back; the packed bytes read as the canonical layout would be another matrix entirely
    torch.testing.assert_close(dequantize_weight(layer), W, atol=0, rtol=1e-2)


def test_bf16_compute_on_cpu():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64)).to(torch.bfloat16)
    quantize_linears(model, torch.bfloat16, "cpu")
    lk.add_adapter(model, lk.LoraConfig(r=4, target_modules=["0"], init_lora_weights=False),
                   adapter_dtype=torch.float32)
    layer = model[0]
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    W, A, B = dequantize_weight(layer.base_layer), layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert W.dtype == torch.bfloat16
    with torch.no_grad():
        y = model(x)
        expected = x.float() @ W.float().t() + layer.base_layer.bias.float() + 2.0 * (x.float() @ A.t()) @ B.t()
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), expected, atol=0.05, rtol=0.02)


def test_peft_parity_outputs_gradients_and_counts(tmp_path):
    """The same adapter weights through PEFT's QLoRA layer on the same quantized model."""
    peft = pytest.importorskip("peft")
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    ours = quantized_llama()
    theirs_base = copy.deepcopy(ours)
    lk.add_adapter(ours, lk.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    lk.save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(theirs_base, str(tmp_path), is_trainable=True)
    assert type(theirs.base_model.model.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    assert type(theirs.base_model.model.model.layers[0].mlp.down_proj).__module__ == "peft.tuners.lora.bnb"
    ours.train(), theirs.train()
    a, b = ours(ids).logits, theirs(ids).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    a.square().mean().backward()
    b.square().mean().backward()
    mine = {n.replace(".default", ""): p.grad for n, p in ours.named_parameters() if p.requires_grad}
    peft_grads = {n.replace("base_model.model.", "", 1).replace(".default", ""): p.grad
                  for n, p in theirs.named_parameters() if p.requires_grad}
    assert mine.keys() == peft_grads.keys() and len(mine) == 28
    for k in mine:
        torch.testing.assert_close(mine[k], peft_grads[k], atol=1e-6, rtol=1e-4)
    trainable, total = theirs.get_nb_trainable_parameters()
    assert lk.trainable_parameters(ours) == (trainable, total)


def test_merge_is_refused_and_unload_dequantizes(ids):
    model = quantized_llama()
    lk.add_adapter(model, lk.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    with torch.no_grad():
        expected = model(ids).logits
    with pytest.raises(AdapterStateError, match=r"cannot merge into the 4-bit NF4 weight of model\.layers\.0\.self_attn"
                                                r"\.q_proj: requantizing W \+ s\*B@A would round most of the update "
                                                r"away\. lorakit\.unload\(model, merge=True\) dequantizes"):
        lk.merge_adapters(model)
    assert all(not layer.merged_adapters for _, layer in lk.inject.lora_layers(model))
    plain = lk.unload(model, merge=True)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in plain.modules())
    assert type(plain.model.layers[1].mlp.up_proj) is nn.Linear and not plain.is_loaded_in_4bit
    assert plain.model.layers[1].mlp.up_proj.weight.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_unload_without_merge_keeps_the_4bit_base(ids):
    model = quantized_llama()
    with torch.no_grad():
        base = model(ids).logits
    lk.add_adapter(model, lk.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    plain = lk.unload(model, merge=False)
    assert isinstance(plain.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, base)


def test_gpt2_conv1d_keeps_its_layout_through_quantize_adapter_and_merge(tmp_path):
    """Conv1D stores W as (d_in, d_out): quantized from W^T, its adapter config and file are the ones
    of the full-precision model, and dequantizing gives Conv1D layers back."""
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    full = gpt2_64()
    attn = full.transformer.h[0].attn.c_attn.weight.detach().clone()                # (64, 192)
    quantized = gpt2_64()
    assert quantize_linears(quantized, torch.float32, "cpu") == 8   # 2 layers x (c_attn, c_proj, c_fc, mlp c_proj)
    q = quantized.transformer.h[0].attn.c_attn
    assert isinstance(q, bnb.nn.Linear4bit) and (q.in_features, q.out_features) == (64, 192)
    absmax = attn.t().reshape(-1, NF4_BLOCKSIZE).abs().amax(1, keepdim=True)      # blocks of W^T's rows
    assert ((dequantize_weight(q) - attn.t()).reshape(-1, NF4_BLOCKSIZE).abs() <= NF4_BOUND * absmax).all()
    reference = copy.deepcopy(quantized)
    dequantize_linears(reference)
    assert type(reference.transformer.h[0].attn.c_attn) is Conv1D
    cfg = lk.LoraConfig(r=4, target_modules=["c_attn", "c_fc"], init_lora_weights=False)
    for m in (full, quantized, reference):
        torch.manual_seed(3)
        lk.add_adapter(m, cfg)
    assert lk.get_adapter_config(quantized) == lk.get_adapter_config(full)   # fan_in_fan_out=True in both
    assert lk.adapter_state_dict(quantized).keys() == lk.adapter_state_dict(full).keys()
    with torch.no_grad():
        expected = reference(ids).logits
        torch.testing.assert_close(quantized(ids).logits, expected, atol=1e-5, rtol=1e-5)
        plain = lk.unload(quantized, merge=True)
        assert type(plain.transformer.h[1].mlp.c_fc) is Conv1D and type(plain.transformer.h[1].mlp.c_proj) is Conv1D
        torch.testing.assert_close(plain(ids).logits, expected, atol=1e-5, rtol=1e-5)
    plain.save_pretrained(tmp_path)   # the GPT-2 checkpoint layout, loadable without lorakit
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_dora_over_4bit_equals_dora_over_the_dequantized_base(ids):
    quantized = quantized_llama()
    dequantized = copy.deepcopy(quantized)
    dequantize_linears(dequantized)
    cfg = lk.LoraConfig(r=4, target_modules=["q_proj", "down_proj"], use_dora=True, init_lora_weights=False)
    for m in (quantized, dequantized):
        torch.manual_seed(3)
        lk.add_adapter(m, cfg)
    with torch.no_grad():
        torch.testing.assert_close(quantized(ids).logits, dequantized(ids).logits, atol=1e-5, rtol=1e-5)


def test_base_rewriting_inits_are_refused_before_anything_changes():
    model = quantized_llama()
    with pytest.raises(ConfigError, match=r"init_lora_weights='pissa' rewrites the base weight, but "
                                          r"model\.layers\.0\.self_attn\.q_proj is 4-bit \(QLoRA\)"):
        lk.add_adapter(model, lk.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa"))
    assert lk.list_adapters(model) == [] and isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)


def test_adapter_file_is_the_same_on_a_4bit_base(tmp_path, ids):
    """Keys and shapes do not depend on quantization; the adapter loads on the full-precision base."""
    full = llama64()
    quantized = quantized_llama()
    cfg = lk.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    lk.add_adapter(full, cfg)
    lk.add_adapter(quantized, cfg)
    a, b = lk.adapter_state_dict(full), lk.adapter_state_dict(quantized)
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    lk.save_adapter(quantized, tmp_path / "q")
    saved = load_file(tmp_path / "q" / "adapter_model.safetensors")
    assert saved.keys() == a.keys()
    assert json.loads((tmp_path / "q" / "adapter_config.json").read_text())["target_modules"] == \
        lk.get_adapter_config(full).target_modules
    again = lk.load_adapter(llama64(), tmp_path / "q")
    for k, v in lk.adapter_state_dict(again).items():
        assert torch.equal(v, saved[k])


def test_config_field_and_errors():
    assert load_config(None).model.quantize_base == "none"
    assert load_config(None, ["model.quantize_base=nf4"]).model.quantize_base == "nf4"
    with pytest.raises(ConfigError, match="model.quantize_base must be one of none, nf4, got 'int4'"):
        load_config(None, ["model.quantize_base=int4"])
    with pytest.raises(ConfigError, match="model.quantize_base=nf4 trains with training.strategy=single only"):
        load_config(None, ["model.quantize_base=nf4", "training.strategy=ddp"])


# ---- lorakit train / merge end to end -------------------------------------------------------------


@pytest.fixture(scope="module")
def qlora_files(tmp_path_factory):
    """A tiny Llama directory with the byte tokenizer, and an 'echo WORD' -> WORD chat dataset."""
    path = tmp_path_factory.mktemp("qlora")
    tiny_model_dir(path / "model", build_tokenizer(), width=64, positions=128)
    with open(path / "train.jsonl", "w") as f:
        for w in ["red", "green", "blue", "cyan", "magenta", "yellow", "black", "white"]:
            f.write(json.dumps({"messages": [{"role": "user", "content": f"echo {w}"},
                                             {"role": "assistant", "content": w}]}) + "\n")
    return path


def test_train_with_a_4bit_base_then_merge(qlora_files, tmp_path, monkeypatch):
    calls = []
    forward = bnb.nn.Linear4bit.forward
    monkeypatch.setattr(bnb.nn.Linear4bit, "forward", lambda self, x: calls.append(1) or forward(self, x))
    model_dir, out = qlora_files / "model", tmp_path / "run"
    train(load_config(None, [
        f"model.name_or_path={model_dir}", "model.quantize_base=nf4", f"data.train={qlora_files / 'train.jsonl'}",
        "data.max_seq_len=32", "training.micro_batch_size=4", "training.lr=1e-2", "training.max_steps=8",
        "training.schedule=constant", "lora.r=4", "lora.lora_alpha=8", "output.tensorboard=false",
        "output.merged_model=true", f"output.dir={out}"]))
    assert calls, "the run did not go through the 4-bit layers"
    with open(out / "metrics.csv") as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f) if r["loss"]]
    assert len(losses) == 8 and sum(losses[-3:]) < sum(losses[:3]) - 0.5 and losses[-1] < losses[0] - 0.3, losses

    ids = torch.tensor([[5, 80, 90, 100, 110, 7]])
    quantized = lk.load_adapter(load_model(str(model_dir), "fp32", "cpu", quantize_base="nf4"), out)
    with torch.no_grad():
        trained = quantized(ids).logits
    # the adapter also loads on the full-precision base (a different model, by the quantization error)
    full = lk.load_adapter(AutoModelForCausalLM.from_pretrained(model_dir), out).eval()
    with torch.no_grad():
        assert not torch.allclose(full(ids).logits, trained, atol=1e-4)
    # output.merged_model: the run's config.yaml says nf4, so the merge is into deq(Q(W))
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    assert all(type(m) is not bnb.nn.Linear4bit for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, trained, atol=1e-4, rtol=1e-4)
    # `lorakit merge --quantize-base none` merges into the original weights instead
    assert cli_main(["merge", str(out), "--out", str(tmp_path / "into-full"), "--quantize-base", "none"]) == 0
    into_full = AutoModelForCausalLM.from_pretrained(tmp_path / "into-full").eval()
    with torch.no_grad():
        torch.testing.assert_close(into_full(ids).logits, full(ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
def test_cuda_bf16_matches_the_dequantized_model_and_peft(tmp_path):
    """On CUDA, in bf16 (QLoRA's usual setting): the same checks as on CPU, at bf16 tolerance."""
    peft = pytest.importorskip("peft")
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(1)).cuda()
    model = llama64().to(torch.bfloat16)
    assert quantize_linears(model, torch.bfloat16, "cuda") == 14
    model.cuda()
    reference, theirs_base = copy.deepcopy(model), copy.deepcopy(model)
    dequantize_linears(reference)
    cfg = lk.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    for m in (model, reference):
        torch.manual_seed(3)
        lk.add_adapter(m, cfg, adapter_dtype=torch.float32)
    lk.save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(theirs_base, str(tmp_path))
    with torch.no_grad():
        ours = model(ids).logits.float()
        torch.testing.assert_close(ours, reference(ids).logits.float(), atol=3e-2, rtol=3e-2)
        torch.testing.assert_close(ours, theirs(ids).logits.float(), atol=3e-2, rtol=3e-2)
        plain = lk.unload(model, merge=True)
        assert not any(isinstance(m, bnb.nn.Linear4bit) for m in plain.modules())
        torch.testing.assert_close(plain(ids).logits.float(), ours, atol=5e-2, rtol=5e-2)
