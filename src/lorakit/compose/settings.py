"""The options of composition that users write in configs and on the command line: the mixture
and fusion layers' settings, the mixture file's kinds and the combination methods' names.

They are plain data, kept apart from the layers and the algorithms that use them, so that the
train config (and `lorakit train --help`, which prints its reference) is built without torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import ConfigError

KindName = Literal["moe", "fusion"]
"""What a saved mixture holds: a mixture of LoRA experts (a gate per layer) or AdapterFusion."""

# `combine_adapters` methods; those that make an SVD, use density, the sign election, the DARE seed
SVD_METHODS = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
METHODS = ("linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd",
           "magnitude_prune", "magnitude_prune_svd")
DENSITY_METHODS = ("ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd",
                   "magnitude_prune", "magnitude_prune_svd")
SIGN_METHODS = ("ties", "ties_svd", "dare_ties", "dare_ties_svd")
SEED_METHODS = ("dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd")


@dataclass
class MixtureConfig:
    top_k: int | None = None
    """Experts mixed per token: null for all of them (dense softmax), k for the k most probable."""
    temperature: float = 1.0
    """Gate softmax temperature: softmax(logits / temperature); lower is sharper."""
    renormalize: bool = True
    """With top_k, rescale the kept probabilities to sum to 1 (false: Switch style, keeps top_k=1 trainable)."""

    def __post_init__(self) -> None:
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or self.top_k < 1):
            raise ConfigError(f"MixtureConfig.top_k must be an integer >= 1 or None (dense), got {self.top_k!r}")
        check_temperature(self)


def check_temperature(config: Any) -> None:
    """A mixture or fusion config's softmax temperature is a finite number > 0."""
    value = config.temperature
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
        raise ConfigError(f"{type(config).__name__}.temperature must be a number > 0, got {value!r}")


@dataclass
class FusionConfig:
    key_dim: int = 64
    """Width d_k of the query and keys (per layer: Q is d_k x d_in, K is d_k x d_out)."""
    value_rank: int | None = 16
    """V = identity + a rank-r correction (starts at exactly the identity); null: a full d_out x d_out V."""
    temperature: float = 1.0
    """Attention softmax temperature: softmax(q.k / (temperature * sqrt(key_dim)))."""

    def __post_init__(self) -> None:
        for key in ("key_dim", "value_rank"):
            value = getattr(self, key)
            if value is None and key == "value_rank":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"FusionConfig.{key} must be an integer >= 1{' or None' if key == 'value_rank' else ''}, "
                                  f"got {value!r}")
        check_temperature(self)
