"""`lorakit train` on a mixture-of-experts model directory (a tiny Mixtral with the built-in byte
tokenizer): all-linear trains the fused experts and says so, the run's adapter loads in PEFT, a
QLoRA run stores the experts in NF4 and its merged model gives the trained model's logits, and
`lorakit plan` counts the expert adapters."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, MixtralConfig

import lorakit as lk
from lorakit.builtin import build_tokenizer
from lorakit.cli import main as cli_main
from lorakit.model_io import load_model
from lorakit.quantize import is_nf4_parameter
from lorakit.train.config import load_config
from lorakit.train.loop import train


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("mixtral")
    tok = build_tokenizer()
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                           num_experts_per_tok=2, max_position_embeddings=128, bos_token_id=tok.bos_token_id,
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def overrides(moe_dir, data_files, out, *extra):
    train_file, _ = data_files
    return [f"model.name_or_path={moe_dir}", f"data.train={train_file}", "data.max_seq_len=32",
            "training.micro_batch_size=4", "training.lr=1e-2", "training.max_steps=6", "training.schedule=constant",
            "lora.r=4", "lora.lora_alpha=8", "output.tensorboard=false", f"output.dir={out}", *extra]


def losses_of(out):
    with open(out / "metrics.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f) if r["loss"]]


def test_train_adapts_the_experts_and_peft_loads_the_run(moe_dir, data_files, tmp_path, capsys):
    out = tmp_path / "run"
    train(load_config(None, overrides(moe_dir, data_files, out)))
    log = capsys.readouterr().out
    assert "expert weights adapted: 4 of 4 fused stacks (experts.down_proj, experts.gate_up_proj) of 4 experts" in log
    losses = losses_of(out)
    assert losses[-1] < losses[0], losses
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["target_parameters"] == [f"model.layers.{i}.mlp.experts.{p}" for i in range(2)
                                          for p in ("gate_up_proj", "down_proj")]
    ids = torch.tensor([[5, 80, 90, 100, 110, 7]])
    ours = lk.load_adapter(AutoModelForCausalLM.from_pretrained(moe_dir), out).eval()
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(moe_dir), out).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft(ids).logits, ours(ids).logits, rtol=0, atol=1e-5)
        assert (ours.model.layers[0].mlp.experts.lora_B["default"].weight != 0).any()   # the experts trained


def test_qlora_run_quantizes_the_experts_and_merges_to_the_trained_logits(moe_dir, data_files, tmp_path):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "run"
    train(load_config(None, overrides(moe_dir, data_files, out, "model.quantize_base=nf4", "output.merged_model=true")))
    assert losses_of(out)[-1] < losses_of(out)[0]
    quantized = load_model(str(moe_dir), "fp32", "cpu", quantize_base="nf4")
    assert is_nf4_parameter(quantized.model.layers[0].mlp.experts, "gate_up_proj")
    trained = lk.load_adapter(quantized, out).eval()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    ids = torch.tensor([[5, 80, 90, 100, 110, 7]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, trained(ids).logits, rtol=1e-4, atol=1e-4)


def test_plan_counts_the_expert_adapters(moe_dir, data_files, tmp_path, capsys):
    train_file, _ = data_files
    assert cli_main(["plan", f"model.name_or_path={moe_dir}", f"data.train={train_file}", "lora.r=4",
                     "training.max_steps=1", f"output.dir={tmp_path / 'run'}"]) == 0
    text = capsys.readouterr().out
    row = next(line for line in text.splitlines() if "mlp.experts.gate_up_proj" in line)
    assert "lora experts" in row and "4 x 64 x 128" in row
    assert f"{2 * 4 * 4 * (64 + 128):,d}" in row        # layers x experts x r x (d_in + d_out)


def test_plan_keeps_the_updated_expert_weights_for_backward(moe_dir):
    """An adapted expert stack is read as W + update, a stack-sized tensor autograd keeps: the plan
    counts it in the activations, per adapted stack, in the compute dtype."""
    from lorakit.plan.make import make_plan

    def lora_activations(*extra):
        plan = make_plan(load_config(None, [f"model.name_or_path={moe_dir}", "lora.r=4", "training.max_steps=1",
                                            "training.gradient_checkpointing=false", *extra]))
        estimate = next(e for e in plan.estimates if e.method == "lora" and not e.checkpointing)
        return estimate.activations, plan.workload.compute_bytes

    with_experts, cd = lora_activations()
    without, _ = lora_activations("lora.exclude_modules=[experts]")
    assert with_experts - without == 2 * (4 * 128 * 64 + 4 * 64 * 64) * cd   # layers x (gate_up + down stacks)


def test_plan_counts_the_expert_stacks_as_quantizable(moe_dir):
    """QLoRA stores the experts in NF4 (lorakit.quantize.quantize_experts): the plan's QLoRA column
    counts them with the linear layers, and a whole stack as the largest weight dequantized at once."""
    from lorakit.plan.params import weights_of

    model = AutoModelForCausalLM.from_pretrained(moe_dir)
    lk.add_adapter(model, lk.LoraConfig(r=4, target_modules="all-linear"))
    weights = weights_of(model)
    attention = 2 * (64 * 64 + 2 * 32 * 64 + 64 * 64)            # layers x (q, k, v, o)
    experts = 2 * (4 * 128 * 64 + 4 * 64 * 64)                    # layers x (gate_up, down)
    assert weights.quantizable_params == attention + experts
    assert weights.largest_matrix == 4 * 128 * 64
