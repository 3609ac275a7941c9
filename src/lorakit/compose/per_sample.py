"""A different adapter for each row of one batch (multi-tenant inference over one base model).

`names[i]` is the adapter of batch row i, or "__base__" for none. Every adapter wrapper gets a
`composer` (see `lorakit.layers.LoraLayer`) that adds, to each row's base output, that row's
adapter term only:

    y_i = base(x_i) + s_a(i) * B_a(i) A_a(i) x_i  (+ s_a(i) * b_a(i) with lora_bias)

On entry, each layer stacks the factors of the distinct adapters named (the ones it holds) into
one tensor per factor, with slot 0 all zeros for "__base__" and for adapters the layer does not
hold. Ranks are padded with zeros to the layer's largest one, which adds nothing (the padded
columns of A meet zero rows of B), and each adapter's scaling is folded into its B:

    A_stack (K+1, d_in, R)    A_k^T in the first r_k columns        (embeddings: (K+1, vocab, R))
    B_stack (K+1, R, d_out)   s_k B_k^T in the first r_k rows

A forward is then gathers and two batched matmuls, whatever the number of adapters, in one of two
layouts, whichever copies fewer rows (both give the same sums):

  - per row (prefill: many tokens per row): gather each row's factors, n*R rows of them,
        h = bmm(x, A_stack[slot])            x (n, M, d_in) -> (n, M, R)
        out = base_out + bmm(h, B_stack[slot])                   (n, M, d_out)
  - per adapter (decoding: few tokens per row): gather the rows of each adapter into groups
    (K groups of G rows, the largest group's size; short groups padded), K*G*M rows of x, and
    read each adapter's factors in place; "__base__" rows are not computed at all:
        h = bmm(x[rows], A_stack[1:])        (K, G*M, d_in) -> (K, G*M, R)
        out[rows] += bmm(h, B_stack[1:])                         (K, G*M, d_out)
    When the groups are the batch's rows in order (one adapter for every row, or rows sorted by
    adapter in equal numbers), x[rows] is a view of x and the sum goes into `out` in place: no
    copy at all, so this layout is then taken whatever the number of tokens.

Embeddings look the ids up in each row's (or group's) own table: h = A_stack[slot, ids].

Rows that `generate` repeats: beam search with `num_beams=k` and `num_return_sequences=k` repeat
each row k times in place (`repeat_interleave`), so a layer sees a batch of n*k rows whose
consecutive groups of k share an adapter. The composer therefore accepts any leading size that is
a multiple of n and views it as (n, k*M, ...): row group i keeps adapter i with no index to
expand and no extra gather. The same view covers layers that see tokens flattened to
(n*T, d_in). Any other batch size is an error, not a guess.

A server keeps its adapter library loaded and sees a new mix of rows at every step: re-stacking
every adapter on each entry would copy all their factors each time. `StackedAdapters(model, names)`
stacks them once (slot k+1 = names[k] in every layer that holds it) and `stacks.rows(row_names)`
installs composers over those stacks: entering builds, per distinct set of adapters a layer holds,
one plan of the rows' slots and groups, which all such layers share. A batch that uses a subset of
the stacked adapters reads their factors in place when their slots are consecutive and gathers them
(K_batch factor copies) otherwise.

Inference only: the stacks are a snapshot of the weights taken on entry (detached), so no
gradient reaches the adapters and a change to their weights inside the block is not seen. A layer
in training mode raises (dropout would be skipped silently). Not supported, each with an error on
entry: DoRA adapters, adapters merged into the base (then "__base__" could not be the base), conv
layers holding a named adapter, embeddings with `max_norm`, and adapters with `modules_to_save`
copies. Other `modules_to_save` copies are switched off inside the block, so every row sees the
original module. The model's active adapters play no part inside the block.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import AdapterStateError, LoraError
from ..inject import BASE_NAME, check_known, get_state, has_adapters, wrappers
from ..layers import LoraConv, LoraEmbedding, LoraLayer, ModulesToSave
from ..param_layer import LoraParameter


class _RowComposer:
    """The composer of one layer: the stacked factors of the adapters it holds, each name's slot,
    and the rows grouped by adapter. `A` is None when no named adapter lives in this layer: every
    row gets the base output."""

    def __init__(self, slots: Tensor, A: Tensor | None = None, B: Tensor | None = None, bias: Tensor | None = None,
                 groups: list[list[int]] | None = None, group_slots: list[int] | None = None) -> None:
        self.n = len(slots)
        self.slots = slots      # (n,) slot of each name, 0 = no adapter
        self.A = A              # (K+1, d_in, R) or, for embeddings, (K+1, vocab, R)
        self.B = B              # (K+1, R, d_out), scaling folded in
        self.bias = bias        # (K+1, d_out), scaling folded in; None without lora_bias
        if groups:              # groups[k]: the rows of slot group_slots[k] (default k + 1)
            G, device = max(map(len, groups)), slots.device
            group_slots = group_slots or list(range(1, len(groups) + 1))
            # short groups repeat their first row; what those compute is dropped (`keep`)
            self.rows = torch.tensor([g + g[:1] * (G - len(g)) for g in groups], device=device)       # (K, G)
            self.group_slots = torch.tensor(group_slots, device=device)                                # (K,)
            # the groups' factors: a view when their slots are consecutive, else a gather
            first = group_slots[0]
            consecutive = group_slots == list(range(first, first + len(group_slots)))
            self.group_factors = slice(first, first + len(group_slots)) if consecutive else self.group_slots
            self.keep = None if all(len(g) == G for g in groups) else \
                torch.tensor([j < len(g) for g in groups for j in range(G)], device=device)           # (K*G,)
            self.kept_rows = torch.tensor([i for g in groups for i in g], device=device)             # (<=n,)
            # groups that are consecutive runs of rows covering the batch (one adapter for all rows, or
            # rows sorted by adapter in equal numbers): the grouped x is a view and the sum is in place
            self.in_order = self.keep is None and [i for g in groups for i in g] == list(range(self.n))

    def __call__(self, layer: LoraLayer, x: Tensor, base_out: Tensor) -> Tensor:
        if layer.training:
            raise AdapterStateError(
                f"per_sample_adapters is for inference, but {layer.module_name} is in training mode (its dropout "
                "would be skipped and no gradient reaches the adapters); call model.eval() first"
            )
        rows = x.shape[0]
        if rows % self.n:
            raise LoraError(
                f"per_sample_adapters was given {self.n} adapter names but {layer.module_name} got a batch of {rows} "
                f"rows; give one name per batch row (generate's num_beams / num_return_sequences may repeat each "
                f"row k times, so a multiple of {self.n} is accepted)"
            )
        if self.A is None:
            return base_out
        out = base_out.reshape(self.n, -1, base_out.shape[-1])                    # (n, M, d_out)
        tokens = out.shape[1]
        if self.per_adapter(tokens):
            out = self._per_adapter(layer, x, out)
        else:
            out = self._per_row(layer, x, out)
        if self.bias is not None:
            out = out.add_(self.bias[self.slots].to(out.dtype)[:, None, :])
        return out.reshape(base_out.shape)

    def per_adapter(self, tokens: int) -> bool:
        """Group rows by adapter when that copies fewer rows (of x) than gathering each row's
        factors does (rows of A^T and B): decoding, where a row brings one token or a few; and
        always when the groups are the batch in order, which copies nothing."""
        return self.in_order or self.rows.numel() * tokens <= self.n * self.A.shape[-1]

    def _per_row(self, layer: LoraLayer, x: Tensor, out: Tensor) -> Tensor:
        n, tokens, dtype = self.n, out.shape[1], out.dtype
        if isinstance(layer, LoraEmbedding):   # each row looks up in its own table; no table copied
            h = self.A[self.slots[:, None], x.reshape(n, tokens)]                 # (n, M, R)
        else:
            h = torch.bmm(x.reshape(n, tokens, -1).to(dtype), self.A[self.slots].to(dtype))   # (n, M, R)
        return out.baddbmm_(h.to(dtype), self.B[self.slots].to(dtype))           # (n, M, d_out)

    def _per_adapter(self, layer: LoraLayer, x: Tensor, out: Tensor) -> Tensor:
        (K, G), tokens, dtype = self.rows.shape, out.shape[1], out.dtype
        if isinstance(layer, LoraEmbedding):
            ids = x.reshape(self.n, tokens)[self.rows]                             # (K, G, M)
            h = self.A[self.group_slots[:, None, None], ids].reshape(K, G * tokens, -1)   # (K, G*M, R)
        else:
            xs = x.reshape(self.n, tokens, -1)                                       # (n, M, d_in)
            xg = (xs if self.in_order else xs[self.rows]).reshape(K, G * tokens, -1)       # (K, G*M, d_in)
            h = torch.bmm(xg.to(dtype), self.A[self.group_factors].to(dtype))       # (K, G*M, R)
        B = self.B[self.group_factors].to(dtype)                                   # (K, R, d_out)
        if self.in_order:
            out.view(K, G * tokens, -1).baddbmm_(h.to(dtype), B)                     # (K, G*M, d_out)
            return out
        y = torch.bmm(h.to(dtype), B).reshape(K * G, tokens, -1)                    # (K*G, M, d_out)
        return out.index_add_(0, self.kept_rows, y if self.keep is None else y[self.keep])


def _stack_factors(layer: LoraLayer, present: list[str]) -> tuple[Tensor, Tensor, Tensor | None]:
    """Stack the factors of `present` (the named adapters this layer holds) behind a zero slot:
    A (K+1, d_in, R), B (K+1, R, d_out) and bias (K+1, d_out) or None, scaling folded into B and bias.
    One `torch.stack` per factor over the rank-padded factors: no large zero-filled buffer is written
    piecewise (a parallel fill of a fresh buffer is what makes entry slow on a busy CPU)."""
    if isinstance(layer, LoraEmbedding):
        A_of = {a: layer.lora_embedding_A[a] for a in present}                  # (r, vocab)
        B_of = {a: layer.lora_embedding_B[a] for a in present}                  # (dim, r)
        bias_of = {}
    else:
        A_of = {a: layer.lora_A[a].weight for a in present}                     # (r, d_in)
        B_of = {a: layer.lora_B[a].weight for a in present}                     # (d_out, r)
        bias_of = {a: layer.lora_B[a].bias for a in present if layer.lora_bias[a]}
    dtype = functools.reduce(torch.promote_types, [A_of[a].dtype for a in present] + [B_of[a].dtype for a in present])
    R = max(layer.r[a] for a in present)
    first = A_of[present[0]]
    d_in, d_out = first.shape[1], B_of[present[0]].shape[0]

    def pad(t: Tensor) -> Tensor:   # (rows, r) -> (rows, R), zero columns on the right
        t = t.to(dtype)
        return t if t.shape[1] == R else F.pad(t, (0, R - t.shape[1]))

    with torch.no_grad():
        # an embedding's output scale (Gemma's embed_scale) applies to its adapter rows too
        out_scale = float(layer.output_scale()) if isinstance(layer, LoraEmbedding) else 1.0
        scales = torch.tensor([0.0] + [layer.scaling[a] * out_scale for a in present], device=first.device)   # (K+1,)
        A = torch.stack([first.new_zeros(d_in, R, dtype=dtype)] + [pad(A_of[a].t()) for a in present])   # (K+1, d_in, R)
        B = torch.stack([first.new_zeros(d_out, R, dtype=dtype)] + [pad(B_of[a]) for a in present])      # (K+1, d_out, R)
        B.mul_(scales[:, None, None])
        bias = None
        if bias_of:
            zero = first.new_zeros(d_out, dtype=dtype)
            bias = torch.stack([zero] + [bias_of.get(a, zero).to(dtype) for a in present])          # (K+1, d_out)
            bias.mul_(scales[:, None])
    return A, B.transpose(1, 2), bias


def _composer_for(layer: LoraLayer, names: list[str], rows_of: dict[str, list[int]]) -> _RowComposer:
    """`rows_of[a]`: the batch rows named a, in order."""
    present = [a for a in rows_of if a in layer.r]
    if present:
        _check_layer(layer, present)
    device = _device_of(layer)
    slot_of = {a: k for k, a in enumerate(present, start=1)}
    slots = torch.tensor([slot_of.get(a, 0) for a in names], dtype=torch.long, device=device)   # (n,)
    if not present:
        return _RowComposer(slots)
    return _RowComposer(slots, *_stack_factors(layer, present), [rows_of[a] for a in present])


def _device_of(layer: LoraLayer) -> torch.device:
    """Where the layer computes: its base's first parameter (a fused expert stack has no `.weight`)."""
    return next(layer.base_layer.parameters()).device


