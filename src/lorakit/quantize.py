"""A frozen 4-bit NF4 base under the adapters (QLoRA), on bitsandbytes' `Linear4bit`.

QLoRA (Dettmers et al., 2023) stores each frozen linear weight W as 4-bit NormalFloat codes and
trains the adapters in higher precision on top:

    y = deq(Q(W)) x + b + s B A dropout(x)          deq(Q(W)): (d_out, d_in) in the compute dtype

The layout lorakit makes (and the one `lorakit plan` counts): W flattened row-major in blocks of
64 weights, each block scaled by its absmax; with double quantization the fp32 absmaxes are
themselves stored as 8-bit codes in blocks of 256 with one fp32 scale each, so a weight costs
4 + 8/64 + 32/(64*256) = 4.127 bits. Linear layers and the fused expert weights of
mixture-of-experts models (3-D parameters, nearly all of such a model's weights) are quantized;
the output head, the embeddings, the routers and the norms keep the model dtype (the head is the
layer quantization hurts most, and it is one matrix).

An expert weight is not a layer bitsandbytes could replace: its module's forward indexes it per
expert. So it becomes a parametrization of its module (`NF4Weight`, `torch.nn.utils.parametrize`):
the module holds the packed codes, and reading the attribute dequantizes the whole stack (once per
forward under `parametrize.cached()`, which the expert adapters use, `lorakit.param_layer`). The
stack is quantized flattened, in blocks of 64 consecutive weights, which is what bitsandbytes'
dequantizer reads back on every device whatever the row width.

Why bitsandbytes: it installs next to a CPU-only torch, quantizes and runs forward and backward on
CPU as well as CUDA (so the tests run everywhere), and it is the 4-bit layer PEFT wraps, so a
lorakit-quantized model goes through PEFT unchanged and adapters stay interchangeable. On CPU its
NF4 kernel needs each layer's input width to be a multiple of 64 (see `_check_cpu_widths`).

Merging: an NF4 weight cannot hold W + s B A. The update is usually smaller than one NF4 step, so
requantizing (what PEFT does, with a warning) rounds most of it away. lorakit refuses an in-place
merge into a 4-bit weight, and `dequantize_linears` turns the base back into plain `nn.Linear`
(or `Conv1D`) layers holding deq(Q(W)) in the original dtype, where merging is exact: `unload(merge=True)` and
`lorakit merge` do that, so the merged model computes what the quantized model with its adapters
computed, up to float rounding.
"""

from __future__ import annotations

import logging
import sys
from typing import get_args

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .base_types import LINEAR_TYPES, Conv1D, expert_parameters, is_conv1d
from .dtypes import QuantizeBase
from .errors import LoraError

QUANTIZE_BASE = get_args(QuantizeBase)
NF4_BLOCKSIZE = 64
"""Weights per absmax block (bitsandbytes' default, and QLoRA's)."""
NF4_DOUBLE_QUANT = True
"""Quantize the absmaxes too (8 bits in blocks of 256): 0.127 bits per weight instead of 0.5."""


def import_bitsandbytes():
    """bitsandbytes, or an error that says how to install it. Its CPU backend logs a warning at
    import when an optional fused kernel package is absent; that kernel is only the eval-time fast
    path lorakit switches off (see `quantize_linears`), so the warning is silenced."""
    cpu_log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = cpu_log.level
    cpu_log.setLevel(logging.ERROR)
    try:
        import bitsandbytes
    except ImportError:
        raise LoraError("a 4-bit NF4 base (quantize_base: nf4, QLoRA) needs bitsandbytes, which is not installed: "
                        "pip install 'lorakit[qlora]'") from None
    finally:
        cpu_log.setLevel(level)
    return bitsandbytes


def is_4bit(module: nn.Module) -> bool:
    """Whether `module` is a bitsandbytes 4-bit linear. Never imports bitsandbytes: if nobody has
    imported it, no such layer can exist."""
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def weight_count(p: Tensor) -> int:
    """How many weights a parameter stands for: a quantized 4-bit parameter packs two in each byte
    of its storage (PEFT and transformers count it so)."""
    if getattr(p, "nf4_weights", None) is not None:   # the packed codes of an NF4 expert stack
        return p.nf4_weights
    bnb = sys.modules.get("bitsandbytes")
    if bnb is not None and isinstance(p, bnb.nn.Params4bit) and p.bnb_quantized:
        return p.numel() * 2 * p.element_size()
    return p.numel()


