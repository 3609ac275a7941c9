"""What a run tells its user: the lines it prints, the evaluation columns of its metrics rows, the
summary at the end and the model card (`README.md`) of the run directory."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from .config import REFERENCE_FREE, TrainConfig
from .evaluate import EvalResult
from .trainee import Trainee


@dataclass
class RunSummary:
    """What `lorakit.train.loop.train` returns, and the model card and the final lines report."""
    out_dir: Path
    steps: int
    eval_before: EvalResult | None
    eval_after: EvalResult | None
    tokens_per_s: float
    peak_memory_bytes: int
    losses: list[float]


def printer(enabled: bool) -> Callable[[str], None]:
    """Print on the main process only, above the progress bar rather than through it."""
    def log(message: str) -> None:
        if enabled:
            tqdm.write(message, file=sys.stdout)
    return log


def eval_row(r: EvalResult) -> dict:
    return {"eval_loss": r.loss, "eval_ppl": r.ppl, "eval_exact_match": r.exact_match, **r.extra}


def eval_line(when: str, r: EvalResult) -> str:
    return f"{when}: eval {_loss(r)}{_exact_match(r)}{_extra(r)} on {r.n_examples} examples"


def _loss(r: EvalResult) -> str:
    """The loss and perplexity, or n/a with no reference completion to score (GRPO without answers)."""
    return "loss n/a" if r.loss is None else f"loss {r.loss:.4f} (perplexity {r.ppl:.2f})"


def _extra(r: EvalResult) -> str:
    """The objective's held-out metrics, n/a for one with nothing to average (e.g. no undesirable example)."""
    return "".join(f", {k.removeprefix('eval_').replace('_', ' ')} {'n/a' if v is None else f'{v:.4f}'}"
                   for k, v in r.extra.items())


def _exact_match(r: EvalResult) -> str:
    return f", exact match {r.exact_match:.1%}" if r.exact_match is not None else ""


def model_card(cfg: TrainConfig, trainee: Trainee, s: RunSummary) -> str:
    def ev(r: EvalResult | None) -> str:
        if r is None:
            return "n/a"
        return f"{_loss(r)}{_exact_match(r)}{_extra(r)}"

    return f"""# {trainee.title} for {cfg.model.name_or_path}

Trained with lorakit (`lorakit train`); the resolved configuration is in `config.yaml`.

| | |
|---|---|
| base model | `{cfg.model.name_or_path}` |
| trained | {trainee.describe()} |
| objective | {objective_line(cfg)} |
| data | `{cfg.data.train}` |
| steps | {s.steps} (micro batch {cfg.training.micro_batch_size} x accumulation {cfg.training.grad_accum}), lr {cfg.training.lr}, {cfg.training.schedule} schedule |
| eval before | {ev(s.eval_before)} |
| eval after | {ev(s.eval_after)} |
| throughput | {s.tokens_per_s:,.0f} tokens/s, peak memory {s.peak_memory_bytes / 2**20:,.0f} MiB |

Files: {trainee.files()}, tokenizer files, `metrics.csv`, `loss.png`, `checkpoints/`.

```python
{trainee.usage(cfg.output.dir)}
```
"""


def objective_line(cfg: TrainConfig) -> str:
    """What the run minimised, with the settings that define it."""
    objective, p, g = cfg.training.objective, cfg.preference, cfg.grpo
    adapter = cfg.training.reference_adapter
    reference = f"the adapter {adapter}" if adapter else "the base model"
    if objective == "sft":
        return "sft (next-token cross-entropy on the trained tokens)"
    if objective == "grpo":
        rewards = ", ".join(g.rewards) or "exact_answer"
        return (f"grpo (group size {g.group_size}, rewards {rewards}, beta {g.beta}, epsilon {g.epsilon}, "
                f"loss type {g.loss_type}, temperature {g.temperature}, reference: {reference})")
    settings = [f"beta {p.beta_for(objective)}"] if objective != "orpo" else [f"lambda {p.orpo_lambda}"]
    if objective == "simpo":
        settings.append(f"gamma {p.gamma}")
    if objective in REFERENCE_FREE:
        settings.append("no reference model")
    else:
        settings.append(f"reference: {reference}")
    return f"{objective} ({', '.join(settings)})"


def print_summary(s: RunSummary, log: Callable[[str], None]) -> None:
    if s.eval_before is not None:
        log(eval_line("before training", s.eval_before))
    if s.eval_after is not None:
        log(eval_line(f"after {s.steps} steps", s.eval_after))
    if s.eval_before is not None and s.eval_after is not None:
        for (prompt, ref, gen_before), (_, _, gen_after) in zip(s.eval_before.samples, s.eval_after.samples,
                                                                strict=False):
            log(f"sample: {prompt!r}\n  expected: {ref!r}\n  before:   {gen_before!r}\n  after:    {gen_after!r}")
    log(f"{s.tokens_per_s:,.0f} tokens/s, peak memory {s.peak_memory_bytes / 2**20:,.0f} MiB")
    log(f"run written to {s.out_dir}/")
