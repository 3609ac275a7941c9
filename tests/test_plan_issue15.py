"""`lorakit plan` for the runs it used to plan as plain LoRA on one process: a QLoRA config is not
told to try QLoRA; FSDP2 plans one process's shard (checked by hand on Llama 3.1 8B and against a
2-process run on the CPU); offloaded activations leave the device and are reported as host memory
(checked against what transformers' offload path moves); a max_seq_len bounded by the model's
position limit says so."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys

import pytest
import torch
import transformers.modeling_utils
from test_plan import LLAMA_8B
from tiny_models import tiny_model
from transformers import LlamaConfig

import lorakit as lk
from lorakit.builtin import build_tokenizer
from lorakit.cli import main
from lorakit.errors import ConfigError
from lorakit.plan import make_plan, parse_size, render_text
from lorakit.train.config import load_config

GIB = 2**30
# Llama 3.1 8B by hand: a decoder layer's weights, the root group's (embeddings, head, final norm)
LAYER = 2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 14336 * 4096 + 2 * 4096    # 218,112,000
ROOT = 2 * 128256 * 4096 + 4096                                               # 1,050,677,248
BASE = 32 * LAYER + ROOT                                                      # 8,030,261,248
ADAPTER = 16 * ((4096 + 4096) * 2 + (4096 + 1024) * 2 + (4096 + 14336) * 3)  # r=16 all-linear, per layer
SMALL_RUN = ["training.micro_batch_size=2", "data.max_seq_len=1024", "training.kernels=torch"]


@pytest.fixture(scope="module")
def llama_8b(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("llama-3.1-8b")
    LlamaConfig(**LLAMA_8B).save_pretrained(path)
    return str(path)


def _run_cli(argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    return out.getvalue()


def _by(plan):
    return {(e.method, e.checkpointing): e for e in plan.estimates}


# ---- (a) a QLoRA config that does not fit -------------------------------------------------------------


def test_a_qlora_run_is_not_told_to_try_qlora(llama_8b):
    plan = make_plan(load_config(None, ["model.quantize_base=nf4"]), model=llama_8b, memory=parse_size("12GB"),
                     examples=20_000)
    fit = next(f for f in plan.fits if f.method == "qlora" and not f.checkpointing)   # the configured run
    assert (fit.fits, fit.largest_batch, fit.largest_seq) == (False, 2, 378)
    assert [w for w in plan.warnings if "does not fit" in w] == [
        "the QLoRA run as configured does not fit 12 GiB; try training.micro_batch_size=2 (raise training.grad_accum "
        "to keep the batch), or training.gradient_checkpointing=true, or data.max_seq_len=378, or a larger GPU"]
    lora = make_plan(load_config(None, []), model=llama_8b, memory=parse_size("12GB"), examples=20_000)
    assert [w for w in lora.warnings if "does not fit" in w] == [
        "the LoRA run as configured does not fit 12 GiB; try QLoRA, or a larger GPU"]


# ---- (b) FSDP2: per process -----------------------------------------------------------------------------


def test_fsdp_plans_one_process_shard_by_hand(llama_8b):
    """8 processes: every dimension of the 8B model divides by 8, so each shard is exactly 1/8 (the
    r=16 lora_A rows split 2 per process). Gathered: the root group and two decoder layers, bf16
    weights and their fp32 adapters. The loss takes the full logits (no chunked loss under FSDP2):
    3 x B (T-1) x vocab x fp32 for the log-softmax backward. Activations are the process's own."""
    single = make_plan(load_config(None, SMALL_RUN), model=llama_8b, examples=20_000)
    plan = make_plan(load_config(None, SMALL_RUN + ["training.strategy=fsdp"]), model=llama_8b, examples=20_000,
                     processes=8)
    lora, full, one = _by(plan)["lora", False], _by(plan)["full", False], _by(single)["lora", False]
    buffers = 2 * 64 * 4                                                      # rotary inv_freq, not sharded
    assert lora.frozen_weights == buffers + 2 * BASE // 8 == buffers + 2_007_565_312
    assert lora.trained_state == 4 * 4 * 32 * ADAPTER // 8 == 83_886_080
    assert lora.gathered == 2 * (ROOT + 2 * LAYER) + 4 * 2 * ADAPTER == 2_984_288_256
    assert lora.loss_logits == 3 * 2 * 1023 * 128256 * 4
    assert (lora.activations, lora.recompute) == (one.activations, one.recompute)
    assert full.trained_state == 16 * BASE // 8 and full.gathered == 2 * (ROOT + 2 * LAYER)
    assert _by(plan)["qlora", False] == _by(single)["qlora", False]           # QLoRA trains in one process only
    assert plan.workload.chunked_loss is False and single.workload.chunked_loss is True

    text = render_text(plan)
    assert "peak training memory per process, GiB: micro_batch_size 2 x max_seq_len 1024" in text
    assert "  gathered by FSDP2 (unsharded)   2.78       2.78   0.00        0.00   2.77       2.77" in text
    assert ("  per process of 8 (training.strategy=fsdp, --nproc 8): FSDP2 shards the weights, gradients and AdamW "
            "state 8 ways (frozen and trained rows: one shard); gathered: the unsharded root group (embeddings, final "
            "norm, head) and two decoder layers; activations: the process's own micro-batch\n"
            "  the loss row is the full logits: lorakit's chunked loss (training.chunked_loss) does not run under "
            "FSDP2\n"
            "  QLoRA columns: one process with the whole model (model.quantize_base=nf4 trains with "
            "training.strategy=single only)\n") in text
    assert "gathered" not in render_text(single) and "per process" not in render_text(single)


