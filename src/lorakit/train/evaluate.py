"""Evaluation: loss and perplexity over trained tokens, and exact match of greedy generations
against the reference answers (the held-out task metric)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .data import Example, collate
from .loss import loss_sum
from .metrics import perplexity


@dataclass
class EvalResult:
    loss: float | None
    """Mean cross-entropy per trained token (None without a reference completion: a GRPO prompt
    without an answer has nothing to score)."""
    ppl: float | None
    """exp(loss)."""
    exact_match: float | None
    """Share of references reproduced exactly by greedy decoding (None if no example has one)."""
    n_examples: int
    samples: list[tuple[str, str, str]]
    """(prompt, reference, generation) for a few examples spread evenly over the eval set."""
    extra: dict[str, float] = field(default_factory=dict)
    """The objective's own held-out metrics ({eval column: value}; preference accuracy, margin, ...)."""


@torch.no_grad()
def evaluate(model: nn.Module, tokenizer, examples: list[Example], batch_size: int, device: torch.device,
             max_generate: int = 256, n_samples: int = 4) -> EvalResult:
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64), 0
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[i:i + batch_size], tokenizer.pad_token_id).items()}
        s, n = loss_sum(model, batch)
        total += s.double().cpu()
        count += int(n)
    loss = (total / count).item() if count else None
    with_ref = [e for e in examples if e.prompt_ids is not None and e.reference is not None][:max_generate]
    hits, samples = 0, []
    # evenly spaced, so a dataset grouped by task shows one sample per task
    shown = {k * len(with_ref) // n_samples for k in range(n_samples)}
    for i in range(0, len(with_ref), batch_size):
        chunk = with_ref[i:i + batch_size]
        outputs = generate_greedy(model, tokenizer, [e.prompt_ids for e in chunk], device,
                                  max_new_tokens=max(len(tokenizer(e.reference, add_special_tokens=False).input_ids)
                                                     for e in chunk) + 8)
        for j, (e, out) in enumerate(zip(chunk, outputs, strict=True)):
            hits += out.strip() == e.reference.strip()
            if i + j in shown:
                samples.append((tokenizer.decode(e.prompt_ids, skip_special_tokens=False), e.reference, out))
    model.train(was_training)
    return EvalResult(loss=loss, ppl=None if loss is None else perplexity(loss), exact_match=hits / len(with_ref) if with_ref else None,
                      n_examples=len(examples), samples=samples)


def generate_greedy(model: nn.Module, tokenizer, prompts: list[list[int]], device: torch.device,
                    max_new_tokens: int, eos_token_id: int | list[int] | None = None) -> list[str]:
    """Greedy continuations of token-id prompts, batched with left padding; special tokens dropped.
    They end at `eos_token_id` (default: the tokenizer's EOS)."""
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=pad,
                         eos_token_id=tokenizer.eos_token_id if eos_token_id is None else eos_token_id)
    return [tokenizer.decode(row[width:], skip_special_tokens=True) for row in out.cpu()]
