"""Starting hyperparameters, each with its reason, and warnings for risky choices.

The rules of thumb (what practitioners and the LoRA / QLoRA papers report, not laws):
  - rank by task: style or format 8, domain adaptation 16, new knowledge or reasoning 64 or more;
  - lora_alpha = 2r to start; alpha / r multiplies the update exactly as the learning rate does,
    so changing alpha is changing the learning rate;
  - dropout by dataset size: 0 above ~100k examples, 0.05-0.1 below 10k, 0.1-0.3 below 1k;
  - every linear layer as a target ("all-linear"): attention-only LoRA falls short of full
    fine-tuning where all-linear matches it (QLoRA paper, Dettmers et al. 2023, section 4);
  - one epoch unless the data is small (more passes over a large set mostly memorise).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..builtin.names import BUILTIN_DATA
from ..model_io import load_tokenizer
from ..train.config import TrainConfig
from ..train.data import build_datasets, load_records
from ..train.preference_data import build_objective_data
from .tasks import RANK_RULE, TASK_RANKS

_DROPOUT_RULE = "0 above ~100k examples, 0.05-0.1 below 10k, 0.1-0.3 below 1k"
SUPPORT = 10
"""Trainable parameters per trained token above which the rank outruns the data: LoRA's usual
setups run at a few parameters per token (r=16 all-linear on an 8B model over Alpaca's ~5M
trained tokens is 8), so the warning is for an order of magnitude beyond that."""


@dataclass
class DataSummary:
    examples: int | None
    """Training examples (None: unknown)."""
    trained_tokens: int | None
    """Tokens the loss is taken over, one epoch (None: not tokenized)."""
    source: str
    """Where the figures come from, or why they are unknown."""


@dataclass
class Suggestion:
    key: str
    value: Any
    """The suggested value; None when it depends on something unknown (see the reason)."""
    current: Any
    reason: str


def count_data(cfg: TrainConfig, examples: int | None, tokenizer_dir: Path | None) -> DataSummary:
    """The training examples (and trained tokens, with a tokenizer) as `lorakit train` would use
    them, from local files only; `examples` (--examples) wins over counting."""
    if examples is not None:
        return DataSummary(examples, None, "given with --examples")
    specs = [cfg.data.train] if isinstance(cfg.data.train, str) else list(cfg.data.train)
    remote = [s for s in specs if str(s).startswith("hf:")]
    if remote:
        return DataSummary(None, None, f"{remote[0]} is a hub dataset (not downloaded to plan); pass --examples N")
    missing = [s for s in specs if s != BUILTIN_DATA and not Path(s).exists()]
    if missing:
        return DataSummary(None, None, f"{missing[0]} is not here; pass --examples N")
    objective = cfg.training.objective
    if tokenizer_dir is not None:
        tokenizer = load_tokenizer(str(tokenizer_dir))
        if objective == "sft":
            report = build_datasets(cfg.data, tokenizer, cfg.training.seed)[2]
        else:   # pairs, completions or prompts; the trained tokens are the completions' (grpo: sampled, unknown)
            report = build_objective_data(cfg.data, tokenizer, cfg.training.seed, objective).report
        return DataSummary(report.used_train, None if objective == "grpo" else report.trained_tokens,
                           f"{', '.join(map(str, specs))}, tokenized with {tokenizer_dir}")
    n = len(load_records(cfg.data.train, cfg.data.columns))
    if cfg.data.eval is None and specs != [BUILTIN_DATA] and cfg.data.eval_fraction > 0:   # as build_datasets splits
        n -= max(1, round(cfg.data.eval_fraction * n))
    if cfg.data.max_samples is not None:
        n = min(n, cfg.data.max_samples)
    return DataSummary(n, None, f"{', '.join(map(str, specs))} (records; no tokenizer next to the model to count tokens)")


def suggestions(cfg: TrainConfig, data: DataSummary, task: str | None) -> list[Suggestion]:
    lora, n = cfg.lora, data.examples
    rank = TASK_RANKS[task] if task else None
    out = [Suggestion("lora.r", rank, lora.r, f"{task} task; by task: {RANK_RULE}" if task else
                      f"by task: {RANK_RULE} (say which with --task)")]
    r = rank or lora.r
    alpha_reason = ("2r is the starting point; alpha/r scales the update exactly as the learning rate does, "
                    "so changing alpha is changing training.lr")
    if lora.use_rslora:
        alpha_reason += f" (with use_rslora the scale is alpha/sqrt(r): {2 * r / math.sqrt(r):.3g} at 2r)"
    out.append(Suggestion("lora.lora_alpha", 2 * r, lora.lora_alpha, alpha_reason))
    if n is None:
        out.append(Suggestion("lora.lora_dropout", None, lora.lora_dropout,
                              f"by dataset size: {_DROPOUT_RULE}; the size is unknown ({data.source})"))
    else:
        value, why = ((0.1, "fewer than 1k examples: 0.1-0.3 against overfitting") if n < 1_000 else
                      (0.05, "fewer than 10k examples: 0.05-0.1") if n < 10_000 else
                      (0.05, "10k-100k examples: light regularisation, 0-0.05") if n < 100_000 else
                      (0.0, "above ~100k examples the data regularises; dropout only slows learning"))
        out.append(Suggestion("lora.lora_dropout", value, lora.lora_dropout, f"{n:,} examples, {why}"))
    out.append(Suggestion("lora.target_modules", "all-linear", lora.target_modules,
                          "every linear layer of attention and MLP: matches full fine-tuning where attention-only "
                          "LoRA falls short (QLoRA paper, section 4)"))
    if n is None:
        out.append(Suggestion("training.epochs", None, cfg.training.epochs,
                              f"one epoch unless the data is small; the size is unknown ({data.source})"))
    else:
        value, why = ((3, "fewer than 1k examples: a few passes, watching the eval loss") if n < 1_000 else
                      (2, "fewer than 10k examples: a second pass helps") if n < 10_000 else
                      (1, "one pass: more epochs over this much data mostly memorise"))
        out.append(Suggestion("training.epochs", value, cfg.training.epochs, f"{n:,} examples, {why}"))
    return out


def risk_warnings(cfg: TrainConfig, data: DataSummary, trainable: int, embedding_params: int,
                  new_tokens: int) -> list[str]:
    """Warnings for choices that often go wrong: rank beyond what the data supports, alpha far from
    r..2r, embeddings trained without new tokens (and new tokens without trained embeddings)."""
    lora, out = cfg.lora, []
    tokens, exact = data.trained_tokens, True
    if tokens is None and data.examples is not None:
        tokens, exact = data.examples * cfg.data.max_seq_len, False   # every example at full length: a ceiling
    if tokens is not None and trainable > SUPPORT * tokens:
        fit = lora.r * SUPPORT * tokens / trainable
        advice = (f"lower lora.r to {2 ** int(math.log2(fit))} or less, or target fewer modules" if fit >= 1
                  else "target fewer modules or get more data")
        out.append(f"lora.r={lora.r}: {trainable:,} trainable parameters against {'' if exact else 'at most '}"
                   f"{tokens:,} trained tokens in the data, more than {SUPPORT} per token: the rank is beyond what "
                   f"the data supports and invites memorisation; {advice}")
    ratio = lora.lora_alpha / lora.r
    if not lora.use_rslora and not 0.5 <= ratio <= 4:
        out.append(f"lora.lora_alpha={lora.lora_alpha:g} is {ratio:g} x r (r={lora.r}), far from r..2r. The update "
                   f"is scaled by alpha/r, which acts like multiplying training.lr by {ratio / 2:g} against alpha=2r: "
                   f"set training.lr for it (now {cfg.training.lr:g}) or use lora_alpha={2 * lora.r}")
    if embedding_params and not new_tokens:
        out.append(f"the embeddings or the output head train ({embedding_params:,} parameters) but no new tokens "
                   "are added (--new-tokens): this rarely helps a fine-tune and makes the adapter bigger; drop them "
                   "from target_modules / modules_to_save unless you add tokens")
    if new_tokens and not embedding_params:
        out.append(f"{new_tokens} new tokens start from untrained embeddings: add the input embedding and the output "
                   "head to lora.modules_to_save so their rows are trained in full")
    return out
