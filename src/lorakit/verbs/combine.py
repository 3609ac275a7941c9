"""`lorakit combine`: adapter directories in, one combined adapter directory out (the math is
`lorakit.compose.combine.combine_adapters`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ..compose.combine import check_options, combine_adapters
from ..errors import LoraError
from ..io import base_model_of, load_adapter, save_adapter
from ..model_io import load_model


def combine_dirs(adapter_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike, weights: Sequence[float],
                 method: str, base: str | None = None, density: float | None = None, majority_sign: str = "total",
                 svd_rank: int | None = None, seed: int | None = None) -> Path:
    """`lorakit combine`: load the base (from the first adapter's config unless `base`) in fp32 on
    the CPU, load the adapters, combine them, and write only the combined adapter to `out_dir`."""
    check_options(len(adapter_dirs), weights, method, density, majority_sign, svd_rank, seed)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LoraError(f"{out} exists and is not an empty directory; remove it or choose another --out")
    base = base or base_model_of(adapter_dirs[0])
    model = load_model(base, dtype="fp32", device="cpu")
    names = [f"adapter{i}" for i in range(len(adapter_dirs))]
    for n, path in zip(names, adapter_dirs, strict=True):
        load_adapter(model, path, name=n, activate=False)
    combine_adapters(model, names, weights, method, "combined", density, majority_sign, svd_rank, seed,
                     activate=False)
    save_adapter(model, out, "combined")
    return out
