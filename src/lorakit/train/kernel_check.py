"""Each kernel once against its PyTorch reference, on the device a run is about to use.

The kernels (the dropout's included) are tested in CI only in Triton's interpreter; a GPU compiles them with its own
toolchain (Triton version, CUDA, architecture), where a miscompile or an unsupported feature shows
only there. So before `lorakit train` relies on them it runs each one, forward and backward, on a
few small tensors in fp32, bf16 and fp16, and compares with the PyTorch code it replaces. A failure
(an exception, or results off by more than rounding) turns the kernels off for the run with a
warning under `training.kernels: auto`, and is an error under `training.kernels: triton`. About a
second on a GPU, most of it compiling the kernels the run compiles anyway; the result is cached
per device.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from ..kernels.common import on_device_of
from ..ops import pack_bits, unpack_bits

# Within rounding: bf16 (fp16) results are compared at 2^-6 (2^-9) of each tensor's scale (a kernel's rounding
# may differ by a unit in the last place from PyTorch's; a wrong index or sign is off by the scale).
_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2**-6, torch.float16: 2**-9}


def _close(got: Tensor, want: Tensor, dtype: torch.dtype) -> bool:
    scale = want.float().abs().max().clamp_min(1e-6)
    return got.shape == want.shape and bool(((got.float() - want.float()).abs().max() / scale) <= _TOLERANCE[dtype])


def _outputs_and_grads(fn, inputs: list[Tensor], seed: int) -> list[Tensor]:
    """fn's outputs and the gradients of a fixed random projection of them w.r.t. the inputs."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gen = torch.Generator(device=outs[0].device).manual_seed(seed)
    total = sum((o.float() * torch.randn(o.shape, generator=gen, device=o.device)).sum() for o in outs)
    return [o.detach() for o in outs] + list(torch.autograd.grad(total, leaves))


def _cases(device: torch.device, dtype: torch.dtype):
    """(name, kernel function, reference function, inputs) for each kernel."""
    from ..kernels.rms_norm import rms_norm
    from ..kernels.rope import rope
    from ..kernels.swiglu import swiglu

    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape: int) -> Tensor:
        return torch.randn(shape, generator=gen, device=device).to(dtype)

    def norm_reference(x: Tensor, w: Tensor) -> Tensor:
        y = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)
        return w * y.to(x.dtype)

    angles = torch.rand(1, 7, 8, generator=gen, device=device) * 6.3           # (1, S, D/2)
    cos, sin = torch.cat([angles, angles], -1).cos().to(dtype), torch.cat([angles, angles], -1).sin().to(dtype)
    yield "rms_norm", lambda x, w: rms_norm(x, w, 1e-6), norm_reference, [randn(2, 7, 200), randn(200)]
    yield "swiglu", swiglu, lambda g, u: F.silu(g) * u, [randn(5, 300), randn(5, 300)]
    yield ("rope", lambda q, k: rope(q, k, cos, sin), lambda q, k: apply_rotary_pos_emb(q, k, cos, sin),
           [randn(1, 4, 7, 16), randn(1, 2, 7, 16)])


def _cross_entropy_problem(device: torch.device, dtype: torch.dtype) -> str | None:
    from ..kernels.cross_entropy import cross_entropy_rows_

    gen = torch.Generator(device=device).manual_seed(1)
    z = (3 * torch.randn(6, 5000, generator=gen, device=device)).to(dtype)   # > one block of the vocab
    t = torch.randint(0, 5000, (6,), generator=gen, device=device)
    z32 = z.float().requires_grad_()
    want = F.cross_entropy(z32, t, reduction="none")
    (want_grad,) = torch.autograd.grad(want.sum(), z32)
    got = cross_entropy_rows_(z, t, write_grad=True)
    if not (_close(got, want.detach(), torch.float32) and _close(z, want_grad, dtype)):
        return f"cross_entropy ({dtype}) differs from F.cross_entropy"
    return None


def _dropout_problem(device: torch.device, dtype: torch.dtype) -> str | None:
    from ..kernels.dropout import dropout_apply, dropout_pack

    x = torch.randn(64, 203, generator=torch.Generator(device=device).manual_seed(3), device=device).to(dtype)
    xd, bits = dropout_pack(x, 0.5, 17)
    keep = unpack_bits(bits, x.shape).bool()                         # (64, 203)
    rate = keep.float().mean().item()
    if not (torch.equal(bits, pack_bits(keep)) and torch.equal(xd, x * keep)
            and torch.equal(dropout_apply(x, bits), x * keep) and abs(rate - 0.5) < 5 * 0.5 / x.numel() ** 0.5):
        return f"dropout ({dtype}) differs from its mask's bits (kept {rate:.3f} of entries at p=0.5)"
    return None


@functools.cache
def self_check(device: torch.device) -> str | None:
    """None when every kernel matches PyTorch on `device`, else what failed (for the message)."""
    try:
        with torch.enable_grad(), on_device_of(torch.empty(0, device=device)):
            return _first_problem(device)
    except Exception as e:   # a compile or launch failure is a reason to use PyTorch, reported whole
        return f"{type(e).__name__}: {e}"


def _first_problem(device: torch.device) -> str | None:
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for name, kernel, reference, inputs in _cases(device, dtype):
            got = _outputs_and_grads(kernel, inputs, seed=2)
            want = _outputs_and_grads(reference, inputs, seed=2)
            if len(got) != len(want) or not all(_close(g, w, dtype) for g, w in zip(got, want, strict=True)):
                return f"{name} ({dtype}) differs from its PyTorch reference"
        problem = _cross_entropy_problem(device, dtype) or _dropout_problem(device, dtype)
        if problem:
            return problem
    return None
