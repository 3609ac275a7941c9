"""The losses of the preference and RL objectives, from log-probabilities already computed.

The objectives (lorakit.train.preference, lorakit.train.grpo) run the models; these functions turn
their log-probabilities into losses. They return one loss per example (per pair, per completion,
per token for GRPO), unreduced: the loop sums them over the micro-batches of a step and divides by
one count for the whole step, as it does with the SFT loss's tokens. Inputs and outputs are fp32.

Notation: for a completion y of prompt x with n tokens, s = sum_t log pi(y_t | x, y_<t) under the
policy, s_ref under the reference; c and r are a pair's chosen and rejected completions;
sig is the logistic function. Each formula is TRL 1.16's (tests/train/test_preference_loss.py
checks losses and gradients against TRL's own code):

    dpo    h = beta ((s_c - s_ref_c) - (s_r - s_ref_r))
           loss = -(1 - eps) log sig(h) - eps log sig(-h)            eps: label smoothing (cDPO)
    ipo    loss = ((s_c - s_ref_c) / n_c - (s_r - s_ref_r) / n_r - 1 / (2 beta))^2
    simpo  m = s / n (length-normalised; s otherwise),  h = beta (m_c - m_r) - gamma
           loss = -(1 - eps) log sig(h) - eps log sig(-h)
    orpo   m = s / n,  log odds(y) = m - log(1 - exp(m))
           loss = -lambda log sig(log odds(y_c) - log odds(y_r))     plus the caller's NLL of y_c
    kto    z = max(0, mean over mismatched pairs (x_i, y_j) of s - s_ref), no gradient
           label true:  w_d (1 - sig(beta ((s - s_ref) - z)))
           label false: w_u (1 - sig(beta (z - (s - s_ref))))
    grpo   A_i = (R_i - mean_group(R)) / (std_group(R) + 1e-4)  ("none": no division, Dr. GRPO)
           rho = exp(logp - logp_old) per token
           loss_t = -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) + beta rho k3
           k3 = exp(logp_ref - logp) - (logp_ref - logp) - 1         (x rho: TRL's KL bias correction)

Why IPO, SimPO and ORPO divide by n: a summed log-probability grows with the completion's length,
and these losses hold it against a fixed scale (IPO's target 1 / (2 beta), SimPO's margin gamma,
ORPO's odds, which of a whole sequence's probability would be ~0), so TRL averages per token; DPO
and KTO keep the sums, as their papers do.
A count n is clamped at 1 (TRL's IPO does; its SimPO and ORPO would give NaN for an empty
completion).

The rewards to log are TRL's: beta (s - s_ref) for dpo, ipo and kto; beta m for simpo, lambda m
for orpo (TRL's ORPO calls lambda beta).

How TRL reduces them, which the objective matches with its counts:
    dpo, ipo, simpo  mean over pairs
    orpo             NLL mean over the chosen rows' tokens  +  odds-ratio term mean over pairs
                     (two terms with their own counts; TRL's NLL covers the prompt tokens too)
    kto              mean over completions (the weights do not enter the count)
    grpo             `grpo_sum_and_count`: dapo, grpo or dr_grpo
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import GrpoLoss, RewardScale

ADVANTAGE_EPS = 1e-4
"""Added to the reward std before dividing (TRL's), so a group of equal rewards gives A = 0."""


@dataclass
class PairTerms:
    losses: Tensor
    """(P,) one loss per pair, with its gradient."""
    chosen_rewards: Tensor
    """(P,) detached: the chosen completions' implicit rewards (TRL's rewards/chosen)."""
    rejected_rewards: Tensor
    """(P,) detached: the rejected completions' (TRL's rewards/rejected)."""


@dataclass
class OrpoTerms(PairTerms):
    log_odds: Tensor
    """(P,) detached log odds(y_c) - log odds(y_r): TRL logs its mean (log_odds_chosen) and the mean
    of its log sigmoid (log_odds_ratio)."""


@dataclass
class GrpoTerms:
    per_token_loss: Tensor
    """(N, T) per-token loss, before the completion mask and the aggregation."""
    kl: Tensor | None
    """(N, T) detached per-token KL term as it enters the loss (rho k3), None without a reference."""
    low_clipped: Tensor
    """(N, T) bool: rho < 1 - eps_low where A < 0 (the clip holds the ratio up)."""
    high_clipped: Tensor
    """(N, T) bool: rho > 1 + eps_high where A > 0 (the clip holds the ratio down)."""

    @property
    def clipped(self) -> Tensor:
        """(N, T) bool: either clip holds (TRL's clip_ratio/region_mean)."""
        return self.low_clipped | self.high_clipped


def _smoothed_logistic(h: Tensor, label_smoothing: float) -> Tensor:
    """-(1 - eps) log sig(h) - eps log sig(-h): the logistic loss when a share eps of the labels
    is assumed flipped (conservative DPO); eps = 0 is plain -log sig(h)."""
    return -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)


