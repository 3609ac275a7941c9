"""Element-wise merging of task tensors: weighted sums, magnitude pruning, TIES and DARE.

A task tensor T_i is one adapter's contribution to one weight (a factor A_i or B_i, or a dense
update dW_i); w_i is its weight and `density` the fraction of entries kept. The definitions are
PEFT 0.21.2's (`peft.utils.merge_utils`), so merges agree entry for entry:

    prune_magnitude(T, d)   keep the k = floor(d * numel) entries largest in |T|, zero the rest
    drop_random(T, d)       keep each entry with probability d, divide survivors by d (DARE:
                            the expectation of every entry is unchanged)
    linear                  sum_i w_i T_i
    magnitude_prune         sum_i w_i prune_magnitude(T_i, d)
    ties                    P_i = prune_magnitude(T_i, d); per entry, elect a sign from the
                            *unweighted* P_i: sign of sum_i P_i ("total") or of sum_i sign(P_i)
                            ("frequency"), 0 counting as +; the result is the mean of w_i P_i over
                            the i whose P_i has the elected sign (a zero entry never agrees, an
                            entry no task agrees on is 0)
    dare_linear             sum_i w_i drop_random(T_i, d)
    dare_ties               ties with drop_random in place of prune_magnitude

A density of 1 keeps everything (and draws no random numbers). Arguments are validated by the
caller (`lorakit.compose.combine`): 0 < density <= 1, weights finite.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

TASK_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
MAJORITY_SIGN = ("total", "frequency")


def prune_magnitude(t: Tensor, density: float) -> Tensor:
    """`t` with all but its floor(density * numel) largest-magnitude entries set to zero."""
    if density >= 1:
        return t
    k = int(density * t.numel())
    keep = torch.zeros(t.numel(), dtype=torch.bool, device=t.device)
    keep[torch.topk(t.abs().reshape(-1), k=k).indices] = True
    return t * keep.reshape(t.shape)


def drop_random(t: Tensor, density: float, generator: torch.Generator | None = None) -> Tensor:
    """DARE: each entry survives with probability `density` and is then divided by it. Draws from
    `generator` (the global RNG when None), one Bernoulli per entry in memory order."""
    if density >= 1:
        return t
    keep = torch.bernoulli(torch.full_like(t, density), generator=generator)
    return t * keep / density


def majority_sign_mask(stacked: Tensor, method: str = "total") -> Tensor:
    """(n, ...) bool: where task i's entry has the elected sign. `stacked` holds the n task tensors,
    unweighted; the sign of 0 (as in PEFT) is +."""
    sign = stacked.sign()
    votes = stacked.sum(dim=0) if method == "total" else sign.sum(dim=0)
    elected = torch.where(votes >= 0, 1.0, -1.0).to(sign.dtype)
    return sign == elected


def merge_tasks(tasks: Sequence[Tensor], weights: Sequence[float], method: str, density: float | None = None,
                majority_sign: str = "total", generator: torch.Generator | None = None) -> Tensor:
    """Merge same-shape task tensors by one of `TASK_METHODS` (see the module docstring). Random
    masks (DARE) are drawn task by task, in order."""
    if method in ("ties", "magnitude_prune"):
        tasks = [prune_magnitude(t, density) for t in tasks]
    elif method in ("dare_linear", "dare_ties"):
        tasks = [drop_random(t, density, generator) for t in tasks]
    stacked = torch.stack(list(tasks))                                          # (n, ...)
    w = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device)
    weighted = stacked * w.reshape((-1,) + (1,) * (stacked.dim() - 1))         # (n, ...)
    if method not in ("ties", "dare_ties"):
        return weighted.sum(dim=0)
    agree = majority_sign_mask(stacked, majority_sign)                           # (n, ...)
    return (weighted * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)