def test_nproc_on_the_command_line(llama_8b, capsys):
    data = json.loads(_run_cli(["plan", "--model", llama_8b, "--examples", "100", "--nproc", "4", "--json",
                                "training.strategy=fsdp", *SMALL_RUN]))
    assert (data["strategy"], data["processes"]) == ("fsdp", 4)
    lora = next(e for e in data["estimates"] if e["method"] == "lora" and not e["checkpointing"])
    assert lora["frozen_weights"] == 2 * 64 * 4 + 2 * BASE // 4
    assert main(["plan", "--model", llama_8b, "--nproc", "2"]) == 2
    assert capsys.readouterr().err == ("lorakit plan: error: --nproc 2: training.strategy is single (one process); "
                                       "set training.strategy=ddp or training.strategy=fsdp to plan several\n")
    with pytest.raises(ConfigError, match="^--nproc must be >= 1, got 0$"):
        make_plan(load_config(None, ["training.strategy=fsdp"]), model=llama_8b, processes=0)
    ddp = render_text(make_plan(load_config(None, ["training.strategy=ddp"]), model=llama_8b, examples=100,
                                processes=4))
    assert ("  per process of 4 (training.strategy=ddp): each holds the whole model, its gradients and AdamW state, "
            "and runs its own micro-batch\n") in ddp
    alone = render_text(make_plan(load_config(None, ["training.strategy=fsdp"]), model=llama_8b, examples=100))
    assert ("  training.strategy=fsdp on 1 process shards nothing: these are the whole model's figures; plan for N "
            "processes with --nproc N\n") in alone


@pytest.mark.slow   # one torchrun launch of 2 processes: ~20 s on 2 cores
@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="no gloo backend for CPU processes")
def test_fsdp_estimate_within_5_percent_of_a_two_process_run(tmp_path):
    """A model whose weights are large against its activations (vocab 8000, 4 layers): rank 0's peak
    under FSDP2 with 2 processes, against the plan for 2 processes (the estimate is 1.4% under it)."""
    tokenizer = build_tokenizer()
    model = tiny_model(tokenizer=tokenizer, width=64, positions=256, vocab=8000, tie=False, layers=4)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    with open(tmp_path / "data.jsonl", "w") as f:
        for i in range(8):
            f.write(json.dumps({"text": f"the quick brown fox {i} " * 20}) + "\n")
    overrides = [f"model.name_or_path={tmp_path / 'model'}", f"data.train={tmp_path / 'data.jsonl'}",
                 "data.max_seq_len=64", "training.micro_batch_size=2", "training.max_steps=2", "lora.r=8",
                 "model.device=cpu", "output.tensorboard=false", "training.strategy=fsdp",
                 f"output.dir={tmp_path / 'run'}"]
    worker = tmp_path / "worker.py"
    worker.write_text("import os, sys\nfrom lorakit.train.config import load_config\nfrom lorakit.train.loop import "
                      "train\nsummary = train(load_config(None, sys.argv[1:]))\nif os.environ['RANK'] == '0':\n"
                      "    print('peak', summary.peak_memory_bytes)\n")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(worker), *overrides], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    measured = int(next(line for line in proc.stdout.splitlines() if line.startswith("peak ")).split()[1])
    plan = make_plan(load_config(None, overrides), device="cpu", padded=False, processes=2)
    estimate = _by(plan)["lora", False]
    assert estimate.gathered > 0 and abs(estimate.total / measured - 1) < 0.05, (estimate, measured)


