"""`make_plan`: a training config in, its `Plan` out (the stages are in the package docstring)."""


from __future__ import annotations

import dataclasses
import re

import torch

from ..errors import ConfigError
from ..model_io import TORCH_DTYPES
from ..train.config import TrainConfig
from ..train.kernels import kernel_targets, kernels_configured
from .estimate import METHODS, Estimate, Workload, estimate, largest, usable
from .params import (
    arch_of,
    embedding_parameters,
    inject_adapter,
    load_model_config,
    meta_model,
    model_source,
    parameter_report,
    tokenizer_dir,
    trainables_of,
    weights_of,
)
from .result import Fit, Plan
from .suggest import count_data, risk_warnings, suggestions
from .tasks import TASK_RANKS

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(|[KMGT]i?B?)\s*", re.IGNORECASE)
_MAX_BATCH = 1 << 16


def parse_size(text: str) -> int:
    """Bytes from "24GB", "80GiB", "512M" or "24" (GiB). GPU memory is sold in binary units (a
    24 GB card holds 24 GiB), so GB and GiB both mean 2**30."""
    match = _SIZE.fullmatch(text)
    if not match:
        raise ConfigError(f"--memory {text!r} is not a size; write it like 24GB, 80GiB or 512MB")
    unit = match.group(2).upper()[:1] or "G"
    return int(float(match.group(1)) * 1024 ** "KMGT".index(unit) * 1024)


def make_plan(cfg: TrainConfig, *, model: str | None = None, memory: int | None = None, examples: int | None = None,
              task: str | None = None, new_tokens: int = 0, device: str | None = None, padded: bool = True) -> Plan:
    """Plan the run `cfg` describes. `model` replaces cfg.model.name_or_path (a directory, a
    config.json or a hub id); `memory` is the budget in bytes; `examples` replaces counting the
    data; `device` ("cuda" or "cpu") replaces cfg.model.device (auto plans for CUDA); `padded`:
    rows are padded or packed, so attention gets a mask (always assumed by the CLI)."""
    if task is not None and task not in TASK_RANKS:
        raise ConfigError(f"task {task!r} is not one of {', '.join(TASK_RANKS)}")
    if examples is not None and examples < 1:
        raise ConfigError(f"--examples must be >= 1, got {examples}")
    device = device or ("cpu" if cfg.model.device.startswith("cpu") else "cuda")
    if device not in ("cuda", "cpu"):
        raise ConfigError(f"device {device!r}: plan for cuda or cpu")
    dtype = TORCH_DTYPES.get(cfg.model.dtype) or (torch.bfloat16 if device == "cuda" else torch.float32)
    autocast = cfg.training.bf16 is True or (cfg.training.bf16 == "auto" and device == "cuda")
    weight_bytes = dtype.itemsize
    compute_bytes = 2 if autocast or weight_bytes == 2 else 4

    source = model or model_source(cfg.model.name_or_path)
    config = load_model_config(source, cfg.model.revision, cfg.model.trust_remote_code)
    meta = meta_model(config, dtype, cfg.model.trust_remote_code)
    lora = dataclasses.replace(cfg.lora, base_model_name_or_path=cfg.model.name_or_path,
                               task_type=cfg.lora.task_type or "CAUSAL_LM")   # as lorakit train saves it
    injected = inject_adapter(meta, lora)
    params = parameter_report(meta)
    arch, exact = arch_of(meta)
    train = trainables_of(meta, arch)
    weights = weights_of(meta)
    attention = cfg.model.attn_implementation
    kernels = kernels_configured(cfg.training.kernels, device, cfg.training.compile)
    kernel_norms, kernel_mlp = kernel_targets(meta) if kernels else (False, False)
    workload = Workload(cfg.training.micro_batch_size, cfg.data.max_seq_len, weight_bytes, compute_bytes, device,
                        attention, masked=padded and attention != "flash_attention_2",
                        chunked_loss=cfg.training.chunked_loss, kernel_norms=kernel_norms, kernel_mlp=kernel_mlp,
                        kernel_loss=kernels)
    estimates = [estimate(m, gc, arch, workload, weights, train) for m in METHODS for gc in (False, True)]

    fits: list[Fit] = []
    budget = usable(memory, device) if memory is not None else None
    if budget is not None:
        max_seq = getattr(config.get_text_config(), "max_position_embeddings", None) or 1 << 20
        for e in estimates:
            def fits_with(e=e, **change) -> bool:
                changed = dataclasses.replace(workload, **change)
                return estimate(e.method, e.checkpointing, arch, changed, weights, train).total <= budget
            fits.append(Fit(e.method, e.checkpointing, e.total <= budget,
                            largest(lambda b: fits_with(batch=b), 1, _MAX_BATCH),
                            largest(lambda t: fits_with(seq=t), 2, max_seq)))

    data = count_data(cfg, examples, tokenizer_dir(source) if examples is None else None)
    warnings = injected + risk_warnings(cfg, data, params.trainable, embedding_parameters(meta), new_tokens)
    configured = next(f for f in fits if f.method == "lora" and f.checkpointing == cfg.training.gradient_checkpointing) \
        if fits else None
    if configured is not None and not configured.fits:
        warnings.append(_not_fitting(configured, estimates, memory, budget, cfg))
    notes = []
    if not exact:
        notes.append(f"activation memory uses the Llama layer layout: {config.model_type} layers are not modelled "
                     "exactly, so those figures are approximate")
    notes.append("lorakit trains LoRA, and QLoRA with model.quantize_base: nf4 (bitsandbytes NF4); the full "
                 "fine-tuning column is for comparison")
    return Plan(source, config.model_type, exact, workload, cfg.training.gradient_checkpointing, params, estimates,
                memory, budget, fits, data, suggestions(cfg, data, task), warnings, notes)


def _not_fitting(fit: Fit, estimates: list[Estimate], memory: int, budget: int, cfg: TrainConfig) -> str:
    options = []
    if fit.largest_batch:
        options.append(f"training.micro_batch_size={fit.largest_batch} (raise training.grad_accum to keep the batch)")
    if not cfg.training.gradient_checkpointing and any(e.method == "lora" and e.checkpointing and e.total <= budget
                                                       for e in estimates):
        options.append("training.gradient_checkpointing=true")
    if fit.largest_seq:
        options.append(f"data.max_seq_len={fit.largest_seq}")
    options.append("QLoRA, or a larger GPU" if not options else "QLoRA")
    return (f"the LoRA run as configured does not fit {memory / 2**30:g} GiB; try " + ", or ".join(options))
