"""Adapter initialisations from the base weight (PiSSA, OLoRA): the math `LoraLinear` calls.

Both take A (r x d_in) and B (d_out x r) from the base weight W (d_out x d_in), then replace W by
the residual, so that the model's output is unchanged at step 0 while the adapter starts in the
directions of W that matter most:

    PiSSA (`"pissa"`): W = U S V^T;  A = sqrt(S_r / s) V_r^T,  B = U_r sqrt(S_r / s),
        so s B A = U_r S_r V_r^T, the top-r singular part of W. `"pissa_niter_N"` finds it with
        torch's randomized SVD (`svd_lowrank`, N subspace iterations) instead of a full SVD.
    OLoRA (`"olora"`): W = Q R;  A = R[:r],  B = Q[:, :r].

    W <- W - s B A        (from the factors as stored, so rounding them is in the residual)

The SVD and QR run in float32 whatever the weights' dtype. Only Linear / Conv1D layers take these
inits (`rewrites_base`). They change the user's base model, so lorakit applies them only once every
target module has accepted the adapter: a failed add must not leave a rewritten base behind.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .config import PISSA_NITER


def rewrites_base(init: bool | str) -> bool:
    """PiSSA and OLoRA inits replace the base weight by a residual (Linear / Conv1D only)."""
    return isinstance(init, str) and (init == "olora" or init.startswith("pissa"))


def factors(weight: Tensor, init: str, r: int, scaling: float) -> tuple[Tensor, Tensor]:
    """(A (r, d_in), B (d_out, r)) in float32 for `init` ("pissa", "pissa_niter_N" or "olora")
    from weight W (d_out, d_in) in float32."""
    if init == "olora":
        Q, R = torch.linalg.qr(weight)                                  # Q (d_out, k), R (k, d_in)
        return R[:r], Q[:, :r]
    match = PISSA_NITER.fullmatch(init)
    if match is None:
        U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
    else:
        U, S, V = torch.svd_lowrank(weight, q=r, niter=int(match.group(1)))
        Vh = V.t()
    sq = torch.sqrt(S[:r] / scaling)                                    # split sigma evenly, undo s
    return sq[:, None] * Vh[:r], U[:, :r] * sq[None, :]                 # (r, d_in), (d_out, r)


def residual(weight: Tensor, A: Tensor, B: Tensor, scaling: float) -> Tensor:
    """W - s B A, (d_out, d_in) in float32, for weight W (d_out, d_in) in float32."""
    return weight - scaling * (B.float() @ A.float())
