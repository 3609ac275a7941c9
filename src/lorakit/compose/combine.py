"""Combine several adapters into one new adapter (`lk.combine_adapters`, `lorakit combine`).

Adapter i has factors A_i (r_i x q), B_i (p x r_i), scaling s_i and weight w_i; its update is
dW_i = s_i B_i A_i (p x q: d_out x d_in for Linear and Conv1D, dim x num_embeddings for
embeddings, c_out x c_in*k for convolutions, whose factors are flattened to 2-D and reshaped back).
The result is a normal adapter with scaling 1 (lora_alpha equal to its rank, no rsLoRA):

    cat               A = [w_i s_i A_i] stacked by rows, B = [B_i] by columns; exact:
                      B A = sum_i w_i dW_i, rank sum_i r_i
    svd               sum_i w_i dW_i truncated to rank k (`svd_rank`, default max r_i) by its SVD,
                      B = U_k S_k, A = V_k^T. Never formed densely: with the cat factors
                      B_c = Q_B R_B and A_c^T = Q_A R_A (reduced QR), B_c A_c = Q_B (R_B R_A^T) Q_A^T,
                      so the SVD of the small core R_B R_A^T = U' S V'^T gives U = Q_B U',
                      V = Q_A V' (exactly the dense truncated SVD, in O((p + q) R^2) for R = sum r_i)
    linear, ties,     the element-wise method (`merge_ops`) applied to the A_i and, separately,
    dare_linear,      to the B_i, with weights sign(w_i s_i) sqrt|w_i s_i| on A and sqrt|w_i s_i|
    dare_ties,        on B (PEFT's factor-space merge). Needs equal ranks at each module, and
    magnitude_prune   B A has cross terms B_i A_j: `linear` is not sum_i w_i dW_i
    *_svd             the element-wise method on the dense w_i dW_i (in the layer's own weight
                      layout, as PEFT draws its masks), then truncated SVD as for `svd`

A module that only some adapters adapt combines those (the others contribute nothing). DARE masks
are drawn from a generator seeded with `seed` (the global RNG when None) module by module in
model order, for each module the A's then the B's (or the dW's) in the order of `names`: PEFT's
order, so PEFT run with the same seed at the same point draws the same masks.

Differences from PEFT's `add_weighted_adapter`: one adapter keeps its method (PEFT silently
switches to `linear`), so with density < 1 a pruning method prunes it; ranks must agree per module
rather than per config; ranks of the result are per module (rank_pattern) where they differ, not
zero-padded to the largest. Refused with an error: DoRA adapters, adapters with `lora_bias`,
`modules_to_save` or trained base biases (none of those add across adapters as B A does).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..errors import AdapterStateError, ConfigError, TargetModulesError
from ..inject import (
    add_adapter,
    check_known,
    check_new_name,
    delete_adapter,
    get_state,
    lora_layers,
    set_active_adapters,
)
from ..layers import LoraEmbedding, LoraLayer, LoraLinear
from .merge_ops import MAJORITY_SIGN, merge_tasks
from .settings import DENSITY_METHODS, METHODS, SEED_METHODS, SIGN_METHODS, SVD_METHODS


def combine_adapters(model: nn.Module, names: Sequence[str], weights: Sequence[float], method: str, name: str,
                     density: float | None = None, majority_sign: str = "total", svd_rank: int | None = None,
                     seed: int | None = None, *, trainable: bool = False, activate: bool = True) -> nn.Module:
    """Add adapter `name` to `model`, the combination of adapters `names` with `weights` by
    `method` (see the module docstring); returns the model. `density` (fraction of entries kept)
    is required by the pruning methods, `majority_sign` ("total" | "frequency") picks the TIES
    sign election, `svd_rank` the rank of the *_svd results, `seed` the DARE masks. With
    `activate` the new adapter becomes the only active one; its weights train when `trainable`."""
    names = [names] if isinstance(names, str) else list(names)
    weights = check_options(len(names), weights, method, density, majority_sign, svd_rank, seed)
    state = get_state(model)
    check_known(state, names)
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise ConfigError(f"names lists adapter {twice!r} twice; give each adapter once (add up its weights)")
    check_new_name(model, name)
    _check_combinable(state, names)

    layers = {m: layer for m, layer in lora_layers(model) if any(n in layer.r for n in names)}
    generator = None
    if seed is not None:
        first = next(iter(layers.values()))
        generator = torch.Generator(_factors(first, next(n for n in names if n in first.r))[0].device)
        generator.manual_seed(seed)
    k = svd_rank or max(layer.r[n] for layer in layers.values() for n in names if n in layer.r)   # svd methods
    factors: dict[str, tuple[Tensor, Tensor]] = {}
    for module_name, layer in layers.items():
        present = [(n, w) for n, w in zip(names, weights, strict=True) if n in layer.r]
        if method in ("cat", "svd"):
            A, B = _cat(layer, present)
            factors[module_name] = _refactor(A, B, k) if method == "svd" else (A, B)
        elif method in SVD_METHODS:
            # s B A in the base weight's layout ((d_in, d_out) for Conv1D, (num, dim) for embeddings):
            # the tensor PEFT prunes and draws its DARE masks over, so a seed gives the same masks
            dense = [layer.delta_weight(n) for n, _ in present]
            merged = merge_tasks(dense, [w for _, w in present], method[:-len("_svd")], density, majority_sign,
                                 generator)
            factors[module_name] = _truncated_svd(_to_pq(layer, merged), k)
        else:
            factors[module_name] = _factorwise(module_name, layer, present, method, density, majority_sign,
                                               generator)

    dtype = _adapter_dtype(layers.values(), names)
    config = _combined_config(state.configs[names[0]], {m: A.shape[0] for m, (A, _) in factors.items()})
    add_adapter(model, config, name, trainable=trainable, activate=False, adapter_dtype=dtype)
    held = {m: layer for m, layer in lora_layers(model) if name in layer.r}
    if held.keys() != factors.keys():
        delete_adapter(model, name)
        extra = sorted(held.keys() - factors.keys())
        raise TargetModulesError(
            f"the combined adapter's target_modules {sorted(factors)} also match {extra} (a module path that "
            "ends with another's), so it cannot be saved as a PEFT target list; combine adapters on a model "
            "without such nested names"
        )
    with torch.no_grad():
        for module_name, (A, B) in factors.items():
            pa, pb = _factors(held[module_name], name)
            pa.copy_(A.reshape(pa.shape))
            pb.copy_(B.reshape(pb.shape))
    if activate:
        try:
            set_active_adapters(model, [name])
        except AdapterStateError:   # e.g. other adapters merged into the base: leave nothing half done
            delete_adapter(model, name)
            raise
    return model


def check_options(n_adapters: int, weights: Sequence[float], method: str, density: float | None,
                  majority_sign: str, svd_rank: int | None, seed: int | None) -> list[float]:
    """Validate the arguments that do not need the model (so `lorakit combine` fails before loading
    one); returns the weights as floats."""
    if n_adapters == 0:
        raise ConfigError("names is empty; give at least one adapter to combine")
    if method not in METHODS:
        raise ConfigError(f"method {method!r} is not a combination method; choose one of {', '.join(METHODS)}")
    weights = list(weights)
    if len(weights) != n_adapters:
        raise ConfigError(f"got {len(weights)} weights for {n_adapters} adapters; give one weight per adapter")
    if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights):
        raise ConfigError(f"weights must be finite numbers, got {weights}")
    if method in DENSITY_METHODS:
        if density is None:
            raise ConfigError(f"method {method!r} needs density, the fraction of entries kept, in (0, 1]")
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
            raise ConfigError(f"density must be a number in (0, 1] (the fraction of entries kept), got {density!r}")
    elif density is not None:
        raise ConfigError(f"density is only used by {', '.join(DENSITY_METHODS)}; method {method!r} keeps every "
                          "entry, so drop it")
    if majority_sign not in MAJORITY_SIGN:
        raise ConfigError(f"majority_sign must be 'total' or 'frequency', got {majority_sign!r}")
    if majority_sign != "total" and method not in SIGN_METHODS:
        raise ConfigError(f"majority_sign is only used by {', '.join(SIGN_METHODS)}; method {method!r} elects "
                          "no sign, so drop it")
    if svd_rank is not None:
        if method not in SVD_METHODS:
            raise ConfigError(f"svd_rank is only used by {', '.join(SVD_METHODS)}; the rank of {method!r} "
                              "follows from the inputs, so drop it")
        if isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank < 1:
            raise ConfigError(f"svd_rank must be an integer >= 1, got {svd_rank!r}")
    if seed is not None and method not in SEED_METHODS:
        raise ConfigError(f"seed is only used by {', '.join(SEED_METHODS)} (random DARE masks); method "
                          f"{method!r} is deterministic, so drop it")
    return [float(w) for w in weights]


def _check_combinable(state, names: list[str]) -> None:
    for n in names:
        cfg = state.configs[n]
        if cfg.target_parameters:
            raise AdapterStateError(
                f"adapter {n!r} adapts parameters ({cfg.target_parameters[0]}, ...), e.g. fused expert weights, "
                "whose per-expert factors combine_adapters does not combine; combine adapters of layers only, or "
                "merge it into the base (merge_adapters) instead"
            )
        if cfg.use_dora:
            raise AdapterStateError(
                f"adapter {n!r} uses DoRA, whose magnitude vector rescales whole rows of W + sBA and does not add "
                "across adapters, so it cannot be combined; merge it into the base (merge_adapters) instead"
            )
        if cfg.lora_bias:
            raise AdapterStateError(f"adapter {n!r} has lora_bias=True; combining B biases is not supported, "
                                    "combine adapters without lora_bias")
        if cfg.modules_to_save:
            raise AdapterStateError(
                f"adapter {n!r} has modules_to_save {cfg.modules_to_save}; fully trained module copies cannot "
                "be combined like low-rank updates, combine adapters without modules_to_save"
            )
        if cfg.bias != "none":
            raise AdapterStateError(
                f"adapter {n!r} trains base biases (bias={cfg.bias!r}), which are shared by every adapter and "
                "cannot be weighted; combine adapters trained with bias='none'"
            )


def _factors(layer: LoraLayer, name: str) -> tuple[nn.Parameter, nn.Parameter]:
    """Adapter `name`'s (A, B) parameters in their stored shapes."""
    if isinstance(layer, LoraEmbedding):
        return layer.lora_embedding_A[name], layer.lora_embedding_B[name]
    return layer.lora_A[name].weight, layer.lora_B[name].weight


