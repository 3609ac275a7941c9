"""One LoRA training step, lorakit vs PEFT vs the frozen base, side by side in one process.

What it measures, on a small Llama (hidden 512, 6 layers, 8 heads, vocab 8000, fp32, CPU) with a
batch of 4 x 256 random token ids (labels = ids) and r=16, alpha=32 adapters on every linear
layer but the output head ("all-linear"):

  - step time: forward + backward + zero_grad, the median (and minimum) over timed rounds, after
    warmup rounds. The cases run interleaved, one step each per round in a rotating order, so a
    burst of machine noise hits all of them alike;
  - saved activations: the bytes autograd keeps for backward, counted with
    `torch.autograd.graph.saved_tensors_hooks` at the end of one forward. Each storage counts
    once (dedup by `untyped_storage().data_ptr()`), and storages of the model's parameters (the
    frozen weights, the adapter factors) are left out: what is left is activation memory;
  - peak memory: the peak of bytes allocated by torch's CPU allocator during one step, above what
    was allocated when the step began, from the allocation events `torch.profiler` records with
    `profile_memory=True` (deterministic, unlike RSS; transient buffers and gradients included).

Cases: the floor (the frozen base's own forward and backward: no parameter requires grad, but the
input embeddings' output does, so backward runs through every layer computing input gradients
and no weight gradient), lorakit and PEFT at lora_dropout 0 and 0.05, each without and with
activation (gradient) checkpointing. There is no optimizer step: B stays zero, so every case's
loss equals the base loss, which is asserted (lorakit vs PEFT at dropout 0 in particular).

Why ratios: CPU wall-clock on a shared 2-core machine is noisy (other processes steal cores), so
the step-time ratios from interleaved rounds and the saved/peak bytes (which do not depend on
load) are the figures to read; absolute milliseconds are for this machine only.

    .venv/bin/python bench/bench_step.py            # the full run (a few minutes on 2 cores)
    .venv/bin/python bench/bench_step.py --quick    # a smoke run: 1 warmup, 3 timed rounds
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

MODEL_CONFIG = dict(
    hidden_size=512,
    intermediate_size=1376,
    num_hidden_layers=6,
    num_attention_heads=8,
    num_key_value_heads=8,
    vocab_size=8000,
    max_position_embeddings=256,
    use_cache=False,
)
BATCH, SEQ = 4, 256
RANK, ALPHA = 16, 32
DROPOUTS = (0.0, 0.05)
MB = 2**20


# -- the cases ----------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    kind: str                  # "floor", "lorakit" or "peft"
    dropout: float | None      # None for the floor
    gc: bool                   # activation checkpointing on
    module: nn.Module          # what the step calls
    times: list[float] = field(default_factory=list)
    loss0: float = float("nan")
    saved_bytes: int = 0
    peak_bytes: int | None = None


def build_base() -> nn.Module:
    """The same randomly initialised Llama every call (seeded), in train mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**MODEL_CONFIG)).float()
    model.train()
    return model


def enable_checkpointing(hf_model: nn.Module) -> None:
    """transformers' activation checkpointing (non-reentrant by default); the method's older name
    `gradient_checkpointing_enable` is a deprecated alias in transformers 5."""
    enable = getattr(hf_model, "activation_checkpointing_enable", None) or hf_model.gradient_checkpointing_enable
    enable()


def make_case(kind: str, dropout: float | None, gc: bool) -> Case:
    model = build_base()
    if kind == "floor":
        for p in model.parameters():
            p.requires_grad_(False)
        model.enable_input_require_grads()        # the embeddings' output requires grad
        module, hf_model, label = model, model, "floor (frozen base)"
    elif kind == "lorakit":
        import lorakit as lk

        lk.add_adapter(model, lk.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=dropout,
                                            target_modules="all-linear"))
        module, hf_model, label = model, model, f"lorakit  p={dropout:g}"
    elif kind == "peft":
        import peft

        module = peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=dropout,
                                                             target_modules="all-linear"))
        hf_model, label = module.get_base_model(), f"PEFT     p={dropout:g}"
    else:
        raise ValueError(kind)
    if gc:
        enable_checkpointing(hf_model)
    module.train()
    return Case(label, kind, dropout, gc, module)


def make_cases(with_gc: bool) -> list[Case]:
    cases = []
    for gc in (False, True) if with_gc else (False,):
        cases.append(make_case("floor", None, gc))
        for p in DROPOUTS:
            cases.append(make_case("lorakit", p, gc))
            cases.append(make_case("peft", p, gc))
    return cases


# -- one step, and what it keeps --------------------------------------------------------------


