"""The training objective: cross-entropy summed over trained tokens (labels != -100).

Returning the sum and the token count, not a mean, lets the loop divide by the number of trained
tokens across all accumulated micro-batches (and all processes), so every trained token weighs
the same however the batch is split.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .data import IGNORE_INDEX


def loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token cross-entropy over trained positions, number of trained positions)."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits              # (B, T, V)
    targets = labels[:, 1:]                                       # (B, T-1): token t predicts t+1
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, (targets != IGNORE_INDEX).sum()