def _per_token(logps: Tensor, tokens: Tensor) -> Tensor:
    """Summed log-probabilities over their token counts, a count clamped at 1 (module docstring)."""
    return logps / tokens.clamp(min=1)


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
             beta: float, label_smoothing: float) -> PairTerms:
    """DPO; with label smoothing, conservative DPO. All inputs (P,) summed log-probabilities. At
    label_smoothing 0 it is TRL 1.16's DPOTrainer loss_type "sigmoid", which has no smoothing; the
    smoothed form is the one TRL's CPOTrainer "sigmoid" applies, here to the log-ratios."""
    chosen_ratio = policy_chosen - ref_chosen                         # (P,)
    rejected_ratio = policy_rejected - ref_rejected                   # (P,)
    losses = _smoothed_logistic(beta * (chosen_ratio - rejected_ratio), label_smoothing)
    return PairTerms(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def ipo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
             chosen_tokens: Tensor, rejected_tokens: Tensor, beta: float) -> PairTerms:
    """IPO (TRL's DPOTrainer, loss_type "ipo"): the squared distance of the per-token log-ratio
    margin from 1 / (2 beta). Log-probabilities (P,) summed; tokens (P,) the completions' lengths.
    The rewards stay beta x the summed log-ratios, as TRL logs them."""
    chosen_ratio = policy_chosen - ref_chosen                         # (P,)
    rejected_ratio = policy_rejected - ref_rejected                   # (P,)
    margin = _per_token(chosen_ratio, chosen_tokens) - _per_token(rejected_ratio, rejected_tokens)
    losses = (margin - 1 / (2 * beta)) ** 2
    return PairTerms(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def simpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, chosen_tokens: Tensor, rejected_tokens: Tensor,
               beta: float, gamma: float, label_smoothing: float, length_normalize: bool) -> PairTerms:
    """SimPO (TRL's CPOTrainer, loss_type "simpo", cpo_alpha 0): reference-free, the policy's
    margin must exceed gamma / beta. TRL always length-normalises; `length_normalize=False` keeps
    the sums (CPO's "sigmoid" with a margin). Log-probabilities (P,) summed, tokens (P,)."""
    if length_normalize:
        policy_chosen = _per_token(policy_chosen, chosen_tokens)
        policy_rejected = _per_token(policy_rejected, rejected_tokens)
    losses = _smoothed_logistic(beta * (policy_chosen - policy_rejected) - gamma, label_smoothing)
    return PairTerms(losses, beta * policy_chosen.detach(), beta * policy_rejected.detach())


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0 without cancellation (Maechler 2012): log(-expm1(x)) near 0,
    where 1 - exp(x) is tiny, log1p(-exp(x)) below -log 2, where exp(x) is."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, chosen_tokens: Tensor, rejected_tokens: Tensor,
              lam: float) -> OrpoTerms:
    """ORPO's odds-ratio term (TRL's experimental ORPOTrainer.odds_ratio_loss, negated: TRL
    subtracts it): the odds of the per-token mean probability, chosen against rejected. The
    caller adds the chosen completions' NLL with its own count. Log-probabilities (P,) summed."""
    chosen = _per_token(policy_chosen, chosen_tokens)                 # (P,) mean log p per token
    rejected = _per_token(policy_rejected, rejected_tokens)           # (P,)
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    losses = -lam * F.logsigmoid(log_odds)
    return OrpoTerms(losses, lam * chosen.detach(), lam * rejected.detach(), log_odds.detach())


def kto_kl_estimate(log_ratio_sum: Tensor, count: Tensor) -> Tensor:
    """KTO's reference point z (TRL's KTOTrainer): the mean log-ratio of the mismatched pairs
    (prompt i with another example's completion), clamped at 0, detached; a () tensor. Inputs: the
    sum over M pairs of policy minus reference summed log-probabilities, and M, both (). TRL
    averages each process's mean (gather_for_metrics) and clamps after; with equal batches per
    process that is the mean over all M of the step's processes, which is why this takes a sum and
    a count: several processes add theirs up before the one clamp."""
    return (log_ratio_sum / count).clamp(min=0).detach()


def kto_loss(policy_logps: Tensor, ref_logps: Tensor, labels: Tensor, kl: Tensor, beta: float,
             desirable_weight: float, undesirable_weight: float) -> tuple[Tensor, Tensor]:
    """KTO (TRL's KTOTrainer, loss_type "kto"): (losses (N,), rewards (N,) detached), in the input
    order (TRL concatenates desirable then undesirable; its mean is the same). Log-probabilities
    (N,) summed; labels (N,) bool, true for desirable; kl the detached () estimate z."""
    ratio = policy_logps - ref_logps                                  # (N,)
    desirable = desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl)))
    undesirable = undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio)))
    return torch.where(labels, desirable, undesirable), beta * ratio.detach()


