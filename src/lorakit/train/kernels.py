"""Put the Triton kernels into a transformers model: `use_kernels(model)`.

What is replaced is found by its code, not by its class name: a module whose `forward` is compiled
from the same code as Llama's RMSNorm (or MLP), and a modeling module whose `apply_rotary_pos_emb`
is Llama's, compute exactly what the kernel computes. transformers generates those for Mistral,
Qwen2/3 and many others from Llama's source, so they are covered too, and a family whose code
differs (Gemma's 1 + weight norm, a GELU MLP) keeps its own.

  - RMSNorm modules: `forward` set on the instance to `rms_norm`;
  - MLP modules computing down(silu(gate(x)) * up(x)): `forward` set on the instance to one that
    multiplies with `swiglu`, whose output is registered with `lorakit.ops.recompute` so that
    down_proj's adapter rebuilds its input from the two factors, as on the PyTorch path;
  - adapted linear layers (`lorakit.layers.LoraLinear`): their dropout masks drawn, applied and
    packed by `lorakit.kernels.dropout` in one pass;
  - RoPE: the attention looks `apply_rotary_pos_emb` up in its modeling module's globals, so that
    global is replaced (restored when the last `KernelPatch` using it is removed) by a dispatcher
    that runs the kernel only inside the forward of an attention module of a patched model (their
    `forward` is wrapped on the instance to say so; checkpointing's recompute goes through it too),
    and the original everywhere else: other models in the process are not touched.

Every replacement checks its input: tensors the kernels do not take (on a device where Triton
cannot run, such as CPU outside the interpreter, or of another dtype than fp32/bf16/fp16) go to the
original PyTorch code, so a patched model still runs after `.cpu()` or `.double()`.
"""

from __future__ import annotations

import contextvars
import sys
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from transformers.models.llama import modeling_llama

from ..kernels.common import SUPPORTED_DTYPES, interpreting, runs_on, triton_importable
from ..layers import LoraLinear
from ..ops import recompute
from ..patching import ForwardPatches, replaced_forward
from . import kernel_check


def _same_code(f: Callable, g: Callable) -> bool:
    """Compiled from the same source: same bytecode, names and non-string constants (docstrings
    and comments may differ between transformers' generated copies)."""
    a, b = getattr(f, "__code__", None), getattr(g, "__code__", None)
    if a is None or b is None:
        return False
    consts = lambda c: tuple(x for x in c.co_consts if not isinstance(x, str))   # noqa: E731
    return a.co_code == b.co_code and a.co_names == b.co_names and consts(a) == consts(b)


def _is_rms_norm(module: nn.Module) -> bool:
    return _same_code(type(module).forward, modeling_llama.LlamaRMSNorm.forward)


def _is_swiglu_mlp(module: nn.Module) -> bool:
    if not _same_code(type(module).forward, modeling_llama.LlamaMLP.forward):
        return False
    act = getattr(module, "act_fn", None)
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def kernel_targets(model: nn.Module) -> tuple[bool, bool]:
    """Whether `use_kernels` would route some of the model's norms, and some of its MLPs (works on
    a model on the meta device: only the modules' code is read)."""
    modules = list(model.modules())
    return any(map(_is_rms_norm, modules)), any(map(_is_swiglu_mlp, modules))


# The replacements are functions bound to their module (types.MethodType), not closures over it:
# `copy.deepcopy` rebinds a bound method to the copy (modules_to_save copies a module that way), and
# a copy must run on its own weights.

def _takes(*tensors: Tensor) -> bool:
    """The kernels take these tensors: Triton runs on their device and they have a kernel dtype."""
    return all(runs_on(t) and t.dtype in SUPPORTED_DTYPES for t in tensors)