def _check_layer(layer: LoraLayer, present: list[str]) -> None:
    """Refuse what the composer cannot run: conv layers, adapted parameters (fused experts), DoRA,
    embeddings with max_norm."""
    if isinstance(layer, LoraParameter):
        raise AdapterStateError(f"per_sample_adapters does not support adapted parameters (fused expert weights); "
                                f"{layer.module_name} holds {present}. Use set_active_adapters and one batch per "
                                "adapter instead")
    if isinstance(layer, LoraConv):
        raise AdapterStateError(f"per_sample_adapters does not support conv layers; {layer.module_name} holds "
                                f"{present}. Use set_active_adapters and one batch per adapter instead")
    dora = [a for a in present if layer.use_dora[a]]
    if dora:
        raise AdapterStateError(f"per_sample_adapters does not support DoRA adapters: {dora} use DoRA in "
                                f"{layer.module_name}. Merge them with merge_adapters or batch them separately")
    if isinstance(layer, LoraEmbedding) and layer.base_layer.max_norm is not None:
        raise AdapterStateError(f"per_sample_adapters does not support embeddings with max_norm "
                                f"({layer.module_name}); use set_active_adapters and one batch per adapter instead")


@contextlib.contextmanager
def per_sample_adapters(model: nn.Module, names: Sequence[str]) -> Iterator[nn.Module]:
    """Within the block, batch row i runs under adapter `names[i]` ("__base__": no adapter), in
    forward and in `generate` (greedy, sampling, beam search). The batch must have len(names)
    rows, or a multiple of it whose consecutive groups repeat one row (what `generate` makes for
    num_beams / num_return_sequences). Inference only; the previous composers come back on exit.

    Raises LoraError if `names` is not a non-empty list of strings, AdapterStateError for an
    unknown name, merged adapters, or an adapter the composer cannot run (see the module doc).
    """
    names = _check_names(names)
    named = [a for a in dict.fromkeys(names) if a != BASE_NAME]
    check_known(get_state(model), named)
    layers, saved = _checked_modules(model, named)
    rows_of = _rows_of(names, named)
    composers = [_composer_for(layer, names, rows_of) for layer in layers]   # every check before any change
    with _installed(model, layers, composers, saved):
        yield model


