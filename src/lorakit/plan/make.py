"""`make_plan`: a training config in, its `Plan` out (the stages are in the package docstring)."""


from __future__ import annotations

import dataclasses
import math
import re

import torch
from torch import nn

from .. import inject
from ..errors import ConfigError
from ..model_io import TORCH_DTYPES
from ..train.config import PAIRED_OBJECTIVES, REFERENCE_FREE, TrainConfig
from ..train.distributed import decoder_layers
from ..train.kernels import kernel_targets, kernels_configured
from .estimate import (
    METHOD_LABELS,
    METHODS,
    Estimate,
    Forwards,
    Sharding,
    Workload,
    estimate,
    largest,
    usable,
)
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
              task: str | None = None, new_tokens: int = 0, device: str | None = None, padded: bool = True,
              processes: int = 1) -> Plan:
    """Plan the run `cfg` describes. `model` replaces cfg.model.name_or_path (a directory, a
    config.json or a hub id); `memory` is the budget in bytes; `examples` replaces counting the
    data; `device` ("cuda" or "cpu") replaces cfg.model.device (auto plans for CUDA); `padded`:
    rows are padded or packed, so attention gets a mask (always assumed by the CLI); `processes`:
    how many `training.strategy` ddp or fsdp runs (`--nproc`, as `lorakit train --nproc` takes it;
    1 unless given, whatever the shell's WORLD_SIZE, so a plan reads the same everywhere). The
    memory is then per process."""
    if task is not None and task not in TASK_RANKS:
        raise ConfigError(f"task {task!r} is not one of {', '.join(TASK_RANKS)}")
    if examples is not None and examples < 1:
        raise ConfigError(f"--examples must be >= 1, got {examples}")
    if processes < 1:
        raise ConfigError(f"--nproc must be >= 1, got {processes}")
    strategy = cfg.training.strategy
    if processes > 1 and strategy == "single":
        raise ConfigError(f"--nproc {processes}: training.strategy is single (one process); set "
                          "training.strategy=ddp or training.strategy=fsdp to plan several")
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
    # auto: what transformers picked for the model just built (sdpa, or eager where it has none)
    attention = meta.config._attn_implementation if cfg.model.attn_implementation == "auto" \
        else cfg.model.attn_implementation
    sharding = fsdp_sharding(meta, processes) if strategy == "fsdp" and processes > 1 else None
    kernels = kernels_configured(cfg.training.kernels, device, cfg.training.compile)
    kernel_norms, kernel_mlp = kernel_targets(meta) if kernels else (False, False)
    workload = Workload(cfg.training.micro_batch_size, cfg.data.max_seq_len, weight_bytes, compute_bytes, device,
                        attention, masked=padded and attention != "flash_attention_2",
                        # lorakit.train.loss: the chunked loss does not run under FSDP2
                        chunked_loss=cfg.training.chunked_loss and sharding is None, kernel_norms=kernel_norms,
                        kernel_mlp=kernel_mlp, kernel_loss=kernels,
                        offload=cfg.training.offload_activations and device == "cuda", forwards=forwards_of(cfg))
    # QLoRA trains with training.strategy single only: one process, the whole model, the chunked loss
    setups = {m: (workload, sharding) for m in METHODS}
    setups["qlora"] = (dataclasses.replace(workload, chunked_loss=cfg.training.chunked_loss), None)
    estimates = [estimate(m, gc, arch, setups[m][0], weights, train, setups[m][1])
                 for m in METHODS for gc in (False, True)]

    fits: list[Fit] = []
    budget = usable(memory, device) if memory is not None else None
    positions = getattr(config.get_text_config(), "max_position_embeddings", None)
    if budget is not None:
        # grpo: a row is a prompt shorter than max_seq_len and the sampled tokens, within the positions
        max_seq = max(2, positions - max(workload.forwards.sampled - 1, 0)) if positions else 1 << 20
        for e in estimates:
            def fits_with(e=e, **change) -> bool:
                setup, shards = setups[e.method]
                changed = dataclasses.replace(setup, **change)
                return estimate(e.method, e.checkpointing, arch, changed, weights, train, shards).total <= budget
            seq = largest(lambda t: fits_with(seq=t), 2, max_seq)
            fits.append(Fit(e.method, e.checkpointing, e.total <= budget,
                            largest(lambda b: fits_with(batch=b), 1, _MAX_BATCH), seq,
                            seq_at_position_limit=positions is not None and seq == max_seq))

    data = count_data(cfg, examples, tokenizer_dir(source) if examples is None else None)
    warnings = injected + risk_warnings(cfg, data, params.trainable, embedding_parameters(meta), new_tokens)
    method = "qlora" if cfg.model.quantize_base == "nf4" else "lora"   # the run lorakit train makes
    configured = next(f for f in fits if f.method == method and f.checkpointing == cfg.training.gradient_checkpointing) \
        if fits else None
    if configured is not None and not configured.fits:
        warnings.append(_not_fitting(configured, estimates, memory, budget, cfg))
    notes = []
    if not exact:
        notes.append(f"activation memory uses the Llama layer layout: {config.model_type} layers are not modelled "
                     "exactly, so those figures are approximate")
    if cfg.training.offload_activations and device == "cpu":
        notes.append("training.offload_activations: on the CPU the activations are in host memory already, so it "
                     "changes nothing here")
    notes.append("lorakit trains LoRA, and QLoRA with model.quantize_base: nf4 (bitsandbytes NF4); the full "
                 "fine-tuning column is for comparison")
    return Plan(source, config.model_type, exact, workload, cfg.training.gradient_checkpointing, params, estimates,
                memory, budget, fits, data, suggestions(cfg, data, task), warnings, notes, strategy, processes,
                positions)


