"""The objective a run trains with (`training.objective`), built from its config and data."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from torch import nn

from .config import PAIRED_OBJECTIVES, REFERENCE_FREE, TrainConfig
from .distributed import Dist
from .grpo import GRPO
from .preference import KTO, Paired
from .preference_data import ObjectiveData
from .reference import REFERENCE_ADAPTER
from .rewards import Rewards


def build_objective(cfg: TrainConfig, data: ObjectiveData, tokenizer: Any, model: nn.Module, dist: Dist,
                    autocast: Callable[[], AbstractContextManager], log: Callable[[str], None],
                    rewards: Rewards | None = None) -> Paired | KTO | GRPO:
    """The non-SFT objective of `cfg` over `data`; `model` is the user's model with the adapter (and
    the reference adapter, if any) on it; `rewards` GRPO's (lorakit.train.grpo.grpo_rewards, checked
    before the model was loaded). With precompute_reference the reference log-probabilities of the
    training data are computed here, before the first step."""
    t, objective = cfg.training, cfg.training.objective
    reference = REFERENCE_ADAPTER if cfg.training.reference_adapter else None
    common = (data.train, data.eval, tokenizer.pad_token_id, t.micro_batch_size, t.grad_accum, t.chunked_loss, model,
              reference, autocast)
    if objective == "grpo":
        if rewards is None:
            raise ValueError("build_objective for grpo needs its rewards (lorakit.train.grpo.grpo_rewards)")
        return GRPO(cfg.grpo, rewards, tokenizer, dist, t.seed, *common)
    built = Paired(objective, cfg.preference, *common) if objective in PAIRED_OBJECTIVES else \
        KTO(cfg.preference, dist, *common)
    if cfg.preference.precompute_reference and objective not in REFERENCE_FREE:
        built.precompute(t.micro_batch_size)
        log(f"reference: log-probabilities of {len(data.train)} training examples computed once "
            "(preference.precompute_reference)")
    return built