class StackedAdapters:
    """The factors of a fixed list of adapters, stacked once per layer and reused by any number of
    batches: what a server that keeps its adapter library loaded needs, where `per_sample_adapters`
    would stack every adapter named again on each entry (a copy of their factors each time).

    `rows(names)` is then `per_sample_adapters` without the stacking: entering it builds one plan
    of which rows use which adapter per distinct set of adapters a layer holds (usually one set
    for the whole model), and each layer's composer shares that plan. The stacks are a snapshot:
    build a new `StackedAdapters` after adapters are added, deleted or changed. They hold a second
    copy of the adapters' factors, ranks zero-padded to each layer's largest."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        names = list(names)
        if len(set(names)) != len(names) or BASE_NAME in names:
            raise LoraError(f"StackedAdapters needs distinct adapter names (not {BASE_NAME!r}), got {names}")
        self.model = model
        self.names = names
        if names:
            check_known(get_state(model), names)
        # every adapter layer gets a composer, so adapters left out of the stacks stay out (the
        # model's active adapters play no part), as in `per_sample_adapters`
        adapted = has_adapters(model)
        self._layers, self._saved = _checked_modules(model, names) if adapted else ([], [])
        self._stacks: list[tuple[tuple[str, ...], tuple[Tensor, Tensor, Tensor | None] | None]] = []
        for layer in self._layers:
            present = [a for a in names if a in layer.r]
            if present:
                _check_layer(layer, present)
            self._stacks.append((tuple(present), _stack_factors(layer, present) if present else None))
        self._devices = [_device_of(layer) for layer in self._layers]   # once, not per batch

    @contextlib.contextmanager
    def rows(self, names: Sequence[str]) -> Iterator[nn.Module]:
        """Within the block, batch row i runs under adapter `names[i]` ("__base__": none); the
        names must be among the stacked ones. Same contract as `per_sample_adapters`."""
        names = _check_names(names)
        named = [a for a in dict.fromkeys(names) if a != BASE_NAME]
        unknown = [a for a in named if a not in self.names]
        if unknown:
            raise AdapterStateError(f"adapters {unknown} are not stacked; stacked adapters: {self.names}")
        rows_of = _rows_of(names, named)
        plans: dict[tuple, tuple[_RowComposer, bool]] = {}   # (adapters held, device) -> (plan, any row uses one)
        composers = []
        for (present, factors), device in zip(self._stacks, self._devices, strict=True):
            if (present, device) not in plans:
                slot_of = {a: k for k, a in enumerate(present, start=1)}
                slots = torch.tensor([slot_of.get(a, 0) for a in names], dtype=torch.long, device=device)   # (n,)
                used = [(slot_of[a], rows_of[a]) for a in named if a in slot_of]
                plans[(present, device)] = (_RowComposer(slots, groups=[g for _, g in used],
                                                         group_slots=[k for k, _ in used]), bool(used))
            plan, used_here = plans[(present, device)]
            if not used_here:   # the plan has no factors: every row gets the base output here
                composers.append(plan)
                continue
            composer = copy.copy(plan)   # the plan's row tensors are shared, the factors are this layer's
            composer.A, composer.B, composer.bias = factors
            composers.append(composer)
        with _installed(self.model, self._layers, composers, self._saved):
            yield self.model


def _check_names(names: Sequence[str]) -> list[str]:
    if isinstance(names, str) or not isinstance(names, Sequence) or not all(isinstance(a, str) for a in names):
        raise LoraError(f"per_sample_adapters needs a list with one adapter name per batch row (or {BASE_NAME!r}), "
                        f"got {names!r}")
    if not names:
        raise LoraError("per_sample_adapters needs at least one adapter name (one per batch row)")
    return list(names)


def _rows_of(names: list[str], named: list[str]) -> dict[str, list[int]]:
    """The batch rows of each named adapter, in order."""
    rows_of: dict[str, list[int]] = {a: [] for a in named}
    for i, a in enumerate(names):
        if a != BASE_NAME:
            rows_of[a].append(i)
    return rows_of


def _checked_modules(model: nn.Module, named: list[str]) -> tuple[list[LoraLayer], list[ModulesToSave]]:
    """The model's adapter layers and modules_to_save wrappers, after refusing merged adapters and
    named adapters with modules_to_save copies."""
    modules = [m for _, m in wrappers(model)]   # one walk over the model's modules (many, with many adapters)
    layers = [m for m in modules if isinstance(m, LoraLayer)]
    saved = [m for m in modules if isinstance(m, ModulesToSave)]
    merged = sorted({a for layer in layers for a in layer.merged_adapters})
    if merged:
        raise AdapterStateError(f"adapters {merged} are merged into the base weights, so rows could not get the base "
                                "or another adapter; call unmerge_adapters before per_sample_adapters")
    copies = sorted({a for m in saved for a in m.adapter_names if a in named})
    if copies:
        raise AdapterStateError(f"adapters {copies} have modules_to_save copies, which per_sample_adapters cannot "
                                "switch per row; batch their rows separately with set_active_adapters")
    return layers, saved


@contextlib.contextmanager
def _installed(model: nn.Module, layers: list[LoraLayer], composers: list[_RowComposer],
               saved: list[ModulesToSave]) -> Iterator[nn.Module]:
    previous = [layer.composer for layer in layers]
    previous_saved = [m.disabled for m in saved]
    try:
        for layer, composer in zip(layers, composers, strict=True):
            layer.composer = composer
        for m in saved:
            m.disabled = True   # every row sees the original module, not an active adapter's copy
        yield model
    finally:
        for layer, composer in zip(layers, previous, strict=True):
            layer.composer = composer
        for m, was in zip(saved, previous_saved, strict=True):
            m.disabled = was
