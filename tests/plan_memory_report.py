"""The `lorakit plan` memory estimate against the peak `lorakit train` reaches, on CPU, for tiny
configs: the figures in BENCHMARKS.md, and the helpers tests/test_plan.py checks them with.

Each case trains 2 steps of 8 rows x 64 tokens with r=8 adapters; the measured peak is the one
the loop reports (`RunSummary.peak_memory_bytes`, also in the model card): every tensor byte held
during a training step (`lorakit.train.memory.PeakMemory`): weights, adapter, AdamW state,
activations and the loss, which is what the estimate covers. The data is text longer than max_seq_len, so every row fills it; the
"padded" data has one short row, so batches are padded and attention gets a mask.

    .venv/bin/python tests/plan_memory_report.py          # every case, as a markdown table
"""

from __future__ import annotations

import os

# a CPU report: the Triton kernel cases run in Triton's interpreter, which must be on before
# anything imports triton (transformers does)
os.environ.setdefault("TRITON_INTERPRET", "1")

import contextlib  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

from tiny_models import tiny_model  # noqa: E402

from lorakit.builtin import build_tokenizer  # noqa: E402
from lorakit.plan import make_plan  # noqa: E402
from lorakit.plan.estimate import Estimate  # noqa: E402
from lorakit.train.config import load_config  # noqa: E402
from lorakit.train.loop import train  # noqa: E402

CASES = {   # name: (model, data, overrides)
    "llama padded": ("llama", "padded", []),
    "llama full rows": ("llama", "full_rows", []),
    "llama checkpointing": ("llama", "padded", ["training.gradient_checkpointing=true"]),
    "gpt2 padded": ("gpt2", "padded", []),
    "llama bf16 (weights and autocast)": ("llama", "padded", ["model.dtype=bf16", "training.bf16=true"]),
    "llama eager attention": ("llama", "padded", ["model.attn_implementation=eager"]),
    "llama q_proj, v_proj only": ("llama", "padded", ["lora.target_modules=[q_proj,v_proj]"]),
    "llama lora_dropout 0.1": ("llama", "padded", ["lora.lora_dropout=0.1"]),
    "gpt2 dropout 0.1 (math attention)": ("gpt2_dropout", "padded", []),
    "gpt2 checkpointing": ("gpt2", "padded", ["training.gradient_checkpointing=true"]),
    "llama vocab 8000 (chunked loss)": ("llama_vocab", "padded", []),
    "llama vocab 8000, full logits": ("llama_vocab", "padded", ["training.chunked_loss=false"]),
    "llama full logits": ("llama", "padded", ["training.chunked_loss=false"]),
    # lorakit's Triton kernels, in Triton's interpreter on CPU (TRITON_INTERPRET=1, set by main):
    # they keep the same tensors there as on a GPU
    "llama Triton kernels": ("llama", "padded", ["training.kernels=triton"]),
    "llama bf16, Triton kernels": ("llama", "padded", ["model.dtype=bf16", "training.bf16=true",
                                                       "training.kernels=triton"]),
}


def write_inputs(root: Path) -> Path:
    """Tiny Llama (GQA: 4 heads, 2 KV heads) and GPT-2 directories with the built-in byte tokenizer,
    and the two data files."""
    tokenizer = build_tokenizer()
    # width 64, 256 positions, the tokenizer's ids; one seed for the four, drawn in this order
    common = dict(tokenizer=tokenizer, width=64, positions=256, training=True)
    models = {
        "llama": tiny_model(seed=0, tie=False, **common),
        "llama_vocab": tiny_model(seed=None, tie=False, vocab=8000, **common),   # the loss head dominates
        "gpt2": tiny_model("gpt2", seed=None, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common),
        "gpt2_dropout": tiny_model("gpt2", seed=None, **common),   # GPT-2's own 0.1 dropouts
    }
    for name, model in models.items():
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    for name, short in (("full_rows", 0), ("padded", 1)):
        with open(root / f"{name}.jsonl", "w") as f:
            for i in range(8):
                f.write(json.dumps({"text": f"the quick brown fox {i} " * (1 if i < short else 20)}) + "\n")
    return root


@contextlib.contextmanager
def _collected_after_each_launch():
    """Triton's interpreter holds each launch's argument storages in a reference cycle (a recursive
    closure) until the garbage collector runs, which would count them at random later peaks; a GPU
    has no interpreter. So collect after every launch, to count what the kernels themselves keep."""
    from triton.runtime.interpreter import GridExecutor

    call = GridExecutor.__call__

    def collected(self, *args, **kwargs):
        try:
            return call(self, *args, **kwargs)
        finally:
            gc.collect(0)    # the cycle is new: the youngest generation holds it
    GridExecutor.__call__ = collected
    try:
        yield
    finally:
        GridExecutor.__call__ = call


def measure(root: Path, case: str, out_dir: Path) -> tuple[int, Estimate]:
    """(measured peak bytes of the training run, the plan's LoRA estimate for it)."""
    model, data, extra = CASES[case]
    cfg = load_config(None, [f"model.name_or_path={root / model}", f"data.train={root / data}.jsonl",
                             "data.max_seq_len=64", "training.micro_batch_size=8", "training.max_steps=2",
                             "lora.r=8", "lora.lora_alpha=16", "model.device=cpu", "output.tensorboard=false",
                             f"output.dir={out_dir}", *extra])
    with _collected_after_each_launch() if cfg.training.kernels == "triton" else contextlib.nullcontext():
        summary = train(cfg)
    plan = make_plan(cfg, device="cpu", padded=data == "padded")
    estimate = next(e for e in plan.estimates
                    if e.method == "lora" and e.checkpointing == cfg.training.gradient_checkpointing)
    return summary.peak_memory_bytes, estimate


def main() -> int:
    warnings.filterwarnings("ignore")
    rows = ["| case | measured peak (bytes) | estimate (bytes) | estimate / measured |", "|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        root = write_inputs(Path(tmp))
        for i, case in enumerate(CASES):
            measured, estimate = measure(root, case, Path(tmp) / f"run{i}")
            rows.append(f"| {case} | {measured:,} | {estimate.total:,} | {estimate.total / measured:.3f} |")
            print(rows[-1], file=sys.stderr, flush=True)
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