def step(module: nn.Module, ids: torch.Tensor) -> float:
    loss = module(input_ids=ids, labels=ids).loss
    loss.backward()
    module.zero_grad(set_to_none=True)
    return loss.item()


def timed_step(module: nn.Module, ids: torch.Tensor) -> tuple[float, float]:
    t0 = time.perf_counter()
    loss = step(module, ids)
    return time.perf_counter() - t0, loss


@contextlib.contextmanager
def quiet_stderr():
    """Silence the profiler's C++ start/stop lines (written straight to fd 2)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def measure_memory(case: Case, ids: torch.Tensor) -> None:
    """One step under a saved-tensors hook and the memory profiler: the saved activation bytes
    (unique storages, parameters excluded) and the step's allocator peak. Also checks where the
    gradients went: the floor computes none for parameters, a LoRA case only for its adapters."""
    from torch.profiler import ProfilerActivity, profile

    module = case.module
    param_storages = {p.untyped_storage().data_ptr() for p in module.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in param_storages and storage.nbytes() > 0:
            saved[ptr] = storage.nbytes()
        return t

    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = module(input_ids=ids, labels=ids).loss
        case.saved_bytes = sum(saved.values())
        loss.backward()
        with_grad = [n for n, p in module.named_parameters() if p.grad is not None]
        module.zero_grad(set_to_none=True)

    if case.kind == "floor":
        assert not with_grad, f"the floor computed weight gradients: {with_grad[:3]}"
    else:
        assert with_grad and all("lora_" in n for n in with_grad), f"{case.name}: gradients on {with_grad[:3]}"

    case.peak_bytes = allocator_peak(prof)


def allocator_peak(prof) -> int | None:
    """The running sum of the CPU allocation events (+bytes / -bytes) in time order, its maximum:
    the step's peak above what was allocated when profiling began. None if this torch's profiler
    does not expose the events (a private API)."""
    from torch.autograd import DeviceType

    try:
        events = [e for e in prof.profiler.kineto_results.events()
                  if e.name() == "[memory]" and e.device_type() == DeviceType.CPU]
    except AttributeError:
        return None
    current = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        current += e.nbytes()
        peak = max(peak, current)
    return peak


# -- the run --------------------------------------------------------------------------------------


def run(cases: list[Case], ids: torch.Tensor, warmup: int, steps: int, log: Callable[[str], None]) -> None:
    n = len(cases)
    for rnd in range(warmup + steps):
        t_round = time.perf_counter()
        for i in range(n):
            case = cases[(i + rnd) % n]                # rotate the order each round
            dt, loss = timed_step(case.module, ids)
            if rnd == 0:
                case.loss0 = loss
            if rnd >= warmup:
                case.times.append(dt)
        what = "warmup" if rnd < warmup else "timed"
        log(f"  round {rnd + 1}/{warmup + steps} ({what}) {time.perf_counter() - t_round:.1f}s")


def check_losses(cases: list[Case]) -> None:
    """B = 0 at init, so every LoRA case's loss is the base loss; lorakit and PEFT at dropout 0
    must agree (the test this benchmark is asked to make), and all must match the floor."""
    for gc in {c.gc for c in cases}:
        group = [c for c in cases if c.gc == gc]
        floor = next(c for c in group if c.kind == "floor")
        lk0 = next(c for c in group if c.kind == "lorakit" and c.dropout == 0)
        peft0 = next(c for c in group if c.kind == "peft" and c.dropout == 0)
        assert abs(lk0.loss0 - peft0.loss0) <= 1e-6 * abs(peft0.loss0), \
            f"step-0 loss differs: lorakit {lk0.loss0!r} vs PEFT {peft0.loss0!r} (gc={gc})"
        for c in group:
            assert abs(c.loss0 - floor.loss0) <= 1e-5 * abs(floor.loss0), \
                f"step-0 loss of {c.name} {c.loss0!r} != base loss {floor.loss0!r} (gc={gc})"


def ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}x"


def mb(n: int | None) -> str:
    return "-" if n is None else f"{n / MB:.1f}"


def table(cases: list[Case], gc: bool) -> str:
    group = [c for c in cases if c.gc == gc]
    floor = next(c for c in group if c.kind == "floor")

    def peft_of(c: Case) -> Case | None:
        return next((o for o in group if o.kind == "peft" and o.dropout == c.dropout), None) \
            if c.kind != "floor" else None

    head = ("| case | step ms (median) | min ms | vs PEFT | vs floor "
            "| saved act. MB | vs PEFT | vs floor | peak MB | vs PEFT | vs floor |")
    rows = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for c in group:
        med, low = statistics.median(c.times) * 1e3, min(c.times) * 1e3
        ref = peft_of(c)
        ref_med = statistics.median(ref.times) * 1e3 if ref else None
        f_med = statistics.median(floor.times) * 1e3
        rows.append(
            f"| {c.name} | {med:.0f} | {low:.0f} | {ratio(med, ref_med)} | {ratio(med, f_med)} "
            f"| {c.saved_bytes / MB:.1f} | {ratio(c.saved_bytes, ref and ref.saved_bytes)} "
            f"| {ratio(c.saved_bytes, floor.saved_bytes)} "
            f"| {mb(c.peak_bytes)} | {ratio(c.peak_bytes, ref and ref.peak_bytes)} "
            f"| {ratio(c.peak_bytes, floor.peak_bytes)} |"
        )
    return "\n".join(rows)


def lora_flop_ratio() -> float:
    """(floor + adapter) / floor multiply-adds per token of one step, counted from the shapes: the
    least a LoRA step can cost against the floor however its adapter path is built.

    Floor: each linear layer's forward and input gradient (2 x d_in x d_out; frozen: no weight
    gradient), the output head likewise, causal attention's QK^T and AV (T/2 keys on average, x d,
    two matmuls) forward and twice that backward. Adapters on every linear layer of a decoder layer:
    x A^T, (xA^T) B^T forward, then the input gradient through both and the gradients of A and B:
    3 x r x (d_in + d_out) each."""
    c = MODEL_CONFIG
    d, inter, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    kv = d * c["num_key_value_heads"] // c["num_attention_heads"]
    shapes = [(d, d), (d, kv), (d, kv), (d, d), (d, inter), (d, inter), (inter, d)]   # q k v o gate up down
    linear = sum(2 * a * b for a, b in shapes)
    attention = 3 * 2 * (SEQ / 2) * d
    floor = layers * (linear + attention) + 2 * d * c["vocab_size"]
    lora = layers * sum(3 * RANK * (a + b) for a, b in shapes)
    return (floor + lora) / floor


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=15, help="timed rounds (one step of every case each)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    ap.add_argument("--quick", action="store_true", help="smoke run: --warmup 1 --steps 3")
    ap.add_argument("--no-gc", action="store_true", help="skip the activation-checkpointing cases")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.quick:
        args.warmup, args.steps = 1, 3
    if args.steps < 1 or args.warmup < 1:
        ap.error("--steps and --warmup must be at least 1 (round 0 gives the step-0 loss check)")
    if args.threads:
        torch.set_num_threads(args.threads)

    import peft
    import transformers

    import lorakit

    warnings.filterwarnings("ignore", category=FutureWarning)
    transformers.logging.set_verbosity_error()
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    print(f"# lorakit step benchmark, {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}")
    print(f"# {cpu_model()}, {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"transformers {transformers.__version__}, peft {peft.__version__}, lorakit {lorakit.__version__}, "
          f"Python {platform.python_version()}")
    print(f"# Llama {MODEL_CONFIG['num_hidden_layers']} layers, hidden {MODEL_CONFIG['hidden_size']}, "
          f"intermediate {MODEL_CONFIG['intermediate_size']}, vocab {MODEL_CONFIG['vocab_size']}, fp32; "
          f"batch {BATCH} x {SEQ}; r={RANK} alpha={ALPHA} all-linear; "
          f"{args.warmup} warmup + {args.steps} timed rounds")

    log("building models ...")
    cases = make_cases(with_gc=not args.no_gc)
    ids = torch.randint(0, MODEL_CONFIG["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)                                # the dropout masks of the run

    log(f"timing {len(cases)} cases ...")
    run(cases, ids, args.warmup, args.steps, log)
    check_losses(cases)
    log("measuring memory ...")
    for case in cases:
        measure_memory(case, ids)

    print(f"\nstep-0 loss (every case; B = 0 at init): {cases[0].loss0:.6f}, "
          f"lorakit == PEFT at dropout 0: checked")
    for gc in (False, True) if not args.no_gc else (False,):
        print(f"\n## {'with' if gc else 'without'} activation checkpointing\n")
        print(table(cases, gc))
    print(f"\nvs PEFT: against PEFT at the same dropout; vs floor: against the frozen base "
          f"(same checkpointing setting). total runtime {time.perf_counter() - t_start:.0f}s")
    print(f"the adapters' own matmuls at this shape: {lora_flop_ratio():.3f}x the floor's multiply-adds "
          "(lora_flop_ratio), the least a LoRA step can cost against the floor")
    return 0


if __name__ == "__main__":
    sys.exit(main())
