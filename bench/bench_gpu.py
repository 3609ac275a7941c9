"""A LoRA and a QLoRA training step on a ~1B Llama on one GPU: lorakit vs PEFT + transformers.

The model is a `LlamaForCausalLM` with TinyLlama-1.1B's shape (hidden 2048, intermediate 5632,
22 layers, 32 heads, 4 KV heads, vocab 32000, untied head), built from a config on the device with
seeded random weights (no download), bf16 weights, sdpa attention. The input is a batch of 4 x 2048
random token ids (labels = ids). Adapters: r=16, alpha=32, dropout 0, on every linear layer but the
output head ("all-linear"), fp32 (lorakit as `lorakit train` adds them; PEFT by its default
`autocast_adapter_dtype`). Every step runs under bf16 autocast, as `lorakit train` runs on a GPU
and as transformers' Trainer runs with `bf16=True`; AdamW (fused on CUDA) over the adapters.

Cases, each a full training step (forward, backward, optimizer step, zero_grad) on the same ids:

  - floor: the frozen base's forward and backward (input gradients only, no optimizer): what
    any LoRA step costs at least;
  - lorakit: `lk.add_adapter`, the loss from lorakit's `loss_sum(..., chunked=True)` (the full logits
    are never materialised), without and with activation checkpointing;
  - lorakit + Triton kernels (on CUDA with triton installed, as `lorakit train` runs there by
    default, `training.kernels: auto`): the same with `lorakit.kernels.use_kernels` (RMSNorm,
    SwiGLU, RoPE) and the chunked loss's softmax kernel;
  - PEFT + transformers: `peft.get_peft_model`, the loss from `model(input_ids, labels=...)`,
    without and with activation checkpointing.

Checkpointing is transformers' own (non-reentrant) for both. The same five cases then run on a
4-bit NF4 base (QLoRA). Both tools get the same quantized model: `lorakit.quantize.quantize_linears`
(the path `quantize_base: nf4` takes) replaces every linear but the head by bitsandbytes'
`Linear4bit` (NF4, blocks of 64, double quantization, bf16 compute), and PEFT wraps those layers
with its own bitsandbytes LoRA layer. Loading through transformers' `BitsAndBytesConfig` would
need the random model saved to disk first and would quantize the same bf16 weights into the same
`Linear4bit` layers; quantizing in place keeps the weights bit-identical across tools, so their
step-0 losses can be compared exactly. PEFT's `prepare_model_for_kbit_training` is not called: it
upcasts the embeddings, head and norms to fp32, which would only add to PEFT's memory.

Measured:

  - tokens/s: batch x seq over the median step time of the timed rounds. The cases run
    interleaved, one step each per round in a rotating order, after warmup rounds; on CUDA the
    device is synchronised before and after each step;
  - peak memory, the bytes torch tensors held at once in one step, counting the weights, adapters,
    optimizer state and batch. On CUDA every case lives on the device during the run, so a case's
    peak is what it left allocated after it was built and ran its first step (its "resident"
    bytes: weights, adapters, AdamW state) plus `torch.cuda.max_memory_allocated()` over one step
    minus what was allocated when that step began (reset before it): what
    `max_memory_allocated` would read in a process running that case alone. On CPU,
    `lorakit.train.memory.PeakMemory` over one step (the figure `lorakit train` reports);
  - model-FLOPs utilisation: tokens/s x 4N / peak bf16 dense FLOP/s. 4N per token is a LoRA
    step's model cost: 2N forward, 2N for the input gradients in backward, none for the frozen
    weights' gradients; N counts the base's matmul weights (every parameter but the input
    embedding table, whose lookup does no arithmetic). Attention's own s^2 FLOPs, the adapters'
    and checkpointing's recompute are not counted, so MFU is a lower bound on the hardware's use.
    The peak comes from the GPU's name (H100/H200 SXM 989e12, A100 312e12, ...) or --peak-tflops;
  - step-0 losses: taken before any optimizer step (B = 0, so every case of a base computes the
    base's loss); lorakit's and PEFT's must agree within bf16 rounding (asserted).

`--max-seq`: the longest sequence (batch 1, multiples of 256) whose training step fits a fixed
budget (`--budget-gib`), for lorakit with checkpointing and PEFT + transformers with and without
it, on both bases: doubling from 256 until a step does not fit, then bisecting. A step fits when
its peak (`max_memory_allocated`, reset before it, with only that case's model on the device; on
CPU PeakMemory's count) is within the budget and it raised no `torch.OutOfMemoryError`. Why
compare the allocated peak with the budget rather than cap the allocator with
`torch.cuda.set_per_process_memory_fraction`: the cap applies to reserved memory, which also holds
the caching allocator's free blocks, whose amount depends on the earlier tries in the process;
the allocated peak depends only on the step, is the quantity the peak-memory column reports,
and a try over budget still runs to the end on a bigger device and only counts as not fitting.

    python bench/bench_gpu.py                       # the timed cases (estimated 1-2 min on an H200)
    python bench/bench_gpu.py --max-seq             # the longest sequence in 40 GiB (estimated minutes)
    python bench/bench_gpu.py --tiny                # smoke run on CPU: hidden 256, 2 layers, seq 128
    python bench/bench_gpu.py --tiny --max-seq      # ... in a 12 MiB budget, in steps of 32 tokens

Without CUDA and without --tiny it prints one line and exits 0 (so `make bench` passes on CPU hosts).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import itertools
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field

import torch
from bench_step import cpu_model, enable_checkpointing
from torch import nn

FULL_MODEL = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                  num_key_value_heads=4, vocab_size=32000)
# every width a multiple of 64: bitsandbytes' CPU NF4 kernel needs it (lorakit.quantize._check_cpu_widths)
TINY_MODEL = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1000)
RANK, ALPHA = 16, 32
LOSS_RTOL = 1e-3               # bf16 logits round to ~2^-8 of each; averaged over tokens, ~1e-7 seen (--tiny)
TARGET_SPEED, TARGET_MEMORY = 2.0, 0.5   # issue #5: >= 2x PEFT's tokens/s, <= 0.5x its peak
GiB, MiB = 2**30, 2**20

PEAK_BF16_FLOPS = [  # dense bf16 tensor-core FLOP/s by GPU name, most specific first
    ("H200 NVL", 835e12), ("H200", 989e12), ("H100 NVL", 835e12), ("H100 PCIe", 756e12), ("H100", 989e12),
    ("A100", 312e12),
]


@dataclass
class Setup:
    device: torch.device
    model_config: dict
    seq: int
    batch: int
    seq_step: int                  # --max-seq searches multiples of this


@dataclass
class Case:
    name: str
    kind: str                      # "floor", "lorakit" or "peft"
    nf4: bool                      # 4-bit NF4 base (QLoRA)
    gc: bool                       # activation checkpointing
    kernels: bool = False          # lorakit with its Triton kernels (lorakit.kernels)
    module: nn.Module | None = None
    opt: torch.optim.Optimizer | None = None
    times: list[float] = field(default_factory=list)
    loss0: float = float("nan")
    resident: int = 0              # CUDA: bytes it keeps allocated between steps
    peak: int = 0


# -- building -----------------------------------------------------------------------------------


def build_base(setup: Setup, nf4: bool, seq_cap: int) -> nn.Module:
    """The same seeded random bf16 Llama every call, built on the device; with `nf4` every linear
    but the head quantized in place as `quantize_base: nf4` does."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorakit.quantize import quantize_linears

    cfg = LlamaConfig(**setup.model_config, max_position_embeddings=seq_cap, use_cache=False,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    with setup.device:
        model = LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    if nf4:
        quantize_linears(model, torch.bfloat16, setup.device)
    return model.train()


def attach(case: Case, model: nn.Module) -> None:
    """Put the case's adapters (or none, for the floor), checkpointing and optimizer on `model`."""
    if case.kind == "floor":
        for p in model.parameters():
            p.requires_grad_(False)
        model.enable_input_require_grads()        # backward runs through every layer, for input grads only
        case.module = model
    elif case.kind == "lorakit":
        import lorakit as lk

        lk.add_adapter(model, lk.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear"),
                       adapter_dtype=torch.float32)   # as `lorakit train` adds them
        if case.kernels:
            from lorakit.train.kernels import use_kernels

            use_kernels(model)
        case.module = model
    else:
        import peft

        case.module = peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                                                 target_modules="all-linear"))
    if case.gc:
        enable_checkpointing(model)
    case.module.train()
    trainable = [p for p in case.module.parameters() if p.requires_grad]
    if case.kind != "floor":
        case.opt = torch.optim.AdamW(trainable, lr=1e-4, fused=model.device.type == "cuda")


