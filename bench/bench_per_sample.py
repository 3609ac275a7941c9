"""A different adapter per batch row: lorakit's `per_sample_adapters` vs PEFT's `adapter_names=`,
side by side in one process.

On a small Llama (hidden 512, 4 layers, 8 heads, vocab 8000, fp32, CPU) carrying 32 adapters
(r=16, alpha=32, all-linear, random weights), a batch of 32 rows whose rows cycle through 8 or
32 distinct adapters runs

  - forward: one pass over 32 x 32 prompt tokens (prefill); throughput = prompt tokens / s;
  - generate: greedy, 16 new tokens per row after the 32-token prompt (no early stop);
    throughput = new tokens / s.

lorakit enters `per_sample_adapters` inside the timed call (it stacks the adapters' factors on
entry, as a server does per batch); PEFT gets `adapter_names=` on the call. References: the
plain base model (what a single merged adapter costs) and lorakit with one unmerged adapter
active for every row. Before timing, the script checks that lorakit and PEFT give the same
logits (atol 1e-4) and the same generated tokens.

The cases run interleaved, one call each per round in a rotating order, so a burst of machine
noise hits all alike; the tables give medians. Read the ratios: absolute throughput holds for
this machine only, and the load average printed before and after says how busy it was.

    .venv/bin/python bench/bench_per_sample.py            # the full run (a few minutes on 2 cores)
    .venv/bin/python bench/bench_per_sample.py --quick    # a smoke run: 1 warmup, 2 timed rounds
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from bench_step import cpu_model
from torch import nn

MODEL_CONFIG = dict(
    hidden_size=512,
    intermediate_size=1376,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=8,
    vocab_size=8000,
    max_position_embeddings=256,
    pad_token_id=0,
)
ROWS, PROMPT, NEW = 32, 32, 16
RANK, ALPHA = 16, 32
DISTINCT = (8, 32)
LIBRARY = max(DISTINCT)


@dataclass
class Case:
    name: str
    kind: str                                  # "base", "single", "lorakit" or "peft"
    distinct: int | None                       # adapters in the batch (None for the references)
    call: Callable[[], torch.Tensor]
    times: dict[str, list[float]] = field(default_factory=lambda: {"forward": [], "generate": []})


def build_models():
    """The plain base, a lorakit model with the adapter library, and PEFT with the same adapters
    read from the files lorakit writes."""
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    import lorakit as lk

    def base() -> nn.Module:
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(**MODEL_CONFIG)).eval()

    plain, ours = base(), base()
    gen = torch.Generator().manual_seed(1)
    for k in range(LIBRARY):
        lk.add_adapter(ours, lk.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear"), name=f"a{k}")
        with torch.no_grad():
            for name, p in ours.named_parameters():
                if f".lora_B.a{k}." in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(LIBRARY):
            lk.save_adapter(ours, f"{tmp}/a{k}", name=f"a{k}")
        theirs = peft.PeftModel.from_pretrained(base(), f"{tmp}/a0", adapter_name="a0")
        for k in range(1, LIBRARY):
            theirs.load_adapter(f"{tmp}/a{k}", adapter_name=f"a{k}")
    return plain, ours.eval(), theirs.eval()


def row_names(distinct: int) -> list[str]:
    return [f"a{i % distinct}" for i in range(ROWS)]


def make_cases(plain: nn.Module, ours: nn.Module, theirs: nn.Module, ids: torch.Tensor, mode: str) -> list[Case]:
    import lorakit as lk

    gen_kw = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)

    def run(model: nn.Module, **kw) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=ids, **kw).logits if mode == "forward" else model.generate(input_ids=ids, **gen_kw,
                                                                                             **kw)

    def per_sample(names: list[str]) -> Callable[[], torch.Tensor]:
        def call() -> torch.Tensor:
            with lk.per_sample_adapters(ours, names):
                return run(ours)
        return call

    def single() -> torch.Tensor:
        lk.set_active_adapters(ours, ["a0"])
        return run(ours)

    cases = [Case("base model (= one merged adapter)", "base", None, lambda: run(plain)),
             Case("lorakit, one unmerged adapter", "single", None, single)]
    for n in DISTINCT:
        names = row_names(n)
        cases.append(Case(f"lorakit per_sample_adapters, {n} adapters", "lorakit", n, per_sample(names)))
        cases.append(Case(f"PEFT adapter_names=, {n} adapters", "peft", n,
                          lambda names=names: run(theirs, adapter_names=names)))
    return cases


def check_same(cases: list[Case], mode: str) -> None:
    """lorakit and PEFT agree on the mixed batches (and differ from the base: adapters act)."""
    base = cases[0].call()
    for n in DISTINCT:
        ours = next(c for c in cases if c.kind == "lorakit" and c.distinct == n).call()
        theirs = next(c for c in cases if c.kind == "peft" and c.distinct == n).call()
        if mode == "forward":
            diff = (ours - theirs).abs().max().item()
            assert diff <= 1e-4, f"{n} adapters: lorakit and PEFT logits differ by {diff}"
            assert (ours - base).abs().max().item() > 1e-3, "the adapters do not change the logits"
        else:
            assert torch.equal(ours, theirs), f"{n} adapters: lorakit and PEFT generate different tokens"


def timed(cases: list[Case], mode: str, warmup: int, rounds: int, log: Callable[[str], None]) -> None:
    for rnd in range(warmup + rounds):
        t_round = time.perf_counter()
        for i in range(len(cases)):
            case = cases[(i + rnd) % len(cases)]       # rotate the order each round
            t0 = time.perf_counter()
            case.call()
            if rnd >= warmup:
                case.times[mode].append(time.perf_counter() - t0)
        log(f"  {mode} round {rnd + 1}/{warmup + rounds} ({'warmup' if rnd < warmup else 'timed'}) "
            f"{time.perf_counter() - t_round:.1f}s")


def entry_ms(ours: nn.Module, distinct: int, repeats: int = 5) -> float:
    """Median time to enter and leave `per_sample_adapters` (stacking the factors), no forward."""
    import lorakit as lk

    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        with lk.per_sample_adapters(ours, row_names(distinct)):
            pass
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def table(cases: list[Case], mode: str) -> str:
    tokens = ROWS * (PROMPT if mode == "forward" else NEW)
    med = {c.name: statistics.median(c.times[mode]) for c in cases}
    base = med[cases[0].name]

    def peft_of(c: Case) -> Case | None:
        return next((o for o in cases if o.kind == "peft" and o.distinct == c.distinct), None) \
            if c.kind == "lorakit" else None

    rows = ["| case | ms (median) | min ms | tokens/s | vs PEFT | vs base |", "|---|---|---|---|---|---|"]
    for c in cases:
        ref = peft_of(c)
        vs_peft = f"**{med[ref.name] / med[c.name]:.2f}x**" if ref else "-"
        rows.append(f"| {c.name} | {med[c.name] * 1e3:.0f} | {min(c.times[mode]) * 1e3:.0f} "
                    f"| {tokens / med[c.name]:,.0f} | {vs_peft} | {base / med[c.name]:.2f}x |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=10, help="timed forward rounds (generate: half, at least 2)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    ap.add_argument("--quick", action="store_true", help="smoke run: --warmup 1 --rounds 2")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.quick:
        args.warmup, args.rounds = 1, 2
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

    load_before = os.getloadavg()
    print(f"# lorakit per-sample adapter benchmark, {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}")
    print(f"# {cpu_model()}, {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"transformers {transformers.__version__}, peft {peft.__version__}, lorakit {lorakit.__version__}, "
          f"Python {platform.python_version()}")
    print(f"# Llama {MODEL_CONFIG['num_hidden_layers']} layers, hidden {MODEL_CONFIG['hidden_size']}, "
          f"intermediate {MODEL_CONFIG['intermediate_size']}, vocab {MODEL_CONFIG['vocab_size']}, fp32; "
          f"{LIBRARY} adapters r={RANK} alpha={ALPHA} all-linear; {ROWS} rows x {PROMPT} prompt tokens, "
          f"{NEW} new tokens; {args.warmup} warmup + {args.rounds} forward / {max(2, args.rounds // 2)} generate "
          f"timed rounds")
    print(f"# load average before: {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}")

    log("building models and adapters ...")
    plain, ours, theirs = build_models()
    ids = torch.randint(3, MODEL_CONFIG["vocab_size"], (ROWS, PROMPT), generator=torch.Generator().manual_seed(2))
    results = {}
    for mode, rounds in (("forward", args.rounds), ("generate", max(2, args.rounds // 2))):
        cases = make_cases(plain, ours, theirs, ids, mode)
        log(f"checking {mode} lorakit == PEFT ...")
        check_same(cases, mode)
        timed(cases, mode, args.warmup, rounds, log)
        results[mode] = cases
    entries = {n: entry_ms(ours, n) for n in DISTINCT}
    load_after = os.getloadavg()

    print("\nlorakit == PEFT on every mixed batch (logits within 1e-4, generated tokens equal): checked")
    for mode, cases in results.items():
        what = f"{ROWS} x {PROMPT} prompt tokens, one forward" if mode == "forward" else \
            f"{ROWS} rows x {NEW} new tokens, greedy"
        print(f"\n## {mode} ({what})\n")
        print(table(cases, mode))
    print("\nvs PEFT: PEFT's time / lorakit's at the same adapter count (above 1 = lorakit faster); "
          "vs base: base time / this case's")
    print("entering per_sample_adapters (stacking the factors, included above): "
          + ", ".join(f"{n} adapters {ms:.1f} ms" for n, ms in entries.items()))
    print(f"# load average after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}; "
          f"total runtime {time.perf_counter() - t_start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