def weight_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of the layer's weight; for a 4-bit one, the dtype it had before quantizing
    (what `dequantize_weight` returns), read without dequantizing."""
    state = getattr(module.weight, "quant_state", None)
    return state.dtype if state is not None else module.weight.dtype


def dequantize_weight(module: nn.Module) -> Tensor:
    """deq(Q(W)) of a 4-bit linear: (d_out, d_in) in the dtype the weight had before quantizing.

    bitsandbytes repacks a weight for its fused bf16 CPU kernel the first time the layer runs in
    eval without gradients (unless switched off, as `quantize_linears` does); its dequantizer
    does not read that layout, so such a weight is first put back the way bitsandbytes itself does
    before saving a state dict (the repacked state is bf16, so that rounding stays)."""
    weight = module.weight
    state = getattr(weight, "quant_state", None)
    if state is None:   # not quantized yet: bitsandbytes quantizes when the layer moves to a device
        return weight.data
    if getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
        state = weight.quant_state
    bnb = import_bitsandbytes()
    return bnb.functional.dequantize_4bit(weight.data, state)


def quantize_linears(model: nn.Module, compute_dtype: torch.dtype, device: torch.device | str) -> int:
    """Replace every `nn.Linear` (and GPT-2 `Conv1D`, whose (d_in, d_out) weight is transposed) of
    `model` except the output head by a frozen NF4 `Linear4bit` on `device` (quantized there, one
    layer at a time, so the full-precision model never has to fit on it). Returns how many layers
    were quantized; biases keep their dtype and `requires_grad`.

    `compute_dtype` is what the 4-bit matmul runs in (the model dtype: bf16 on GPU, fp32 or bf16 on
    CPU). The model is marked `is_loaded_in_4bit`, as transformers marks a model it loads in 4 bits,
    so PEFT and `num_parameters` treat it as one."""
    if getattr(model, "_lorakit", None) is not None:
        raise LoraError("quantize the base before adding adapters: this model already has lorakit adapters, whose "
                        "layers were sized and typed for the full-precision base")
    bnb = import_bitsandbytes()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, LINEAR_TYPES) and not is_4bit(m) and m is not head]
    if torch.device(device).type == "cpu":
        _check_cpu_widths(targets)
    for name, linear in targets:
        conv1d = is_conv1d(linear)
        weight = linear.weight.data.t().contiguous() if conv1d else linear.weight.data   # (d_out, d_in)
        q = bnb.nn.Linear4bit(weight.shape[1], weight.shape[0], bias=linear.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=NF4_DOUBLE_QUANT, quant_type="nf4",
                              device="meta")
        q.weight = bnb.nn.Params4bit(weight, requires_grad=False, blocksize=NF4_BLOCKSIZE,
                                     compress_statistics=NF4_DOUBLE_QUANT, quant_type="nf4", module=q)
        if linear.bias is not None:
            q.bias = linear.bias
        q.from_conv1d = conv1d   # so adapters keep Conv1D's layout and dequantizing restores the type
        # Keep the canonical layout and the compute dtype in eval too: the fused CPU kernel would
        # compute in bf16 whatever the compute dtype, and repack the weight (see dequantize_weight).
        q.support_avx512bf16_for_cpu = False
        q.train(linear.training)
        _replace(model, name, q.to(device))
    experts = quantize_experts(model, compute_dtype, device)
    if targets or experts:
        model.is_loaded_in_4bit = True
    return len(targets) + experts


class NF4Weight(nn.Module):
    """The parametrization of an NF4 expert stack: the module's parameter holds the packed codes
    (uint8, (numel / 2, 1)); reading it gives deq(codes) in `compute_dtype` and the stack's shape."""

    def __init__(self, shape: torch.Size, quant_state, compute_dtype: torch.dtype) -> None:
        super().__init__()
        self.shape, self.quant_state, self.compute_dtype = shape, quant_state, compute_dtype

    def forward(self, codes: Tensor) -> Tensor:
        bnb = import_bitsandbytes()
        return bnb.functional.dequantize_4bit(codes, self.quant_state).reshape(self.shape).to(self.compute_dtype)

    def _apply(self, fn, recurse: bool = True):
        """`model.to(device)` moves the codes (a parameter) and, here, the block scales with them,
        which bitsandbytes keeps outside any module (as `Params4bit` moves its own)."""
        moved = fn(torch.empty(0, device=self.quant_state.absmax.device))
        if moved.device != self.quant_state.absmax.device:
            self.quant_state.to(moved.device)
        return super()._apply(fn, recurse)