def cases_for(kinds: list[tuple[str, bool]], nf4: bool, kernels: bool = False) -> list[Case]:
    """The cases of `kinds` on one base; with `kernels`, lorakit's cases once more with its Triton
    kernels (the default of `lorakit train` on a GPU)."""
    base = "NF4" if nf4 else "bf16"
    names = {"floor": "floor (frozen base)", "lorakit": "lorakit", "peft": "PEFT + transformers"}
    variants = [(k, gc, False) for k, gc in kinds]
    if kernels:
        variants += [(k, gc, True) for k, gc in kinds if k == "lorakit"]
    return [Case(f"{names[k]}{' + Triton kernels' if kern else ''}{', checkpointing' if gc else ''} [{base}]",
                 k, nf4, gc, kern) for k, gc, kern in variants]


def kernels_available(device: torch.device) -> bool:
    """lorakit's Triton kernels run here (CUDA and triton); --tiny's CPU smoke run has none."""
    from lorakit.train.kernels import kernels_wanted

    return kernels_wanted("auto", device, compiling=False)


TIMED_KINDS = [("floor", False), ("lorakit", False), ("peft", False), ("lorakit", True), ("peft", True)]
MAX_SEQ_KINDS = [("lorakit", True), ("peft", True), ("peft", False)]


