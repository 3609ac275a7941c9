"""Weights that several modules share (tied embeddings), and what merging an adapter does to them.

With `tie_word_embeddings` a transformers model holds one Parameter W for the input embeddings and
the output head (`model.embed_tokens.weight is lm_head.weight`; Gemma and GPT-2 do this by
default). An adapter on one of the two adapts that module only: the other keeps computing with W.
Merging writes W + s B A into the weight, so merging into the shared W would change the other
module as well (on a tiny Llama the merged logits were off by ~7 for an `lm_head` adapter, by
~240 for an `embed_tokens` one).

  - `unload(merge=True)` first gives each module it merges into a copy of the weight it shares
    (`untie`), so the other module keeps W and the merged model computes what the adapted one did.
    A transformers config that still says `tie_word_embeddings=True` would make `save_pretrained`
    drop one of the two now different weights and `from_pretrained` tie them again, so
    `untie_config` sets it to False; a saved merged model then holds its own `lm_head.weight`.
    A `modules_to_save` copy of a tied module is its own weight already; only the config changes.
  - `merge_adapters` (reversible, in place) refuses a tied target (`refuse_tied_merge`): there is
    no way to fold the update into W for one module only, and a copy made while merged would have
    to be tied back on unmerge. PEFT merges into the shared weight (it only warns when the adapter
    is created), which changes both modules.
"""

from __future__ import annotations

import re
from collections import defaultdict

from torch import nn

from .errors import AdapterStateError
from .layers import LoraLayer


def _holders(model: nn.Module) -> dict[int, list[str]]:
    """Every name under which each parameter (by identity) is reachable in `model`."""
    names: dict[int, list[str]] = defaultdict(list)
    for name, param in model.named_parameters(remove_duplicate=False):
        names[id(param)].append(name)
    return names


def _shared(holders: dict[int, list[str]], module_name: str, base: nn.Module) -> dict[str, list[str]]:
    """The parameters `base` (the layer wrapped at `module_name`) holds itself, by attribute name,
    that modules outside the wrapper hold too, with those other names."""
    inside = module_name + "."
    out = {}
    for attr, param in base.named_parameters(recurse=False):
        others = [n for n in holders[id(param)] if not n.startswith(inside)]
        if others:
            out[attr] = others
    return out


def untie(model: nn.Module, layers: list[tuple[str, LoraLayer]]) -> list[tuple[nn.Parameter, nn.Parameter]]:
    """Give each `(module_name, layer)`'s base layer its own copy of every parameter it shares with
    a module outside it, so that merging into it leaves the other module as it is. When two of the
    layers share one weight (both tied embeddings adapted), the first gets a copy and the last
    keeps the original. Returns (original, copy) pairs; each copy keeps its original's
    `requires_grad`."""
    holders = _holders(model)
    pairs = []
    for module_name, layer in layers:
        base = layer.base_layer
        for attr in _shared(holders, module_name, base):
            old = getattr(base, attr)
            new = nn.Parameter(old.detach().clone(), requires_grad=old.requires_grad)
            setattr(base, attr, new)
            holders[id(old)] = [n for n in holders[id(old)] if not n.startswith(module_name + ".")]
            pairs.append((old, new))
    return pairs


def refuse_tied_merge(model: nn.Module, layers: list[tuple[str, LoraLayer]], names: list[str]) -> None:
    """Refuse, before anything is written, to merge `names` into a layer whose weight another
    module shares (see the module docstring)."""
    holders = _holders(model)
    for module_name, layer in layers:
        if not any(n in layer.r and n not in layer.merged_adapters for n in names):
            continue
        shared = _shared(holders, module_name, layer.base_layer)
        if shared:   # named as the user knows them, without the wrappers' own path segments
            others = sorted({re.sub(r"\.(base_layer|original_module)(?=\.)", "", n)
                             for group in shared.values() for n in group})
            raise AdapterStateError(
                f"cannot merge into {module_name}: its weight is tied to {', '.join(others)} (tie_word_embeddings), "
                "which would change too. lorakit.unload(model, merge=True) merges into an untied copy; otherwise "
                "keep the adapter unmerged"
            )


def untie_config(model: nn.Module) -> None:
    """Set `tie_word_embeddings=False` on every transformers config that claims input embeddings and
    output head are tied while their weights are different Parameters (after `untie`, or after a
    `modules_to_save` copy replaced one of them), so `save_pretrained` writes both weights and
    `from_pretrained` keeps them apart."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if not getattr(config, "tie_word_embeddings", False):
            continue
        get_input = getattr(module, "get_input_embeddings", None)
        get_output = getattr(module, "get_output_embeddings", None)
        if not (callable(get_input) and callable(get_output)):
            continue
        out = get_output()   # first: None for a module without a head, whose get_input may raise
        inp = get_input() if out is not None else None
        if inp is not None and inp.weight is not out.weight:
            config.tie_word_embeddings = False