# ---- (c) offloaded activations ------------------------------------------------------------------------------


def test_offloaded_activations_move_to_host_memory(llama_8b):
    """The checkpointed layer inputs, 32 layers x 2 x 1024 tokens x 4096 x bf16, leave the device
    and are counted as host memory; one comes back for its layer's backward."""
    ckpt = SMALL_RUN + ["training.gradient_checkpointing=true"]
    kept = _by(make_plan(load_config(None, ckpt), model=llama_8b, examples=100))
    plan = make_plan(load_config(None, ckpt + ["training.offload_activations=true"]), model=llama_8b, examples=100)
    moved = _by(plan)
    inputs = 32 * 2 * 1024 * 4096 * 2
    for method in ("lora", "qlora", "full"):
        on, off = moved[method, True], kept[method, True]
        assert on.host == inputs == 536_870_912
        assert on.activations == off.activations - inputs
        assert on.recompute == off.recompute + inputs // 32
        assert moved[method, False] == kept[method, False]                     # no checkpointing, no offload
    text = render_text(plan)
    assert "  offloaded to host memory        0.00       0.50   0.00        0.50    0.00       0.50" in text
    assert ("  offloaded to host memory: training.offload_activations keeps each checkpointed layer's input in "
            "pinned host memory (not in the peak) and copies it back for that layer's backward\n") in text
    cpu = make_plan(load_config(None, ckpt + ["training.offload_activations=true"]), model=llama_8b, examples=100,
                    device="cpu")
    assert all(e.host == 0 for e in cpu.estimates)
    assert ("training.offload_activations: on the CPU the activations are in host memory already, so it changes "
            "nothing here") in cpu.notes


def test_host_bytes_are_what_transformers_offloads(monkeypatch, tmp_path):
    """transformers' offload path (`activation_checkpointing_enable(offload=True)`) with its
    save_on_cpu replaced by one that records what it would move (pinned memory needs a GPU)."""
    moved = []

    class Recording(torch.autograd.graph.saved_tensors_hooks):
        def __init__(self, pin_memory: bool, device_type: str) -> None:
            super().__init__(lambda t: moved.append(t.untyped_storage().nbytes()) or t, lambda t: t)

    monkeypatch.setattr(transformers.modeling_utils, "save_on_cpu", Recording)
    model = tiny_model(training=True)
    model.config.save_pretrained(tmp_path)
    lk.add_adapter(model, lk.LoraConfig(r=4, target_modules="all-linear"))
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False}, offload=True)
    ids = torch.randint(3, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss.backward()
    cfg = load_config(None, ["training.gradient_checkpointing=true", "training.offload_activations=true",
                             "training.micro_batch_size=2", "data.max_seq_len=16", "model.dtype=fp32"])
    plan = make_plan(cfg, model=str(tmp_path), examples=100, device="cuda")
    assert _by(plan)["lora", True].host == sum(moved) == 2 * 2 * 16 * 32 * 4


# ---- (d) max_seq_len bounded by the model --------------------------------------------------------------------


def test_largest_max_seq_len_at_the_position_limit_says_so(tmp_path):
    tiny_model(positions=64).config.save_pretrained(tmp_path)
    plan = make_plan(load_config(None, []), model=str(tmp_path), memory=GIB, examples=100, device="cpu")
    assert plan.max_position_embeddings == 64
    assert [(f.largest_seq, f.seq_at_position_limit) for f in plan.fits] == [(64, True)] * 6
    text = render_text(plan)
    assert "  largest max_seq_len at batch 4     64*        64*    64*         64*    64*        64*" in text
    assert ("  * the model's position limit (max_position_embeddings 64), not memory: the model takes no longer "
            "rows\n") in text


def test_largest_max_seq_len_bounded_by_memory_has_no_mark(llama_8b):
    plan = make_plan(load_config(None, SMALL_RUN), model=llama_8b, memory=parse_size("24GB"), examples=100)
    assert all(not f.seq_at_position_limit and f.largest_seq < 131072 for f in plan.fits)
    assert "position limit" not in render_text(plan)