# -- one step -----------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step(case: Case, ids: torch.Tensor) -> float:
    """One training step under bf16 autocast; returns its loss (mean over the trained tokens)."""
    with torch.autocast(ids.device.type, dtype=torch.bfloat16):
        if case.kind == "lorakit":
            from lorakit.train.loss import loss_sum

            total, n = loss_sum(case.module, {"input_ids": ids, "labels": ids}, chunked=True, kernel=case.kernels)
            loss = total / n
        else:
            loss = case.module(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    if case.opt is not None:
        case.opt.step()
        case.opt.zero_grad(set_to_none=True)
    return loss.item()


def make_case(case: Case, setup: Setup, ids: torch.Tensor, seq_cap: int) -> Case:
    """Build the case on the device and run its first step (its step-0 loss, and the optimizer state
    that every later step starts with); on CUDA record the bytes it leaves allocated."""
    start = allocated(setup.device)
    attach(case, build_base(setup, case.nf4, seq_cap))
    case.loss0 = step(case, ids)
    case.resident = allocated(setup.device) - start + ids.nbytes
    return case


def allocated(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    gc.collect()
    sync(device)
    return torch.cuda.memory_allocated(device)


def warm_device(device: torch.device) -> None:
    """A bf16 matmul forward and backward, so that cuBLAS's workspaces (allocated once, through the
    caching allocator) exist before the first case is built and count against none of them."""
    if device.type == "cuda":
        w = torch.randn(256, 256, device=device, requires_grad=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            (torch.randn(256, 256, device=device) @ w).sum().backward()
        sync(device)


def step_peak(case: Case, ids: torch.Tensor, alone: bool) -> int:
    """Peak bytes of one step. CUDA: with `alone` (the case is the only thing on the device)
    `max_memory_allocated` as is, otherwise the case's resident bytes plus the step's rise above
    what was allocated when it began. CPU: PeakMemory, counting the model, optimizer and ids."""
    from lorakit.train.memory import PeakMemory

    device = ids.device
    if device.type == "cuda":
        start = allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step(case, ids)
        sync(device)
        high = torch.cuda.max_memory_allocated(device)
        return high if alone else case.resident + high - start
    meter = PeakMemory(device)
    holders = [h for h in (case.module, case.opt, ids) if h is not None]
    with meter.region(*holders):
        step(case, ids)
    return meter.peak_bytes


# -- the timed run ------------------------------------------------------------------------------


def run_rounds(cases: list[Case], ids: torch.Tensor, warmup: int, steps: int) -> None:
    n = len(cases)
    for rnd in range(warmup + steps):
        t_round = time.perf_counter()
        for i in range(n):
            case = cases[(i + rnd) % n]                # rotate the order each round
            sync(ids.device)
            t0 = time.perf_counter()
            step(case, ids)
            sync(ids.device)
            if rnd >= warmup:
                case.times.append(time.perf_counter() - t0)
        log(f"  round {rnd + 1}/{warmup + steps} ({'warmup' if rnd < warmup else 'timed'}) "
            f"{time.perf_counter() - t_round:.1f}s")


def check_losses(cases: list[Case]) -> None:
    """Within a base every case computes the base's loss at step 0 (B = 0); lorakit's chunked loss
    and transformers' full-logits loss differ only by bf16 rounding."""
    for nf4 in {c.nf4 for c in cases}:
        group = [c for c in cases if c.nf4 == nf4]
        ref = next(c for c in group if c.kind == "peft" and not c.gc)
        for c in group:
            assert abs(c.loss0 - ref.loss0) <= LOSS_RTOL * abs(ref.loss0), \
                f"step-0 loss of {c.name} {c.loss0!r} != {ref.name} {ref.loss0!r} (rtol {LOSS_RTOL})"


def tokens_per_s(case: Case, setup: Setup) -> float:
    return setup.batch * setup.seq / statistics.median(case.times)


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x"


def unit(device: torch.device) -> str:
    """GiB for a GPU's ~1B model, MiB for --tiny's."""
    return "GiB" if device.type == "cuda" else "MiB"


def size(n: int, device: torch.device) -> str:
    return f"{n / GiB:.2f}" if device.type == "cuda" else f"{n / MiB:.1f}"


def table(group: list[Case], setup: Setup, flops_per_token: float, peak_flops: float | None) -> str:
    peft_of = {gc: next(c for c in group if c.kind == "peft" and c.gc == gc) for gc in (False, True)}
    rows = [f"| case | tokens/s | vs PEFT | vs PEFT no ckpt | ms/step | peak {unit(setup.device)} | vs PEFT | vs PEFT no ckpt "
            "| MFU (4N) |", "|---|---|---|---|---|---|---|---|---|"]
    for c in group:
        same, plain = peft_of[c.gc], peft_of[False]
        tps = tokens_per_s(c, setup)
        mfu = "n/a" if peak_flops is None else f"{tps * flops_per_token / peak_flops:.1%}"
        rows.append(f"| {c.name} | {tps:,.0f} | {ratio(tps, tokens_per_s(same, setup))} "
                    f"| {ratio(tps, tokens_per_s(plain, setup))} | {statistics.median(c.times) * 1e3:.1f} "
                    f"| {size(c.peak, setup.device)} | {ratio(c.peak, same.peak)} | {ratio(c.peak, plain.peak)} "
                    f"| {mfu} |")
    return "\n".join(rows)


def target_lines(group: list[Case], setup: Setup) -> list[str]:
    """lorakit against PEFT + transformers on the issue's targets, for each pairing of checkpointing."""
    def find(kind: str, gc: bool, kernels: bool = False) -> Case | None:
        return next((c for c in group if c.kind == kind and c.gc == gc and c.kernels == kernels), None)

    lines = []
    for (lk_gc, peft_gc), kernels in itertools.product(((False, False), (True, True), (True, False)), (False, True)):
        ours, theirs = find("lorakit", lk_gc, kernels), find("peft", peft_gc)
        if ours is None:
            continue
        speed = tokens_per_s(ours, setup) / tokens_per_s(theirs, setup)
        memory = ours.peak / theirs.peak
        verdict = "met" if speed >= TARGET_SPEED and memory <= TARGET_MEMORY else "NOT met"
        lines.append(f"- {ours.name} vs {theirs.name}: {speed:.2f}x tokens/s, {memory:.2f}x peak "
                     f"(target >= {TARGET_SPEED:g}x and <= {TARGET_MEMORY:g}x: {verdict})")
    return lines


def matmul_params(setup: Setup) -> int:
    """N of the 4N-per-token cost: the base's parameters but the input embedding table."""
    c = setup.model_config
    h, i, layers, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * i + 2 * h           # q, o; k, v; gate, up, down; 2 norms
    return layers * per_layer + h + v * h                             # + final norm + head


def peak_flops_of(device: torch.device, override_tflops: float | None) -> float | None:
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


def timed_mode(args: argparse.Namespace, setup: Setup) -> None:
    bases = [False] + ([] if args.no_qlora else [True])
    ids = random_ids(setup, setup.seq, setup.batch)
    warm_device(setup.device)
    cases = []
    for nf4 in bases:
        for case in cases_for(TIMED_KINDS, nf4, kernels_available(setup.device)):
            log(f"building {case.name} ...")
            cases.append(make_case(case, setup, ids, setup.seq))
    check_losses(cases)
    log(f"timing {len(cases)} cases ...")
    run_rounds(cases, ids, args.warmup, args.steps)
    log("measuring peak memory ...")
    for case in cases:
        case.peak = step_peak(case, ids, alone=False)

    n_params = matmul_params(setup)
    assert n_params == sum(p.numel() for n, p in cases[0].module.named_parameters() if "embed_tokens" not in n)
    peak_flops = peak_flops_of(setup.device, args.peak_tflops)
    print(f"step-0 loss: bf16 base {cases[0].loss0:.5f}"
          + ("" if args.no_qlora else f", NF4 base {next(c for c in cases if c.nf4).loss0:.5f}")
          + f"; every case of a base within {LOSS_RTOL:g} (relative) of PEFT's: checked")
    print(f"N = {n_params / 1e6:.1f} M matmul parameters; 4N = {4 * n_params / 1e9:.2f} GFLOP per token; peak "
          + ("n/a (unknown GPU: pass --peak-tflops)" if peak_flops is None else f"{peak_flops / 1e12:.0f} TFLOP/s bf16"))
    for nf4 in bases:
        group = [c for c in cases if c.nf4 == nf4]
        print(f"\n## {'QLoRA: 4-bit NF4 base' if nf4 else 'LoRA: bf16 base'}\n")
        print(table(group, setup, 4 * n_params, peak_flops))
        print()
        print("\n".join(target_lines(group, setup)))


# -- --max-seq ----------------------------------------------------------------------------------


def fits(case: Case, setup: Setup, seq: int, budget: int) -> tuple[bool, str]:
    """Whether one step at batch 1 x `seq` fits the budget, and what was seen (peak or OOM)."""
    ids = random_ids(setup, seq, 1)
    oom = False
    try:
        peak = step_peak(case, ids, alone=True)
    except torch.OutOfMemoryError:
        oom = True
    if oom:   # outside the handler, so the traceback's frames (and their tensors) are gone
        if case.opt is not None:
            case.opt.zero_grad(set_to_none=True)
        case.module.zero_grad(set_to_none=True)
        free(setup.device)
        return False, "out of memory"
    del ids
    free(setup.device)
    return peak <= budget, f"peak {size(peak, setup.device)} {unit(setup.device)}"


def longest_fit(case: Case, setup: Setup, budget: int, cap: int) -> tuple[int, bool]:
    """(longest multiple of the seq step up to `cap` that fits, whether the search stopped at `cap`
    with every try fitting): doubling from one step until a try fails, then bisecting. 0 when not
    even one step fits."""
    def test(seq: int) -> bool:
        ok, seen = fits(case, setup, seq, budget)
        log(f"  {case.name}: seq {seq}: {seen} -> {'fits' if ok else 'does not fit'}")
        return ok

    step_len = setup.seq_step
    good, bad, seq = 0, None, step_len
    while bad is None and good < cap:
        if test(seq):
            good, seq = seq, min(seq * 2, cap)
        else:
            bad = seq
    if bad is None:
        return good, True
    while bad - good > step_len:
        mid = (good + bad) // 2 // step_len * step_len
        good, bad = (mid, bad) if test(mid) else (good, mid)
    return good, False


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def max_seq_mode(args: argparse.Namespace, setup: Setup) -> None:
    budget = int(args.budget_gib * GiB)
    warm_device(setup.device)
    results = []
    for nf4 in [False] + ([] if args.no_qlora else [True]):
        for case in cases_for(MAX_SEQ_KINDS, nf4, kernels_available(setup.device)):
            log(f"searching {case.name} ...")
            make_case(case, setup, random_ids(setup, setup.seq_step, 1), args.max_seq_cap)
            results.append((case, *longest_fit(case, setup, budget, args.max_seq_cap)))
            case.module = case.opt = None      # only one case on the device at a time
            free(setup.device)

    print(f"## longest sequence in {size(budget, setup.device)} {unit(setup.device)} (batch 1, multiples of {setup.seq_step}, "
          f"searched up to {args.max_seq_cap})\n")
    print("| case | longest seq | vs PEFT, checkpointing | vs PEFT, no ckpt |")
    print("|---|---|---|---|")
    for case, seq, capped in results:
        refs = {r[0].gc: r for r in results if r[0].nf4 == case.nf4 and r[0].kind == "peft"}
        shown = f">= {seq} (search limit)" if capped else (str(seq) if seq else f"< {setup.seq_step}")
        print(f"| {case.name} | {shown} | {seq_ratio(seq, capped, *refs[True][1:])} "
              f"| {seq_ratio(seq, capped, *refs[False][1:])} |")


def seq_ratio(seq: int, capped: bool, ref: int, ref_capped: bool) -> str:
    """seq / ref, as a bound where the search stopped at its limit for one of them."""
    if not seq or not ref or (capped and ref_capped):
        return "-"
    return f"{'>= ' if capped else '<= ' if ref_capped else ''}{seq / ref:.2f}x"


# -- main ---------------------------------------------------------------------------------------


def random_ids(setup: Setup, seq: int, batch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, setup.model_config["vocab_size"], (batch, seq), generator=g).to(setup.device)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def machine_line(device: torch.device) -> str:
    import peft
    import transformers

    import lorakit

    where = (f"{torch.cuda.get_device_name(device)} ({torch.cuda.get_device_properties(device).total_memory / GiB:.0f} "
             f"GiB), CUDA {torch.version.cuda}" if device.type == "cuda" else f"{cpu_model()} (CPU)")
    return (f"# {where}, torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
            f"bitsandbytes {sys.modules['bitsandbytes'].__version__}, lorakit {lorakit.__version__}, "
            f"Python {platform.python_version()}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true",
                    help="a tiny Llama (hidden 256, 2 layers, vocab 1000, seq 128): a smoke run on any device")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--seq", type=int, default=None, help="sequence length (default 2048; 128 with --tiny)")
    ap.add_argument("--batch", type=int, default=None, help="sequences per step (default 4; 2 with --tiny)")
    ap.add_argument("--steps", type=int, default=None,
                    help="timed rounds, one step of every case each (default 5; 3 with --tiny)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed rounds first, after each case's first step (default 2; 1 with --tiny)")
    ap.add_argument("--no-qlora", action="store_true", help="skip the 4-bit NF4 base")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="the device's peak dense bf16 TFLOP/s for MFU (default: looked up from the GPU's name)")
    ap.add_argument("--max-seq", action="store_true", help="find the longest sequence that fits --budget-gib")
    ap.add_argument("--budget-gib", type=float, default=None,
                    help="--max-seq's memory budget (default 40; 12 MiB with --tiny)")
    ap.add_argument("--max-seq-cap", type=int, default=None,
                    help="--max-seq searches no further (default 131072; 1024 with --tiny)")
    args = ap.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available here; run `--tiny --device cpu` for the CPU smoke version")
    if device.type != "cuda" and not args.tiny:
        print(f"bench_gpu: no CUDA device ({device}), skipped; `--tiny` runs a small smoke version on the CPU")
        return 0
    # --tiny: CPU bf16 matmuls are slow, so fewer rounds, and a search in steps of 32 tokens
    tiny = args.tiny
    args.steps = args.steps if args.steps is not None else (3 if tiny else 5)
    args.warmup = args.warmup if args.warmup is not None else (1 if tiny else 2)
    if args.steps < 1 or args.warmup < 0:
        ap.error("--steps must be at least 1 and --warmup at least 0")
    args.budget_gib = args.budget_gib if args.budget_gib is not None else (12 / 1024 if tiny else 40.0)
    args.max_seq_cap = args.max_seq_cap or (1024 if tiny else 131072)
    setup = Setup(device, TINY_MODEL if tiny else FULL_MODEL, args.seq or (128 if tiny else 2048),
                  args.batch or (2 if tiny else 4), seq_step=32 if tiny else 256)
    if args.max_seq_cap < setup.seq_step or args.max_seq_cap % setup.seq_step:
        ap.error(f"--max-seq-cap must be a positive multiple of {setup.seq_step}")

    from lorakit.quantize import import_bitsandbytes

    import_bitsandbytes()   # before PEFT imports it: lorakit silences its CPU backend's import warning
    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="peft.*")
    transformers.logging.set_verbosity_error()
    t_start = time.perf_counter()
    c = setup.model_config
    print(f"# lorakit GPU benchmark{' (--tiny smoke run)' if args.tiny else ''}, "
          f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}")
    print(machine_line(device))
    print(f"# Llama {c['num_hidden_layers']} layers, hidden {c['hidden_size']}, intermediate {c['intermediate_size']}, "
          f"{c['num_attention_heads']} heads / {c['num_key_value_heads']} KV heads, vocab {c['vocab_size']}, bf16 "
          f"weights, sdpa, bf16 autocast; r={RANK} alpha={ALPHA} all-linear, fp32 adapters, AdamW; "
          + (f"--max-seq, batch 1, budget {size(int(args.budget_gib * GiB), device)} {unit(device)}" if args.max_seq else
             f"batch {setup.batch} x {setup.seq}; {args.warmup} warmup + {args.steps} timed rounds"))
    print()
    (max_seq_mode if args.max_seq else timed_mode)(args, setup)
    print(f"\ntotal runtime {time.perf_counter() - t_start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
