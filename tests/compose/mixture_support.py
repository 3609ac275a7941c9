"""What the mixture and fusion tests share (test_mixture.py, test_fusion.py): a tiny one-layer model
with three experts and their terms in closed form, and the task experts that `lorakit train` mixes.

The task experts are two single-task adapters (sentiment and parity of the built-in tasks):
`task_experts` trains them on the built-in model with the quickstart settings (what the tests of
learning need, and slow); `tiny_task_experts` makes random ones on the suite's tiny Llama in well
under a second (what the tests of the mechanics need: checkpoints, resume, files, errors).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from adapter_support import randomise
from tiny_models import tiny_model_dir
from torch import nn

import lorakit as lk
from lorakit.builtin import BUILTIN_MODEL, build_tokenizer, builtin_data_files
from lorakit.builtin.tasks import task_of
from lorakit.model_io import load_model, load_tokenizer
from lorakit.train.config import DataSection, load_config
from lorakit.train.data import build_datasets, collate
from lorakit.train.loop import train
from lorakit.train.loss import loss_sum


class Tiny(nn.Module):
    """One adapted linear layer, d_in 6 -> d_out 5 (and a second, `proj2`, for per-layer averaging)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(6, 5)
        self.proj2 = nn.Linear(5, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj2(self.proj(x))


def tiny_with_experts(configs: dict[str, lk.LoraConfig] | None = None) -> Tiny:
    model = Tiny()
    configs = configs or {
        "a": lk.LoraConfig(r=2, lora_alpha=4, target_modules=["proj"]),
        "b": lk.LoraConfig(r=3, lora_alpha=2, target_modules=["proj"], lora_bias=True),
        "c": lk.LoraConfig(r=1, lora_alpha=1, use_rslora=True, target_modules=["proj"], lora_dropout=0.1),
    }
    for seed, (name, cfg) in enumerate(configs.items()):
        lk.add_adapter(model, cfg, name=name)
        randomise(model, name, seed)
    return model.eval()


def expert_terms(model: Tiny, x: torch.Tensor, names: list[str]) -> torch.Tensor:
    """(..., E, d_out): s_e B_e A_e x + s_e b_e for each expert of `model.proj`, one by one."""
    layer = model.proj
    terms = []
    for e in names:
        t = layer.scaling[e] * (x @ layer.lora_A[e].weight.t() @ layer.lora_B[e].weight.t())
        if layer.lora_bias[e]:
            t = t + layer.scaling[e] * layer.lora_B[e].bias
        terms.append(t)
    return torch.stack(terms, dim=-2)


X = torch.randn(2, 4, 6, generator=torch.Generator().manual_seed(3))
NAMES = ["a", "b", "c"]


# ---- the task experts ---------------------------------------------------------------------------

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TASKS = ("sentiment", "parity")


def write_task_data(root: Path, n_eval: int) -> None:
    """<task>_train.jsonl per task, mixed_train.jsonl (both tasks) and mixed_eval.jsonl (n_eval
    held-out prompts per task) from the built-in dataset."""
    files = builtin_data_files()
    rows = {split: [json.loads(line) for line in open(files[split])] for split in ("train", "eval")}

    def task(row):
        return task_of(row["messages"][0]["content"])

    def write(name, items):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in items))

    for t in TASKS:
        write(f"{t}_train.jsonl", [r for r in rows["train"] if task(r) == t])
    write("mixed_train.jsonl", [r for r in rows["train"] if task(r) in TASKS])
    write("mixed_eval.jsonl", [r for t in TASKS for r in [r for r in rows["eval"] if task(r) == t][:n_eval]])


def task_experts(root: Path, steps: int, n_eval: int) -> Path:
    """Train the two experts into root/<task> (once: a later call finds them)."""
    if (root / "done").is_file():
        return root
    root.mkdir(parents=True, exist_ok=True)
    write_task_data(root, n_eval)
    for t in TASKS:
        train(load_config(str(EXAMPLES / "quickstart.yaml"), [
            f"data.train={root / f'{t}_train.jsonl'}", f"training.max_steps={steps}", "training.warmup_steps=5",
            "training.eval_every=0", "lora.r=8", "lora.lora_alpha=16", "output.tensorboard=false",
            f"output.dir={root / t}"]))
    (root / "done").touch()
    return root


def base_model(root: Path | None = None) -> nn.Module:
    """The built-in model, or the tiny one the experts in `root` were made on (tiny_task_experts)."""
    tiny = root is not None and (root / "model").is_dir()
    return load_model(str(root / "model") if tiny else BUILTIN_MODEL, "fp32", "cpu")


def mixed_eval(root: Path):
    tokenizer = load_tokenizer(BUILTIN_MODEL)
    examples, _, _ = build_datasets(DataSection(train=str(root / "mixed_eval.jsonl"), max_seq_len=128), tokenizer, 0)
    return tokenizer, examples


def eval_loss(model: nn.Module, root: Path) -> float:
    """Mean cross-entropy per trained token on the mixed held-out set."""
    tokenizer, examples = mixed_eval(root)
    model.eval()
    with torch.no_grad():
        total, count = loss_sum(model, collate(examples, tokenizer.pad_token_id))
    return total.item() / count.item()


def single_expert_losses(root: Path) -> dict[str, float]:
    return {t: eval_loss(lk.load_adapter(base_model(), root / t), root) for t in TASKS}


def mixture_args(root: Path, out: Path, steps: int, *extra: str) -> list[str]:
    """`lorakit train` arguments of examples/mixture.yaml over the experts in `root` (on their tiny
    base model, root/model, when they were made by tiny_task_experts)."""
    tiny = [f"model.name_or_path={root / 'model'}"] if (root / "model").is_dir() else []
    return [str(EXAMPLES / "mixture.yaml"), *tiny, f"mixture.experts.sentiment={root / 'sentiment'}",
            f"mixture.experts.parity={root / 'parity'}", f"data.train={root / 'mixed_train.jsonl'}",
            f"training.max_steps={steps}", "training.warmup_steps=2", "output.tensorboard=false", f"output.dir={out}",
            *extra]


def tiny_task_experts(root: Path) -> Path:
    """Random sentiment and parity experts (r=8, all-linear, as `task_experts` trains them) on the
    tiny Llama saved to root/model, next to the task data; `mixture_args` trains on that model."""
    if (root / "done").is_file():
        return root
    root.mkdir(parents=True, exist_ok=True)
    write_task_data(root, n_eval=4)
    model = tiny_model_dir(root / "model", build_tokenizer(), positions=256)
    for seed, t in enumerate(TASKS):
        lk.add_adapter(model, lk.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"), name=t)
        randomise(model, t, seed, scale=0.1)   # B != 0: each expert changes the output
        lk.save_adapter(model, root / t, name=t)
        lk.delete_adapter(model, t)
    (root / "done").touch()
    return root


def split_args(args: list[str]) -> tuple[str, list[str]]:
    """`lorakit train` arguments as load_config takes them: (config path, overrides)."""
    return args[0], args[1:]
