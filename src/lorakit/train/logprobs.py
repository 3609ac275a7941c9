"""Per-token log-probabilities of a batch's completion tokens, from one forward of the model.

The preference and RL objectives score completions by their log-probabilities. With
`training.chunked_loss` they come from the output head's input hidden states a chunk of rows at a
time (lorakit.ops.chunked_logprobs), exactly as the SFT loss does (lorakit.train.loss: the same
head capture and the same fallback for models that change their logits after the head), so two
completions per pair or G per prompt never hold their full fp32 logits. Only completion positions
are scored: prompt tokens and padding cost no head matmul at all.

A batch is collated as for SFT: `labels` (B, T) holds the token ids of the scored (completion)
positions and IGNORE_INDEX elsewhere, unshifted; position t predicts token t + 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.chunked_logprobs import chunked_logprobs
from .data import IGNORE_INDEX
from .loss import compute_dtype, head_forward

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


def token_logprobs(model: nn.Module, batch: dict[str, Tensor], chunked: bool,
                   temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """(logps, mask), both (B, T): logps[b, t] = log p(labels[b, t + 1] | tokens <= t) in fp32 where
    mask[b, t] (that label is scored), 0 elsewhere; the logits divided by `temperature` first."""
    labels = batch["labels"]
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)       # (B, T)
    mask = targets != IGNORE_INDEX                                    # (B, T)
    rows = mask.flatten().nonzero().squeeze(1)                        # (n,) scored positions
    t = targets.flatten().index_select(0, rows)                       # (n,)
    hidden, head, logits = head_forward(model, inputs, labels.shape, chunked)
    if hidden is not None:
        dtype = compute_dtype(hidden)
        h = hidden.flatten(0, 1).index_select(0, rows).to(dtype)      # (n, d)
        bias = None if head.bias is None else head.bias.to(dtype)
        lp = chunked_logprobs(h, head.weight.to(dtype), t, bias, temperature)
    else:
        z = logits.flatten(0, 1).index_select(0, rows).float() / temperature   # (n, V)
        lp = torch.log_softmax(z, dim=-1).gather(1, t[:, None]).squeeze(1)
    out = lp.new_zeros(mask.numel()).index_copy(0, rows, lp)          # (B * T,)
    return out.view(mask.shape), mask


def sequence_logprobs(model: nn.Module, batch: dict[str, Tensor], chunked: bool) -> tuple[Tensor, Tensor]:
    """(sum of each row's completion log-probabilities (B,), its completion tokens (B,))."""
    logps, mask = token_logprobs(model, batch, chunked)
    return logps.sum(1), mask.sum(1)


def collate_completions(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> dict[str, Tensor]:
    """Rows prompt + completion, right-padded to the longest: input_ids, attention_mask and labels
    (the completion's ids, IGNORE_INDEX on the prompt and the padding), each (B, T)."""
    width = max(len(p) + len(c) for p, c in zip(prompts, completions, strict=True))
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)       # (B, T)
    labels = torch.full((len(prompts), width), IGNORE_INDEX, dtype=torch.long)    # (B, T)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)                    # (B, T)
    for b, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        n = len(p) + len(c)
        input_ids[b, :n] = torch.tensor(p + c, dtype=torch.long)
        labels[b, len(p):n] = torch.tensor(c, dtype=torch.long)
        mask[b, :n] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
