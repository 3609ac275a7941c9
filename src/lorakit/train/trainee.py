"""What a run trains, and how it is saved: one new LoRA adapter (the `lora:` section), or a
mixture of LoRA experts / AdapterFusion over saved adapters (the `mixture:` section).

The loop, the checkpoints and the run directory see only this interface, so a mixture trains,
checkpoints, resumes (exactly) and is written like an adapter:

    attach(model)             put what trains on the base model
    aux_losses(model)         {name: (weight, loss)} added to each micro-batch's loss (mixture of
                              experts: the load-balancing and z losses of that forward)
    gather(model)             everything that trains as whole CPU tensors (a collective under FSDP2)
    write(directory, state)   that state in its own file format (PEFT adapter / mixture directory)
    load_weights(model, dir)  copy a checkpoint's weights back in place (resume)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import Tensor, nn

from .. import inject, io
from ..compose.fusion import add_fusion
from ..compose.mixture import add_mixture, mixture_aux_loss
from ..compose.mixture_files import MixtureFiles, gather_mixture, load_mixture_weights, write_mixture
from .config import TrainConfig

ADAPTER = "default"


class AdapterTrainee:
    """A LoRA adapter named `default`, with fp32 master weights: new, from the `lora:` section, or
    with `training.init_from` a saved adapter's config and weights, trained on (SFT, then DPO)."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.init_from = cfg.training.init_from
        lora = io.read_adapter_config(self.init_from) if self.init_from else cfg.lora
        self.config = dataclasses.replace(lora, base_model_name_or_path=cfg.model.name_or_path,
                                          task_type=lora.task_type or "CAUSAL_LM")
        self.targets = lora.target_modules   # as given, for the model card

    def attach(self, model: nn.Module) -> None:
        inject.add_adapter(model, self.config, ADAPTER, adapter_dtype=torch.float32, initialise=not self.init_from)
        if self.init_from:
            io.load_adapter_weights(model, self.init_from, ADAPTER)
        # saved as resolved (DESIGN: the module names "all-linear" matched, and the fused expert
        # weights, which PEFT's own all-linear does not find; given "all-linear" next to expert
        # parameters, PEFT takes the adapter for a transformers-4 one and doubles the experts' rank)
        resolved = inject.get_adapter_config(model, ADAPTER)
        self.config = dataclasses.replace(self.config, target_modules=resolved.target_modules,
                                          target_parameters=resolved.target_parameters)

    def aux_losses(self, model: nn.Module) -> dict[str, tuple[float, Tensor]]:
        return {}

    def gather(self, model: nn.Module) -> dict[str, Tensor]:
        return io.full_adapter_state_dict(model, ADAPTER)

    def write(self, directory: Path, state: dict[str, Tensor]) -> None:
        io.write_adapter(directory, state, self.config)

    def load_weights(self, model: nn.Module, directory: Path) -> None:
        io.load_adapter_weights(model, directory, ADAPTER)

    title = "LoRA adapter"

    def describe(self) -> str:
        c = self.config
        start = f", started from `{self.init_from}`" if self.init_from else ""
        return (f"adapter r={c.r}, lora_alpha={c.lora_alpha}, dropout={c.lora_dropout}, targets "
                f"`{self.targets}`, rsLoRA={c.use_rslora}, DoRA={c.use_dora}{start}")

    def files(self) -> str:
        return "`adapter_config.json` + `adapter_model.safetensors` (PEFT format)"

    def usage(self, out_dir: str) -> str:
        return (f'import lorakit as lk                      # or: peft.PeftModel.from_pretrained(base, "{out_dir}")\n'
                f'lk.load_adapter(base_model, "{out_dir}")')


class MixtureTrainee:
    """Gates (kind moe) or fusion layers (kind fusion) over the saved adapters of
    `mixture.experts`, loaded under their expert names; the experts train too only with
    `mixture.train_experts` (moe)."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.section = cfg.mixture

    def attach(self, model: nn.Module) -> None:
        m = self.section
        names = list(m.experts)
        for name, directory in m.experts.items():   # fp32 master weights when they train
            io.load_adapter(model, directory, name, trainable=m.train_experts, activate=False,
                            adapter_dtype=torch.float32 if m.train_experts else None)
        if m.kind == "moe":
            add_mixture(model, names, m.moe, trainable=True, train_experts=m.train_experts)
        else:
            add_fusion(model, names, m.fusion, trainable=True)

    def aux_losses(self, model: nn.Module) -> dict[str, tuple[float, Tensor]]:
        m = self.section
        if m.kind != "moe" or not (m.balance_loss or m.z_loss):
            return {}
        losses = mixture_aux_loss(model)
        return {"balance_loss": (m.balance_loss, losses.balance), "z_loss": (m.z_loss, losses.z)}

    def gather(self, model: nn.Module) -> MixtureFiles:
        return gather_mixture(model)

    def write(self, directory: Path, state: MixtureFiles) -> None:
        write_mixture(directory, state)

    def load_weights(self, model: nn.Module, directory: Path) -> None:
        load_mixture_weights(model, directory)

    title = "Mixture of LoRA adapters"

    def describe(self) -> str:
        m = self.section
        detail = (f"top_k={m.moe.top_k}, temperature={m.moe.temperature}, train_experts={m.train_experts}, "
                  f"balance_loss={m.balance_loss}, z_loss={m.z_loss}" if m.kind == "moe" else
                  f"key_dim={m.fusion.key_dim}, value_rank={m.fusion.value_rank}, temperature={m.fusion.temperature}")
        kind = "mixture of LoRA experts" if m.kind == "moe" else "AdapterFusion"
        return f"{kind} over {', '.join(f'`{e}`' for e in m.experts)} ({detail})"

    def files(self) -> str:
        return ("`mixture_config.json` + `mixture_model.safetensors` (the gates or fusion layers) and each "
                "expert in PEFT format in its own folder")

    def usage(self, out_dir: str) -> str:
        return f'import lorakit as lk\nlk.load_mixture(base_model, "{out_dir}")'


Trainee = AdapterTrainee | MixtureTrainee


def trainee_for(cfg: TrainConfig) -> Trainee:
    return MixtureTrainee(cfg) if cfg.mixture.experts else AdapterTrainee(cfg)
