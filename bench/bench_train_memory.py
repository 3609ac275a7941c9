"""Peak memory of a LoRA training step: lorakit with activation checkpointing and the chunked loss
against PEFT + transformers without them, side by side in one process.

On bench_step's model (a Llama from a config: hidden 512, intermediate 1376, 6 layers, 8 heads,
vocab 8000, fp32, CPU) with a batch of 4 x 256 random token ids (labels = ids, so every position
but the last is trained) and r=16, alpha=32 adapters on every linear layer but the head:

  - PEFT + transformers: `peft.get_peft_model`, the loss from `model(input_ids, labels=...)`
    (transformers' own full-logits cross-entropy), with and without transformers' checkpointing;
  - lorakit: the step `lorakit train` runs, `loss_sum(model, batch, chunked=...)` divided by the
    trained tokens, with `gradient_checkpointing_enable(use_reentrant=False)` as the loop calls
    it, each of checkpointing and the chunked loss on and off.

Each case gets AdamW over its adapter and one untimed step first (so the optimizer state exists),
then one step (forward, backward, optimizer step, zero_grad) is measured with
`lorakit.train.memory.PeakMemory`: the most bytes torch tensors held at once, counting from the
start the model's weights, the adapters, their gradients, the optimizer state and the batch
("held"), the same count `lorakit train` reports. "step" is the peak minus what was held: the
activations, the logits and the loss, transient buffers, gradients.

Time: what the chunked loss costs is timed on the loss head alone (final hidden states -> summed
cross-entropy, forward and backward, plain vs chunked, interleaved rounds, median), because whole
steps of the cases are too noisy to compare on a shared 2-core machine.

Every case's step-0 loss must equal PEFT's (B = 0 at init, so all equal the base model's loss);
the script asserts it.

    .venv/bin/python bench/bench_train_memory.py               # ~2-3 minutes on 2 cores
    .venv/bin/python bench/bench_train_memory.py --breakdown   # + the tensors alive at the best case's peak
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass

import torch
from bench_step import ALPHA, BATCH, MB, MODEL_CONFIG, RANK, SEQ, build_base, cpu_model, enable_checkpointing
from torch import nn

ROUNDS = 10    # interleaved rounds of the loss-head timing
TARGET = 0.4   # issue #5: lorakit with checkpointing + chunked loss <= 0.4x PEFT + transformers without


@dataclass
class Case:
    name: str
    kind: str            # "peft" or "lorakit"
    gc: bool
    chunked: bool
    loss0: float = float("nan")
    held: int = 0
    peak: int = 0


CASES = [
    Case("PEFT + transformers", "peft", gc=False, chunked=False),
    Case("PEFT + transformers, checkpointing", "peft", gc=True, chunked=False),
    Case("lorakit", "lorakit", gc=False, chunked=False),
    Case("lorakit, chunked loss", "lorakit", gc=False, chunked=True),
    Case("lorakit, checkpointing", "lorakit", gc=True, chunked=False),
    Case("lorakit, checkpointing + chunked loss", "lorakit", gc=True, chunked=True),
]


def build(case: Case) -> tuple[nn.Module, nn.Module]:
    """(the module the step calls, the transformers model inside it)."""
    model = build_base()
    if case.kind == "peft":
        import peft

        module = peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear"))
        hf = module.get_base_model()
        if case.gc:
            enable_checkpointing(hf)
    else:
        import lorakit as lk

        lk.add_adapter(model, lk.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear"),
                       adapter_dtype=torch.float32)
        module = hf = model
        if case.gc:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    module.train()
    return module, hf


def step(case: Case, module: nn.Module, batch: dict[str, torch.Tensor], opt: torch.optim.Optimizer) -> float:
    if case.kind == "peft":
        loss = module(**batch).loss
        loss.backward()
    else:
        from lorakit.train.loss import loss_sum

        s, n = loss_sum(module, batch, chunked=case.chunked)
        loss = s / n
        loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def measure(case: Case, batch: dict[str, torch.Tensor], at_peak: bool = False) -> None:
    """Fill in the case's loss0, held and peak; with `at_peak`, print the live tensors at the peak."""
    from lorakit.train.memory import PeakMemory, _held_tensors

    module, _ = build(case)
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-3)
    torch.manual_seed(0)
    case.loss0 = step(case, module, batch, opt)            # creates the optimizer state
    holders = (module, opt, *batch.values())
    case.held = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                     for t in _held_tensors(holders)}.values())
    if at_peak:
        case.peak = print_live_at_peak(lambda: step(case, module, batch, opt), holders)
        return
    meter = PeakMemory("cpu")
    with meter.region(*holders):
        step(case, module, batch, opt)
    case.peak = meter.peak_bytes