def _norm_forward(self: nn.Module, hidden_states: Tensor) -> Tensor:
    if not _takes(hidden_states, self.weight) or hidden_states.shape[-1] > MAX_NORM_WIDTH:
        return type(self).forward(self, hidden_states)
    from ..kernels.rms_norm import rms_norm
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _product(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up by the kernel, registered so that an adapter reading it rebuilds it."""
    from ..kernels.swiglu import swiglu
    out = swiglu(gate, up)
    if gate.requires_grad and up.requires_grad:
        # swiglu's backward keeps gate and up: rebuilding the product from them keeps nothing more
        recompute.record_output(out, recompute.Recipe(swiglu, (gate, up), None))
    return out


def _mlp_forward(self: nn.Module, x: Tensor) -> Tensor:
    if not _takes(x):
        return type(self).forward(self, x)
    gate, up = self.gate_proj(x), self.up_proj(x)
    if gate.dtype != up.dtype or not _takes(gate, up):
        return self.down_proj(self.act_fn(gate) * up)               # LlamaMLP.forward's own product
    return self.down_proj(_product(gate, up))


MAX_NORM_WIDTH = 65536   # lorakit.kernels.rms_norm.MAX_WIDTH (not imported: that module imports triton)

# modeling module -> [original apply_rotary_pos_emb, how many patches use the replacement]
_ROPE_USERS: dict[types.ModuleType, list] = {}
# inside the forward of an attention module of a patched model
_IN_PATCHED_ATTENTION = contextvars.ContextVar("lorakit_kernels_rope", default=False)


def _calls_rope(module: nn.Module) -> bool:
    code = getattr(type(module).forward, "__code__", None)
    return code is not None and "apply_rotary_pos_emb" in code.co_names


def _attention_forward(self: nn.Module, *args, **kwargs):
    token = _IN_PATCHED_ATTENTION.set(True)
    try:
        return type(self).forward(self, *args, **kwargs)
    finally:
        _IN_PATCHED_ATTENTION.reset(token)


_REPLACEMENTS = (_norm_forward, _mlp_forward, _attention_forward)


def _rope_dispatch(original: Callable) -> Callable:
    def apply_rotary_pos_emb(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, *args, **kwargs):
        # Llama's signature since transformers 4.48 is (q, k, cos, sin, unsqueeze_dim=1); anything
        # else (older releases' position_ids) goes to the original
        unsqueeze_dim = kwargs.get("unsqueeze_dim", args[0] if len(args) == 1 else 1)
        plain = len(args) + len(kwargs) <= 1 and set(kwargs) <= {"unsqueeze_dim"} and unsqueeze_dim in (1, 2)
        if not (plain and _IN_PATCHED_ATTENTION.get() and _takes(q, k, cos, sin) and q.dtype == k.dtype
                and cos.dtype == sin.dtype and not cos.requires_grad and not sin.requires_grad):
            return original(q, k, cos, sin, *args, **kwargs)
        from ..kernels.rope import rope
        return rope(q, k, cos, sin, unsqueeze_dim)
    apply_rotary_pos_emb.__wrapped__ = original
    return apply_rotary_pos_emb


@dataclass
class KernelPatch:
    """What `use_kernels` replaced; `remove()` puts the PyTorch code back."""

    norms: list[nn.Module] = field(default_factory=list)
    mlps: list[nn.Module] = field(default_factory=list)
    attentions: list[nn.Module] = field(default_factory=list)
    adapted: list[nn.Module] = field(default_factory=list)
    rope_modules: list[types.ModuleType] = field(default_factory=list)
    forwards: ForwardPatches = field(default_factory=ForwardPatches)
    """The replaced forwards of `norms`, `mlps` and `attentions` (lorakit.patching)."""

    def describe(self) -> str:
        return (f"Triton kernels: {len(self.norms)} RMSNorm, {len(self.mlps)} SwiGLU MLP, "
                f"{len(self.attentions)} RoPE attention modules, dropout in {len(self.adapted)} adapted "
                "layers, the chunked loss")

    def remove(self) -> None:
        self.forwards.remove()
        for module in self.adapted:
            vars(module).pop("dropout_kernel", None)
        for mod in self.rope_modules:
            users = _ROPE_USERS[mod]
            users[1] -= 1
            if users[1] == 0:
                mod.apply_rotary_pos_emb = users[0]
                del _ROPE_USERS[mod]
        self.norms, self.mlps, self.attentions, self.adapted, self.rope_modules = [], [], [], [], []


def use_kernels(model: nn.Module) -> KernelPatch:
    """Route the model's RMSNorm, SwiGLU and RoPE through the Triton kernels (module docstring).
    Needs triton (`pip install lorakit[kernels]`; CUDA builds of torch bring it)."""
    if not triton_importable():
        raise ImportError("lorakit's Triton kernels need triton: pip install 'lorakit[kernels]' "
                          "(CUDA builds of torch include it), or set training.kernels: torch")
    patch = KernelPatch()
    try:
        _patch(model, patch)
    except BaseException:
        patch.remove()     # nothing half-done: the RoPE global included
        raise
    return patch


def _patch(model: nn.Module, patch: KernelPatch) -> None:
    foreign: list[str] = []
    _patch_modules(model, patch, foreign)
    if foreign:
        warnings.warn(f"use_kernels: {len(foreign)} modules ({', '.join(sorted(set(foreign)))}) already have their "
                      "forward replaced on the instance (e.g. accelerate's device_map hooks) and keep PyTorch",
                      stacklevel=3)


def _patch_modules(model: nn.Module, patch: KernelPatch, foreign: list[str]) -> None:
    llama_rope = modeling_llama.apply_rotary_pos_emb
    rope_original = getattr(llama_rope, "__wrapped__", llama_rope)   # Llama's, even once patched
    for module in model.modules():
        if isinstance(module, LoraLinear) and "dropout_kernel" not in vars(module):   # not an earlier patch's
            module.dropout_kernel = True
            patch.adapted.append(module)
        forward = replaced_forward(module)
        if forward is not None:     # already replaced (by us or by someone else): leave it
            if getattr(forward, "__func__", None) not in _REPLACEMENTS and (
                    _is_rms_norm(module) or _is_swiglu_mlp(module) or _calls_rope(module)):
                foreign.append(type(module).__name__)
            continue
        if _is_rms_norm(module):
            patch.forwards.add(module, types.MethodType(_norm_forward, module))
            patch.norms.append(module)
        elif _is_swiglu_mlp(module):
            patch.forwards.add(module, types.MethodType(_mlp_forward, module))
            patch.mlps.append(module)
        elif _calls_rope(module):
            mod = sys.modules[type(module).__module__]
            if not (mod in patch.rope_modules or mod in _ROPE_USERS
                    or _same_code(getattr(mod, "apply_rotary_pos_emb", None), rope_original)):
                continue      # another RoPE (partial rotary, interleaved, ...): PyTorch's
            if mod not in patch.rope_modules:
                if mod not in _ROPE_USERS:
                    _ROPE_USERS[mod] = [mod.apply_rotary_pos_emb, 0]
                    mod.apply_rotary_pos_emb = _rope_dispatch(mod.apply_rotary_pos_emb)
                _ROPE_USERS[mod][1] += 1
                patch.rope_modules.append(mod)
            patch.forwards.add(module, types.MethodType(_attention_forward, module))
            patch.attentions.append(module)


def kernels_configured(setting: str, device_type: str, compiling: bool) -> bool:
    """Whether `training.kernels` asks for the kernels (before triton and the device are checked):
    triton always; auto on CUDA, unless torch.compile runs (inductor writes its own Triton kernels
    for these ops)."""
    return setting == "triton" or (setting == "auto" and device_type == "cuda" and not compiling)


def kernels_wanted(setting: str, device: torch.device, compiling: bool) -> bool:
    """`training.kernels`: triton, torch, or auto (triton on CUDA when it is installed, unless
    torch.compile runs: inductor then writes its own Triton kernels for these ops). Either way the
    kernels must first pass `kernel_check.self_check` on the device: under auto a failure means
    PyTorch with a warning, under triton an error."""
    if setting == "triton":
        if not triton_importable():
            raise ImportError("training.kernels: triton needs triton: pip install 'lorakit[kernels]' "
                              "(CUDA builds of torch include it), or set training.kernels: torch")
        if device.type != "cuda" and not interpreting():
            raise ValueError(f"training.kernels: triton runs on CUDA, not {device.type}; set training.kernels: "
                             "torch (or auto), or TRITON_INTERPRET=1 to run the kernels in Triton's "
                             "interpreter (slow: for tests)")
        problem = kernel_check.self_check(device)
        if problem:
            raise RuntimeError(f"training.kernels: triton: the Triton kernels failed their check against "
                               f"PyTorch on {device}: {problem}; set training.kernels: torch")
        return True
    if not kernels_configured(setting, device.type, compiling) or not triton_importable():
        return False
    problem = kernel_check.self_check(device)
    if problem:
        warnings.warn(f"training.kernels: auto: the Triton kernels failed their check against PyTorch on "
                      f"{device} ({problem}); this run uses the PyTorch path", stacklevel=2)
        return False
    return True