def group_advantages(rewards: Tensor, group_size: int, scale: RewardScale) -> Tensor:
    """GRPO's advantages (TRL's GRPOTrainer, sum_then_normalize): each reward minus its group's
    mean, over (std + 1e-4) of the group ("group") or not ("none"). std is the unbiased one
    (Bessel's n - 1, TRL's nanstd). rewards (N,), every `group_size` consecutive rewards one
    prompt's completions. (TRL's third choice, the std of the whole generation batch, is left
    out: lorakit samples per micro-batch, and a group's statistics need no other process.)"""
    if group_size < 2 or rewards.numel() % group_size:
        raise ValueError(f"group_advantages needs group_size >= 2 dividing the {rewards.numel()} rewards, "
                         f"got {group_size}")
    grouped = rewards.view(-1, group_size)                            # (N / G, G)
    advantages = (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)   # (N,)
    if scale == "group":
        std = grouped.std(dim=1, keepdim=True).expand_as(grouped).reshape(-1)   # (N,)
    elif scale == "none":
        return advantages
    else:
        raise ValueError(f"scale must be one of group, none; got {scale!r}")
    return advantages / (std + ADVANTAGE_EPS)


def grpo_token_loss(logps: Tensor, old_logps: Tensor | None, ref_logps: Tensor | None, advantages: Tensor,
                    epsilon_low: float, epsilon_high: float, beta: float,
                    kl_bias_correction: bool = True) -> GrpoTerms:
    """GRPO's clipped policy loss per token (TRL's GRPOTrainer._compute_loss, loss types dapo,
    grpo, dr_grpo, token-level ratios). logps, old_logps, ref_logps (N, T) per-token
    log-probabilities of the completions under the policy, the policy that sampled them and the
    reference; advantages (N,). old_logps None: on-policy (sampled by these very weights), the
    ratio is exp(logp - logp.detach()), 1 in value with the policy gradient. ref_logps None: no KL
    term (beta must then be 0). `kl_bias_correction` multiplies k3 by the ratio (TRL's default
    use_bias_correction_kl), which changes the KL gradient even on-policy: d(rho k3) = d k3 + k3
    d logp, the unbiased gradient of the reverse KL (DeepSeek-V3.2)."""
    if ref_logps is None and beta != 0:
        raise ValueError(f"grpo_token_loss with beta={beta} needs ref_logps; pass the reference's "
                         "log-probabilities, or beta=0 for no KL term")
    old = logps.detach() if old_logps is None else old_logps
    ratio = torch.exp(logps - old)                                    # (N, T)
    adv = advantages.unsqueeze(1)                                     # (N, 1)
    clipped = ratio.clamp(1 - epsilon_low, 1 + epsilon_high)          # (N, T)
    loss = -torch.min(ratio * adv, clipped * adv)                     # (N, T)
    kl = None
    if ref_logps is not None:
        log_ref_ratio = ref_logps - logps                             # (N, T)
        kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1             # (N, T) k3 >= 0
        if kl_bias_correction:
            kl = kl * ratio
        loss = loss + beta * kl
        kl = kl.detach()
    ratio = ratio.detach()
    return GrpoTerms(loss, kl, (ratio < 1 - epsilon_low) & (adv < 0), (ratio > 1 + epsilon_high) & (adv > 0))


def grpo_sum_and_count(per_token_loss: Tensor, mask: Tensor, loss_type: GrpoLoss,
                       max_completion_len: int) -> tuple[Tensor, Tensor]:
    """(sum, count) of one micro-batch's GRPO loss, so that the step's loss, the sums of all its
    micro-batches over their counts, is TRL's. per_token_loss (N, T), mask (N, T) 1 on completion
    tokens.

        dapo     sum of all completion tokens' losses / completion tokens
        grpo     sum over completions of (its tokens' sum / its length, clamped at 1) / completions
        dr_grpo  sum of all completion tokens' losses / (completions x max_completion_len)

    TRL's dapo divides by the generation batch's tokens over all processes: the same total. Its
    grpo and dr_grpo average the micro-batches' means: the same when they hold equal numbers of
    completions, as TRL's always do."""
    masked = per_token_loss * mask                                    # (N, T)
    count = grpo_count(mask, loss_type, max_completion_len)
    if loss_type == "grpo":
        return (masked.sum(dim=1) / mask.sum(dim=1).clamp(min=1)).sum(), count
    return masked.sum(), count


def grpo_count(mask: Tensor, loss_type: GrpoLoss, max_completion_len: int) -> Tensor:
    """What one micro-batch adds to the step's GRPO normaliser, from its completion mask (N, T)
    alone, so the loop has it before the forward: completion tokens (dapo), completions (grpo),
    completions x max_completion_len (dr_grpo)."""
    if loss_type == "dapo":
        return mask.sum()
    completions = torch.tensor(mask.size(0), device=mask.device)
    if loss_type == "grpo":
        return completions
    if loss_type == "dr_grpo":
        return completions * max_completion_len
    raise ValueError(f"loss_type must be one of dapo, grpo, dr_grpo; got {loss_type!r}")
