"""Serving throughput: the batching engine (`lorakit.serve.Engine`, in process, no HTTP) under a
closed load of requests spread over 1, 8 or 32 distinct adapters, against the same load on the
base model with one adapter merged into it (the ceiling: no adapter work at all).

Model: a Llama from a config (hidden 512, intermediate 1376, 4 layers, 8 heads, the built-in byte
tokenizer's 263-token vocabulary), fp32 on CPU (bf16 on a GPU), seeded random weights, carrying a
library of 32 adapters (r=16, alpha=32, all-linear, random B; `--rank` to change). Every case serves the same load:
64 requests, each a 32-token prompt and 32 greedy new tokens (the end token is switched off, so
every request generates all 32), all submitted at once to an engine with max_batch_size 32, so
continuous batching runs two waves and new requests join as old ones leave.

  - merged: `merge_adapters` + `unload` of adapter a0: a plain model, every request on it;
  - 1 / 8 / 32 adapters: the 32-adapter library loaded (stacked once), the requests cycling
    through the first 1, 8 or 32 adapters.

Throughput is requests/s and generated tokens/s over the whole load (first submit to last
token); the ratio is each case's throughput over the merged ceiling's, paired per round. The cases
run interleaved, one load each per round in a rotating order; the tables give medians. Timing covers what a server
does per request except HTTP: tokenizing is done before, detokenizing and stop checks inside.

    .venv/bin/python bench/bench_serve.py --threads 1    # the recorded CPU run (a few minutes on 2 cores)
    .venv/bin/python bench/bench_serve.py --quick        # smoke run: 1 warmup + 2 timed rounds
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field

import torch
from bench_step import cpu_model

MODEL_CONFIG = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                    num_key_value_heads=8, max_position_embeddings=256)
REQUESTS, PROMPT, NEW, BATCH = 64, 32, 32, 32
RANK, LIBRARY = 16, 32
DISTINCT = (1, 8, 32)


@dataclass
class Case:
    name: str
    engine: object
    adapters: list[str]
    times: list[float] = field(default_factory=list)


def model_config(hidden: int) -> dict:
    """MODEL_CONFIG at another width: Llama's MLP ratio (1376 / 512), 64-wide heads."""
    if hidden == MODEL_CONFIG["hidden_size"]:
        return MODEL_CONFIG
    return {**MODEL_CONFIG, "hidden_size": hidden, "intermediate_size": hidden * 1376 // 512,
            "num_attention_heads": hidden // 64, "num_key_value_heads": hidden // 64}


def build(device: torch.device, dtype: torch.dtype, rank: int = RANK, hidden: int = MODEL_CONFIG["hidden_size"]):
    """(tokenizer, merged plain model, model with the adapter library)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import lorakit as lk
    from lorakit.builtin import build_tokenizer

    tokenizer = build_tokenizer()

    def base() -> LlamaForCausalLM:
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **model_config(hidden))
        return LlamaForCausalLM(config).eval()

    library = base()
    gen = torch.Generator().manual_seed(1)
    for k in range(LIBRARY):
        lk.add_adapter(library, lk.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear"), name=f"a{k}",
                       activate=False)
        with torch.no_grad():
            for name, p in library.named_parameters():
                if f".lora_B.a{k}." in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    merged = base()
    lk.add_adapter(merged, lk.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear"), name="a0")
    with torch.no_grad():
        source = dict(library.named_parameters())
        for name, p in merged.named_parameters():
            if ".lora_" in name:
                p.copy_(source[name])                    # a0's factors: same names in both models
    merged = lk.unload(merged, merge=True)
    return tokenizer, merged.to(device=device, dtype=dtype), library.to(device=device, dtype=dtype)


def prompts(tokenizer) -> list[list[int]]:
    """REQUESTS prompts of PROMPT tokens each (bytes of a fixed pseudo-random text)."""
    gen = torch.Generator().manual_seed(2)
    first = tokenizer.convert_tokens_to_ids("a")
    return [torch.randint(first, first + 26, (PROMPT,), generator=gen).tolist() for _ in range(REQUESTS)]


def run_load(case: Case, load: list[list[int]]) -> float:
    """Submit every request at once; seconds until the last one finished."""
    from lorakit.serve import SamplingParams
    from lorakit.serve.engine import Failed, Finished

    params = SamplingParams(max_tokens=NEW, temperature=0)
    left, done, errors = [len(load)], threading.Event(), []

    def sink(event) -> None:
        if isinstance(event, Failed):
            errors.append(event.error)
        if isinstance(event, (Finished, Failed)):
            left[0] -= 1
            if left[0] == 0:
                done.set()

    t0 = time.perf_counter()
    for i, ids in enumerate(load):
        case.engine.submit(ids, params, case.adapters[i % len(case.adapters)], sink)
    if not done.wait(600):
        raise RuntimeError(f"{case.name}: the load did not finish in 600 s")
    if errors:
        raise RuntimeError(f"{case.name}: {errors[0]}")
    return time.perf_counter() - t0


def check_adapters_act(cases: list[Case], load: list[list[int]]) -> None:
    """The adapters change the text (so the adapter cases do adapter work)."""
    from lorakit.serve import SamplingParams

    params = SamplingParams(max_tokens=8, temperature=0)
    library = cases[1].engine
    base = library.generate(load[0], params, "__base__").text
    texts = [library.generate(load[0], params, f"a{k}").text for k in range(4)]
    assert all(t != base for t in texts), "the adapters do not change the output"


def table(cases: list[Case]) -> str:
    """Medians; "vs merged" is the median over rounds of the merged load's time over the case's in
    the same round (paired, so a burst of machine load hits both sides), "min" the ratio of minima."""
    merged = cases[0].times
    rows = ["| case | s per load (median) | min s | requests/s | generated tokens/s | vs merged | vs merged (min) |",
            "|---|---|---|---|---|---|---|"]
    for c in cases:
        med = statistics.median(c.times)
        paired = statistics.median(m / t for m, t in zip(merged, c.times, strict=True))
        ratio = "-" if c is cases[0] else f"**{paired:.2f}x**"
        ratio_min = "-" if c is cases[0] else f"{min(merged) / min(c.times):.2f}x"
        rows.append(f"| {c.name} | {med:.2f} | {min(c.times):.2f} | {REQUESTS / med:.1f} | {REQUESTS * NEW / med:,.0f} "
                    f"| {ratio} | {ratio_min} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=8, help="timed rounds (one load of every case each)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    ap.add_argument("--quick", action="store_true", help="smoke run: --warmup 1 --rounds 2")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rank", type=int, default=RANK, help="adapter rank (alpha = 2 x rank)")
    ap.add_argument("--hidden", type=int, default=MODEL_CONFIG["hidden_size"],
                    help="model width (the adapters' share of the bytes a step reads falls as 1/width)")
    args = ap.parse_args(argv)
    if args.quick:
        args.warmup, args.rounds = 1, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    from lorakit.serve import Engine, ServeConfig

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = os.getloadavg()
    tokenizer, merged, library = build(device, dtype, args.rank, args.hidden)
    config = ServeConfig(max_batch_size=BATCH, max_queue=REQUESTS)
    engines = [Engine(merged, tokenizer, config), Engine(library, tokenizer, config)]
    for engine in engines:
        engine.eos_ids = set()   # no early stop: every request generates all NEW tokens
        engine.start()
    cases = [Case("base with one adapter merged (ceiling)", engines[0], ["__base__"])]
    cases += [Case(f"{n} distinct adapter{'s' if n > 1 else ''} (library of {LIBRARY})", engines[1],
                   [f"a{k}" for k in range(n)]) for n in DISTINCT]
    load = prompts(tokenizer)
    check_adapters_act(cases, load)
    t_all = time.perf_counter()
    try:
        for rnd in range(args.warmup + args.rounds):
            t_round = time.perf_counter()
            for i in range(len(cases)):
                case = cases[(i + rnd) % len(cases)]      # rotate the order each round
                seconds = run_load(case, load)
                if rnd >= args.warmup:
                    case.times.append(seconds)
            log(f"round {rnd + 1}/{args.warmup + args.rounds} ({'warmup' if rnd < args.warmup else 'timed'}) "
                f"{time.perf_counter() - t_round:.1f}s")
    finally:
        for engine in engines:
            engine.stop(timeout=5)
    load_after = os.getloadavg()
    print(f"lorakit serving engine (in process), {REQUESTS} requests x ({PROMPT} prompt + {NEW} new tokens), "
          f"max_batch_size {BATCH}, adapters r={args.rank} all-linear, library of {LIBRARY}, "
          f"model hidden {args.hidden}, {MODEL_CONFIG['num_hidden_layers']} layers")
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else cpu_model()}), "
          f"{dtype}, torch threads {torch.get_num_threads()}, torch {torch.__version__}, Python "
          f"{platform.python_version()}")
    print(f"run {started:%Y-%m-%d %H:%M} UTC, {time.perf_counter() - t_all:.0f} s, load average "
          f"{load_before[0]:.2f} before, {load_after[0]:.2f} after; {args.warmup} warmup + {args.rounds} timed rounds")
    print()
    print(table(cases))
    return 0


if __name__ == "__main__":
    sys.exit(main())