def print_live_at_peak(fn, holders) -> int:
    """Run fn under PeakMemory's CPU watch, remembering the live storages (bytes, shape, dtype) each
    time the count sets a new peak; print the last such set, grouped by shape. Returns the peak."""
    from lorakit.train.memory import _held_tensors, _Watch

    class Watch(_Watch):
        def __init__(self) -> None:
            super().__init__()
            self.shapes: dict[int, tuple] = {}
            self.at_peak: list[tuple[int, tuple]] = []

        def add(self, tensor: torch.Tensor) -> None:
            key = id(tensor.untyped_storage())
            if key not in self._bytes:
                self.shapes[key] = (tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."))
            before = self.peak
            super().add(tensor)
            if self.peak > before:
                self.at_peak = [(size, self.shapes[k]) for k, size in self._bytes.items()]

    watch = Watch()
    for tensor in _held_tensors(holders):
        watch.add(tensor)
    with watch:
        fn()
    by_shape: dict[tuple, list[int]] = {}
    for size, shape in watch.at_peak:
        by_shape.setdefault(shape, []).append(size)
    print(f"live at the peak ({watch.peak / MB:.1f} MB), by shape (first storage's shape):")
    for shape, sizes in sorted(by_shape.items(), key=lambda kv: -sum(kv[1])):
        if sum(sizes) >= MB // 10:
            print(f"  {sum(sizes) / MB:6.2f} MB  {len(sizes):3d} x {shape[0]} {shape[1]}")
    watch.close()
    return watch.peak


def table(cases: list[Case]) -> str:
    ref = cases[0]
    rows = ["| case | peak MB | vs PEFT | held MB | step MB (peak - held) | step vs PEFT |",
            "|---|---|---|---|---|---|"]
    for c in cases:
        rows.append(f"| {c.name} | {c.peak / MB:.1f} | {c.peak / ref.peak:.2f}x | {c.held / MB:.1f} "
                    f"| {(c.peak - c.held) / MB:.1f} | {(c.peak - c.held) / (ref.peak - ref.held):.2f}x |")
    return "\n".join(rows)


def time_loss_head(rounds: int) -> tuple[float, float, int]:
    """Median ms of the plain and the chunked loss head (forward + backward) over interleaved rounds,
    and the chunk rows used: hidden (N, d) from a seeded normal, the bench model's head weight."""
    import torch.nn.functional as F

    from lorakit.ops.chunked_ce import chunked_cross_entropy, default_chunk_rows

    n, d, v = BATCH * SEQ, MODEL_CONFIG["hidden_size"], MODEL_CONFIG["vocab_size"]
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(n, d, generator=g).requires_grad_()
    weight = build_base().get_output_embeddings().weight.detach()
    targets = torch.randint(0, v, (n,), generator=g)
    paths = {"plain": lambda: F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum"),
             "chunked": lambda: chunked_cross_entropy(hidden, weight, targets)}
    times: dict[str, list[float]] = {k: [] for k in paths}
    for r in range(rounds + 1):
        for name in sorted(paths, reverse=r % 2 == 1):
            t0 = time.perf_counter()
            paths[name]().backward()
            if r:   # round 0 warms up
                times[name].append(time.perf_counter() - t0)
            hidden.grad = None
    return (statistics.median(times["plain"]) * 1e3, statistics.median(times["chunked"]) * 1e3,
            default_chunk_rows(n, v, d))


def breakdown(module: nn.Module) -> str:
    frozen = sum(p.numel() * p.element_size() for p in module.parameters() if not p.requires_grad)
    trained = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
    v, d, n = MODEL_CONFIG["vocab_size"], MODEL_CONFIG["hidden_size"], BATCH * SEQ
    return (f"held: frozen weights {frozen / MB:.1f} MB, adapters {trained / MB:.1f} MB (+ their gradients and "
            f"AdamW's two moments, 3 x that); one copy of the fp32 logits: {n * v * 4 / MB:.1f} MB; "
            f"one layer input (N x hidden fp32): {n * d * 4 / MB:.1f} MB")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--breakdown", action="store_true",
                    help="also list the tensors alive at the peak of lorakit with checkpointing + chunked loss")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import peft
    import transformers

    import lorakit

    warnings.filterwarnings("ignore", category=FutureWarning)
    transformers.logging.set_verbosity_error()
    t_start = time.perf_counter()
    print(f"# lorakit training-memory benchmark, {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}")
    print(f"# {cpu_model()}, {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"transformers {transformers.__version__}, peft {peft.__version__}, lorakit {lorakit.__version__}, "
          f"Python {platform.python_version()}")
    print(f"# Llama {MODEL_CONFIG['num_hidden_layers']} layers, hidden {MODEL_CONFIG['hidden_size']}, "
          f"intermediate {MODEL_CONFIG['intermediate_size']}, vocab {MODEL_CONFIG['vocab_size']}, fp32; "
          f"batch {BATCH} x {SEQ}; r={RANK} alpha={ALPHA} all-linear; AdamW")

    ids = torch.randint(0, MODEL_CONFIG["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    for case in CASES:
        print(f"  {case.name} ...", file=sys.stderr, flush=True)
        measure(case, batch)
    for case in CASES:
        assert abs(case.loss0 - CASES[0].loss0) <= 1e-5 * abs(CASES[0].loss0), \
            f"step-0 loss of {case.name} {case.loss0!r} != PEFT's {CASES[0].loss0!r}"

    print(f"\nstep-0 loss (every case; B = 0 at init): {CASES[0].loss0:.6f}, equal across cases: checked\n")
    print(table(CASES))
    best = CASES[-1]
    ratio = best.peak / CASES[0].peak
    print(f"\n{best.name}: {ratio:.3f}x the peak of PEFT + transformers without checkpointing "
          f"(target <= {TARGET}x: {'met' if ratio <= TARGET else 'NOT met'})")
    print(breakdown(build(CASES[2])[0]))
    if args.breakdown:
        measure(Case(best.name, best.kind, best.gc, best.chunked), batch, at_peak=True)
    plain_ms, chunked_ms, rows = time_loss_head(ROUNDS)
    print(f"loss head alone (forward + backward, {BATCH * SEQ} rows, median of {ROUNDS} interleaved rounds): plain "
          f"{plain_ms:.0f} ms, chunked ({rows} rows per chunk) {chunked_ms:.0f} ms ({chunked_ms / plain_ms:.2f}x)")
    print(f"total runtime {time.perf_counter() - t_start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