def _factors_2d(layer: LoraLayer, name: str) -> tuple[Tensor, Tensor]:
    """(A (r, q), B (p, r)) detached, in float32 at least; conv kernels flattened into q."""
    A, B = _factors(layer, name)
    work = torch.promote_types(A.dtype, torch.float32)
    return A.detach().to(work).flatten(1), B.detach().to(work).flatten(1)


def _to_pq(layer: LoraLayer, dense: Tensor) -> Tensor:
    """A dense update in the base weight's layout as (p, q), the orientation of B A."""
    if isinstance(layer, LoraEmbedding) or (isinstance(layer, LoraLinear) and layer.fan_in_fan_out):
        return dense.t()
    return dense.flatten(1)


def _cat(layer: LoraLayer, present: list[tuple[str, float]]) -> tuple[Tensor, Tensor]:
    """(A (R, q), B (p, R)) with B A = sum_i w_i s_i B_i A_i, R = sum r_i."""
    As, Bs = [], []
    for n, w in present:
        A, B = _factors_2d(layer, n)
        As.append(w * layer.scaling[n] * A)
        Bs.append(B)
    return torch.cat(As, dim=0), torch.cat(Bs, dim=1)


def _refactor(A: Tensor, B: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The rank-k truncated SVD of B A (p x q) from its factors, without forming B A."""
    QB, RB = torch.linalg.qr(B)                              # (p, K1), (K1, R)
    QA, RA = torch.linalg.qr(A.t())                          # (q, K2), (K2, R)
    U, S, Vh = torch.linalg.svd(RB @ RA.t(), full_matrices=False)   # core (K1, K2)
    return _top(QB @ U, S, Vh @ QA.t(), k)


def _truncated_svd(dense: Tensor, k: int) -> tuple[Tensor, Tensor]:
    U, S, Vh = torch.linalg.svd(dense, full_matrices=False)  # dense (p, q)
    return _top(U, S, Vh, k)


def _top(U: Tensor, S: Tensor, Vh: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """A = V_k^T (k, q), B = U_k S_k (p, k); zero-padded to rank k when fewer singular values exist."""
    j = min(k, S.numel())
    A = Vh.new_zeros(k, Vh.shape[1])
    B = U.new_zeros(U.shape[0], k)
    A[:j] = Vh[:j]
    B[:, :j] = U[:, :j] * S[:j]
    return A, B


def _factorwise(module_name: str, layer: LoraLayer, present: list[tuple[str, float]], method: str,
                density: float | None, majority_sign: str, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    ranks = {n: layer.r[n] for n, _ in present}
    if len(set(ranks.values())) > 1:
        raise AdapterStateError(
            f"method {method!r} combines the factors entry by entry, so the adapters need the same rank at each "
            f"module, but {module_name} has ranks {ranks}; use 'cat' (exact) or an *_svd method"
        )
    ws = [w * layer.scaling[n] for n, w in present]
    factors = [_factors_2d(layer, n) for n, _ in present]
    A = merge_tasks([a for a, _ in factors], [math.copysign(math.sqrt(abs(x)), x) for x in ws], method, density,
                    majority_sign, generator)                                   # (r, q)
    B = merge_tasks([b for _, b in factors], [math.sqrt(abs(x)) for x in ws], method, density, majority_sign,
                    generator)                                                  # (p, r)
    return A, B


def _adapter_dtype(layers, names: list[str]) -> torch.dtype:
    """The widest dtype among the inputs' factors (the combined adapter is stored in it)."""
    dtype = None
    for layer in layers:
        for n in names:
            if n in layer.r:
                a = _factors(layer, n)[0].dtype
                dtype = a if dtype is None else torch.promote_types(dtype, a)
    return dtype


def _combined_config(first, ranks: dict[str, int]):
    """The first input's config with the combined adapter's modules (by full name) and ranks: the
    most common rank as r, the others as rank_pattern, alpha equal to rank everywhere."""
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {re.escape(m): rank for m, rank in ranks.items() if rank != r}
    return dataclasses.replace(
        first, r=r, lora_alpha=r, rank_pattern=pattern, alpha_pattern=dict(pattern), target_modules=sorted(ranks),
        exclude_modules=None, layers_to_transform=None, layers_pattern=None, use_rslora=False,
        init_lora_weights=True, inference_mode=False,
    )