def forwards_of(cfg: TrainConfig) -> Forwards:
    """The forwards a micro-batch of `training.objective` runs (lorakit.train.preference, grpo)."""
    objective, pref = cfg.training.objective, cfg.preference
    reference = 0 if objective in REFERENCE_FREE or pref.precompute_reference else 2
    if objective in PAIRED_OBJECTIVES:
        return Forwards(objective, rows=2, reference_rows=reference)
    if objective == "kto":     # the completions and their KL rows, both scored by the reference
        return Forwards(objective, rows=1, reference_rows=reference, scoring_rows=1)
    if objective == "grpo":
        g = cfg.grpo.group_size
        return Forwards(objective, rows=g, reference_rows=g if cfg.grpo.beta > 0 else 0,
                        sampled=cfg.grpo.max_completion_len, top_p=cfg.grpo.top_p)
    return Forwards()


def _not_fitting(fit: Fit, estimates: list[Estimate], memory: int, budget: int, cfg: TrainConfig) -> str:
    """What would make the configured run (`fit`: LoRA, or QLoRA with model.quantize_base nf4) fit."""
    options = []
    if fit.largest_batch:
        options.append(f"training.micro_batch_size={fit.largest_batch} (raise training.grad_accum to keep the batch)")
    if not cfg.training.gradient_checkpointing and any(e.method == fit.method and e.checkpointing
                                                       and e.total <= budget for e in estimates):
        options.append("training.gradient_checkpointing=true")
    if fit.largest_seq:
        options.append(f"data.max_seq_len={fit.largest_seq}")
    if fit.method == "lora" and cfg.training.strategy == "single":   # QLoRA trains in one process only
        options.append("QLoRA, or a larger GPU" if not options else "QLoRA")
    else:
        options.append("a larger GPU")
    return (f"the {METHOD_LABELS[fit.method]} run as configured does not fit {memory / 2**30:g} GiB; try "
            + ", or ".join(options))


def fsdp_sharding(model: nn.Module, processes: int) -> Sharding:
    """What each of `processes` holds when `lorakit.train.distributed` shards `model` (the injected
    meta model) with FSDP2: one group per decoder layer, the rest of the model as the root group;
    each parameter split along dim 0 in `processes` pieces, every one padded to the first's size."""
    layers = [list(layer.parameters()) for layer in decoder_layers(model)]
    in_layers = {id(p) for group in layers for p in group}
    root = [p for p in model.parameters() if id(p) not in in_layers]
    base = {id(p) for p in inject.get_state(model).frozen}   # the model's own parameters, not the adapters'

    def sizes(params: list[nn.Parameter], share) -> tuple[int, int, int]:   # (frozen bytes, trained bytes, base)
        frozen = trained = base_params = 0
        for p in params:
            n = share(p)
            if p.requires_grad:
                trained += n * p.element_size()
            else:
                frozen += n * p.element_size()
            base_params += n if id(p) in base else 0
        return frozen, trained, base_params

    def shard(p: nn.Parameter) -> int:   # elements of the first (largest) piece
        rows = p.shape[0] if p.dim() else 1
        return math.ceil(rows / processes) * (p.numel() // max(rows, 1))

    sharded = sizes(list(model.parameters()), shard)
    per_layer = sorted((sizes(group, torch.Tensor.numel) for group in layers), key=lambda x: x[0] + x[1],
                       reverse=True)
    gathered = [sum(x) for x in zip(sizes(root, torch.Tensor.numel), *per_layer[:2], strict=True)]
    return Sharding(processes, *sharded, *gathered)