def is_nf4_parameter(module: nn.Module, name: str) -> bool:
    """Whether `module.<name>` is an NF4 expert stack (`quantize_experts`)."""
    chains = module._modules.get("parametrizations")   # the module's own (a wrapper would lend its base's)
    return chains is not None and name in chains and isinstance(chains[name][0], NF4Weight)


def quantize_experts(model: nn.Module, compute_dtype: torch.dtype, device: torch.device | str) -> int:
    """Store every fused expert weight of `model` (`base_types.expert_parameters`) as NF4 on
    `device`, one stack at a time; returns how many. The weights stay frozen."""
    bnb = import_bitsandbytes()
    count = 0
    for module in model.modules():
        for name in expert_parameters(module):
            if is_nf4_parameter(module, name):
                continue
            weight = getattr(module, name).detach().to(device)                  # (E, d_out, d_in)
            codes, state = bnb.functional.quantize_4bit(weight.reshape(-1), blocksize=NF4_BLOCKSIZE,
                                                        compress_statistics=NF4_DOUBLE_QUANT, quant_type="nf4")
            packed = nn.Parameter(codes, requires_grad=False)                  # (numel / 2, 1) uint8
            packed.nf4_weights = weight.numel()
            shape = weight.shape
            del weight
            setattr(module, name, packed)
            parametrize.register_parametrization(module, name, NF4Weight(shape, state, compute_dtype), unsafe=True)
            count += 1
    return count


def dequantize_experts(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Turn every NF4 expert stack of `model` back into a plain frozen parameter holding deq(Q(W))
    in `dtype` (default: the compute dtype). Returns how many."""
    count = 0
    for module in model.modules():
        for name in list(module._modules.get("parametrizations") or []):
            if is_nf4_parameter(module, name):
                weight = getattr(module, name).detach()
                parametrize.remove_parametrizations(module, name, leave_parametrized=False)
                setattr(module, name, nn.Parameter(weight.to(dtype or weight.dtype), requires_grad=False))
                count += 1
    return count


def _check_cpu_widths(targets: list[tuple[str, nn.Module]]) -> None:
    """bitsandbytes' CPU NF4 kernel (0.50) dequantizes in blocks of 64 along each row, while
    quantization blocks the flattened weight: the two agree only when a row (d_in weights) is a
    whole number of blocks. Elsewhere the layer would compute with wrong weights (a 96 x 32 weight
    comes back with errors up to its absmax, not half an NF4 step), so refuse before anything changes."""
    bad = [(name, _in_features(m)) for name, m in targets if _in_features(m) % NF4_BLOCKSIZE]
    if bad:
        listed = ", ".join(f"{name} (d_in {k})" for name, k in bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
        raise LoraError(
            f"NF4 on CPU needs every quantized layer's input width to be a multiple of {NF4_BLOCKSIZE} (bitsandbytes' "
            f"CPU kernel dequantizes {NF4_BLOCKSIZE}-weight blocks row by row); not so for {listed}. Quantize on a "
            "CUDA device, or use quantize_base: none for this model"
        )


def _in_features(m: nn.Module) -> int:
    return m.weight.shape[0] if is_conv1d(m) else m.in_features


def dequantize_linears(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Replace every 4-bit linear of `model` (adapter wrappers' base layers included) by a plain
    `nn.Linear` (a `Conv1D` if it was one) holding deq(Q(W)) in `dtype` (default: the dtype the
    weight had before quantizing), and every NF4 expert stack by a plain parameter
    (`dequantize_experts`). Returns how many were replaced. Frozen stays frozen."""
    experts = dequantize_experts(model, dtype)
    targets = [(name, m) for name, m in model.named_modules() if is_4bit(m)]
    for name, q in targets:
        weight = dequantize_weight(q)                                 # (d_out, d_in)
        weight = weight.to(dtype or weight.dtype)
        if getattr(q, "from_conv1d", False):
            linear = Conv1D(q.out_features, q.in_features)
            weight = weight.t().contiguous()                          # (d_in, d_out)
        else:
            linear = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device="meta")
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if q.bias is not None:
            linear.bias = q.bias
        linear.train(q.training)
        _replace(model, name, linear)
    if (targets or experts) and getattr(model, "is_loaded_in_4bit", False):
        model.is_loaded_in_4bit = False
    return len(targets) + experts


def _replace(model: nn.Module, module_name: str, new: nn.Module) -> None:
    parent_name, _, child = module_name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
