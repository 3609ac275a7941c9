"""The learning-rate schedule, a pure function of the step (so resuming needs no scheduler state).

    step < warmup:  lr * (step + 1) / warmup              linear ramp, never 0 at the first step
    after warmup:   p = (step - warmup) / (total - warmup) in [0, 1)
        constant:   lr
        linear:     lr * (1 - p)
        cosine:     lr * (1 + cos(pi p)) / 2
"""

from __future__ import annotations

import math


def lr_at(step: int, total_steps: int, peak: float, warmup: int, kind: str) -> float:
    """Learning rate for 0-based optimizer step `step` of `total_steps`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if kind == "constant":
        return peak
    p = (step - warmup) / max(1, total_steps - warmup)
    if kind == "linear":
        return peak * (1.0 - p)
    if kind == "cosine":
        return peak * 0.5 * (1.0 + math.cos(math.pi * p))
    raise ValueError(f"unknown schedule {kind!r}; use constant, linear or cosine")
