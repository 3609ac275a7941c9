"""One QLoRA training step, lorakit vs PEFT on the same 4-bit NF4 base, side by side (CPU).

The model and batch of bench_step.py: a Llama with hidden 512, 6 layers, 8 heads, vocab 8000,
a batch of 4 x 256 random token ids (labels = ids), r=16, alpha=32 adapters on every linear layer
but the output head; except that the MLP width is 1408 instead of 1376, because bitsandbytes' CPU
NF4 kernel needs input widths in whole blocks of 64 (see lorakit.quantize). Each linear layer is quantized with `lorakit.quantize.quantize_linears`
(NF4, blocks of 64, double quantization, fp32 compute); the PEFT case gets a deep copy of the same
quantized model, so both run on identical 4-bit weights through bitsandbytes' `Linear4bit`.
A lorakit LoRA case on the fp32 base is the reference for what quantization costs or saves.

  - step time: forward + backward + zero_grad, median and minimum over timed rounds after warmup;
    the cases run interleaved, one step each per round in a rotating order;
  - peak memory: `lorakit.train.memory.PeakMemory` over one step (the bytes torch tensors held at
    once: weights, adapter weights and gradients, activations, the 4-bit layers' transient
    dequantized weights), the figure `lorakit train` reports;
  - weights: bytes of the frozen base as stored (4-bit codes and quantization state, or fp32).

B = 0 at init, so each case's step-0 loss is its base's loss: lorakit and PEFT at the same dropout
must agree (asserted), and the quantized loss differs from the fp32 one by the quantization error.

    .venv/bin/python bench/bench_qlora.py            # 2 warmup + 8 timed rounds
    .venv/bin/python bench/bench_qlora.py --quick    # 1 warmup + 2 timed rounds
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import statistics
import time
from dataclasses import dataclass, field

import torch
from bench_step import step
from torch import nn

MODEL_CONFIG = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8,
                    num_key_value_heads=8, vocab_size=8000, max_position_embeddings=256, use_cache=False)
BATCH, SEQ = 4, 256
RANK, ALPHA = 16, 32
MB = 2**20


@dataclass
class Case:
    name: str
    module: nn.Module
    times: list[float] = field(default_factory=list)
    loss0: float = float("nan")
    peak_bytes: int = 0
    weight_bytes: int = 0


def build_base(quantized: bool) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorakit.quantize import quantize_linears

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**MODEL_CONFIG)).float()
    if quantized:
        quantize_linears(model, torch.float32, "cpu")
    return model.train()


def frozen_bytes(model: nn.Module) -> int:
    """The frozen base as stored: parameters and buffers, plus each 4-bit layer's quantization
    state (absmax codes, their fp32 scales, code tables)."""
    from lorakit.quantize import is_4bit

    total = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    total += sum(b.numel() * b.element_size() for b in model.buffers())
    for m in model.modules():
        if is_4bit(m):
            state = m.weight.quant_state
            parts = [state.absmax, state.code] + ([state.state2.absmax, state.state2.code] if state.nested else [])
            total += sum(t.numel() * t.element_size() for t in parts)
    return total


def make_cases(dropouts: list[float]) -> list[Case]:
    import lorakit as lk
    from lorakit.quantize import import_bitsandbytes

    import_bitsandbytes()   # before PEFT imports it: lorakit silences its CPU backend's import warning
    import peft

    quantized = build_base(quantized=True)
    cases = []
    for p in dropouts:
        ours = copy.deepcopy(quantized)
        theirs = copy.deepcopy(quantized)
        lk.add_adapter(ours, lk.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=p, target_modules="all-linear"))
        theirs = peft.get_peft_model(theirs, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=p,
                                                             target_modules="all-linear"))
        assert type(theirs.base_model.model.model.layers[0].self_attn.q_proj).__module__ == "peft.tuners.lora.bnb"
        cases += [Case(f"lorakit QLoRA p={p:g}", ours), Case(f"PEFT    QLoRA p={p:g}", theirs.train())]
    full = build_base(quantized=False)
    lk.add_adapter(full, lk.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear"))
    cases.append(Case("lorakit LoRA fp32 base p=0", full))
    for c in cases:
        c.weight_bytes = frozen_bytes(c.module)
    return cases


def measure_peak(case: Case, ids: torch.Tensor) -> None:
    from lorakit.train.memory import PeakMemory

    peak = PeakMemory("cpu")
    with peak.region(case.module):
        case.loss0 = step(case.module, ids)
    case.peak_bytes = peak.peak_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--quick", action="store_true", help="1 warmup + 2 timed rounds")
    args = ap.parse_args()
    if args.quick:
        args.warmup, args.steps = 1, 2
    torch.set_num_threads(args.threads)
    started = time.time()
    ids = torch.randint(0, MODEL_CONFIG["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    cases = make_cases([0.0, 0.05])
    for c in cases:
        measure_peak(c, ids)
    for a, b in zip(cases[0:4:2], cases[1:4:2], strict=True):
        assert abs(a.loss0 - b.loss0) < 1e-5, f"{a.name} loss {a.loss0} != {b.name} loss {b.loss0}"
    for r in range(args.warmup + args.steps):
        order = cases[r % len(cases):] + cases[:r % len(cases)]
        for c in order:
            t0 = time.perf_counter()
            step(c.module, ids)
            if r >= args.warmup:
                c.times.append(time.perf_counter() - t0)

    import bitsandbytes
    import peft
    import transformers

    print(f"# bench_qlora: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"{args.threads} threads, {args.warmup} warmup + {args.steps} timed rounds, {time.time() - started:.0f} s")
    print(f"# torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
          f"bitsandbytes {bitsandbytes.__version__}, Python {platform.python_version()}")
    print(f"# step-0 loss: QLoRA {cases[0].loss0:.6f} (lorakit == PEFT), fp32 base {cases[-1].loss0:.6f}")
    print()
    print("| case | step ms (median) | min ms | vs PEFT | peak MB | vs PEFT | frozen base MB |")
    print("|---|---|---|---|---|---|---|")
    for i, c in enumerate(cases):
        med = statistics.median(c.times) * 1e3
        peft_case = cases[i + 1] if i < 4 and i % 2 == 0 else (cases[i] if i < 4 else None)
        vs_t = f"{med / (statistics.median(peft_case.times) * 1e3):.2f}x" if peft_case else "-"
        vs_m = f"{c.peak_bytes / peft_case.peak_bytes:.2f}x" if peft_case else "-"
        print(f"| {c.name} | {med:.0f} | {min(c.times) * 1e3:.0f} | {vs_t} | {c.peak_bytes / MB:.1f} | {vs_m} | "
              f"{c.weight_bytes / MB:.1f} |")


if __name__ == "__main__":
    main()
