"""Composition in one run, offline, on the built-in tiny model and tasks: a library of two task
adapters (sentiment, parity), then every way lorakit uses them together.

1. train the two experts, each on its own task (`lorakit train`, the quickstart settings);
2. combine them into one adapter (`cat`: exactly the sum of their updates; `ties`);
3. one batch, a different adapter per row (`per_sample_adapters`), equal to each row run alone;
4. a semantic router that picks the adapter from the prompt, fitted on a few labelled prompts;
5. a mixture of the two experts, its gates trained with `lorakit train` on the mixed tasks
   (`examples/mixture.yaml`), and AdapterFusion over them, against each expert alone.

Run: `python examples/composition_demo.py [--steps N] [--out DIR]` (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

import lorakit as lk
from lorakit.builtin import BUILTIN_MODEL, builtin_data_files
from lorakit.builtin.tasks import task_of
from lorakit.model_io import load_model, load_tokenizer
from lorakit.train.config import DataSection, load_config
from lorakit.train.data import build_datasets, collate
from lorakit.train.loop import train
from lorakit.train.loss import loss_sum

EXAMPLES = Path(__file__).resolve().parent
TASKS = ("sentiment", "parity")


def write_data(root: Path) -> dict[str, list[dict]]:
    """Per-task train files, the mixed train file, and held-out prompts per task."""
    files = builtin_data_files()
    rows = {s: [json.loads(line) for line in open(files[s])] for s in ("train", "eval")}
    held_out = {t: [r for r in rows["eval"] if task_of(r["messages"][0]["content"]) == t][:20] for t in TASKS}
    for t in TASKS:
        write_jsonl(root / f"{t}.jsonl", [r for r in rows["train"] if task_of(r["messages"][0]["content"]) == t])
    write_jsonl(root / "mixed.jsonl", [r for r in rows["train"] if task_of(r["messages"][0]["content"]) in TASKS])
    write_jsonl(root / "mixed_eval.jsonl", [r for t in TASKS for r in held_out[t]])
    return held_out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def run(config: str, overrides: list[str]):
    return train(load_config(config, ["output.tensorboard=false", "training.eval_every=0", *overrides]))


def base():
    return load_model(BUILTIN_MODEL, "fp32", "cpu").eval()


def mixed_loss(model, tokenizer, root: Path) -> float:
    """Mean cross-entropy per answer token on the held-out prompts of both tasks."""
    examples, _, _ = build_datasets(DataSection(train=str(root / "mixed_eval.jsonl"), max_seq_len=128), tokenizer, 0)
    model.eval()
    with torch.no_grad():
        total, count = loss_sum(model, collate(examples, tokenizer.pad_token_id))
    return total.item() / count.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="training steps per expert")
    parser.add_argument("--out", default="runs/composition_demo")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    hf_logging.disable_progress_bar()
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    held_out = write_data(root)
    tokenizer = load_tokenizer(BUILTIN_MODEL)

    # 1. the library: one expert per task
    for t in TASKS:
        run(str(EXAMPLES / "quickstart.yaml"), [f"data.train={root / f'{t}.jsonl'}", f"training.max_steps={args.steps}",
                                                "training.warmup_steps=5", "lora.r=8", "lora.lora_alpha=16",
                                                f"output.dir={root / t}"])
    model = base()
    for t in TASKS:
        lk.load_adapter(model, root / t, name=t, activate=False)
    ids = tokenizer("Review: a warm and funny film", return_tensors="pt").input_ids

    # 2. combine: `cat` is exactly the sum of the two updates
    lk.combine_adapters(model, list(TASKS), [1.0, 1.0], "cat", "both")
    lk.set_active_adapters(model, ["both"])
    with torch.no_grad():
        combined = model(ids).logits
        lk.set_active_adapters(model, list(TASKS))      # active together: their terms are summed
        summed = model(ids).logits
    print(f"combine cat == sum of the experts: max |diff| {(combined - summed).abs().max().item():.1e}")
    lk.combine_adapters(model, list(TASKS), [0.5, 0.5], "ties", "ties", density=0.5)
    lk.save_adapter(model, root / "ties", "ties")
    print(f"combine ties (density 0.5) saved to {root / 'ties'}/ in PEFT format")

    # 3. one batch, a different adapter per row
    prompts = [held_out["sentiment"][0]["messages"][:1], held_out["parity"][0]["messages"][:1]] * 2
    names = ["sentiment", "parity", "__base__", "sentiment"]
    texts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in prompts]
    tokenizer.padding_side = "left"
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    start = batch["input_ids"].shape[1]

    def answers(ids: torch.Tensor) -> list[str]:
        return [tokenizer.decode(row[start:], skip_special_tokens=True) for row in ids]

    with lk.per_sample_adapters(model, names):
        together = answers(model.generate(**batch, max_new_tokens=6, do_sample=False))
    alone = []
    for i, name in enumerate(names):
        one = {k: v[i:i + 1] for k, v in batch.items()}
        if name == "__base__":
            with lk.disable_adapters(model):
                alone += answers(model.generate(**one, max_new_tokens=6, do_sample=False))
        else:
            lk.set_active_adapters(model, [name])
            alone += answers(model.generate(**one, max_new_tokens=6, do_sample=False))
    print(f"per-sample adapters, one batch: {list(zip(names, together, strict=True))}")
    print(f"per-sample adapters: every row equals that row run alone: {together == alone}")

    # 4. a router over the library, fitted on a few labelled prompts
    router = lk.Router(model, tokenizer)
    for t in TASKS:
        router.register(t, examples=[r["messages"][0]["content"] for r in held_out[t][:4]])
    tests = [(r["messages"][0]["content"], t) for t in TASKS for r in held_out[t][4:]]
    chosen = router.choose([p for p, _ in tests])
    accuracy = sum(c == t for c, (_, t) in zip(chosen, tests, strict=True)) / len(tests)
    print(f"router: {accuracy:.0%} of {len(tests)} held-out prompts routed to their task's adapter")

    # 5. a mixture of the experts (gates trained with lorakit train) and AdapterFusion
    experts = [f"mixture.experts.{t}={root / t}" for t in TASKS]
    common = [f"data.train={root / 'mixed.jsonl'}", "training.warmup_steps=2", *experts]
    run(str(EXAMPLES / "mixture.yaml"), [*common, "training.max_steps=20", f"output.dir={root / 'mixture'}"])
    run(str(EXAMPLES / "mixture.yaml"), [*common, "mixture.kind=fusion", "training.lr=1e-3",
                                         "training.max_steps=12", f"output.dir={root / 'fusion'}"])
    losses = {t: mixed_loss(lk.load_adapter(base(), root / t), tokenizer, root) for t in TASKS}
    for kind in ("mixture", "fusion"):
        losses[kind] = mixed_loss(lk.load_mixture(base(), root / kind), tokenizer, root)
    print("held-out loss on both tasks: " + ", ".join(f"{k} {v:.3f}" for k, v in losses.items()))


if __name__ == "__main__":
    main()
