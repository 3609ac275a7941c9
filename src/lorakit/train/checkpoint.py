"""Checkpoints: everything needed to continue a run exactly where it stopped.

    <out>/checkpoints/step-00000050/
        adapter_config.json, adapter_model.safetensors   the adapter (PEFT format)
        optimizer.safetensors                             optimizer moments and the RNG states
        trainer_state.json                                step, data position, param groups
        config.yaml                                       the resolved run config

A checkpoint is written into a hidden temporary directory and renamed into place, so a run killed
at any moment leaves only complete checkpoints; the oldest beyond `keep_last` are deleted after.
The learning-rate schedule is a pure function of the step and the data order a pure function of
(seed, epoch), so step, position and RNG states are all the state there is. No pickle anywhere.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import LoraError
from ..io import load_adapter_weights, save_adapter

_STEP_DIR = re.compile(r"step-(\d{8})")


@dataclass
class TrainerState:
    step: int
    """Optimizer steps completed."""
    epoch: int
    """Epoch the next micro-batch comes from."""
    position: int
    """Index of the next row within that epoch's order."""
    total_steps: int
    """The run's planned optimizer steps."""


def checkpoint_dir(out_dir: Path, step: int) -> Path:
    return out_dir / "checkpoints" / f"step-{step:08d}"


def list_checkpoints(out_dir: Path) -> list[Path]:
    root = out_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _STEP_DIR.fullmatch(p.name))


def save_checkpoint(out_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: TrainerState,
                    config: dict[str, Any], keep_last: int, adapter_name: str = "default") -> Path:
    target = checkpoint_dir(out_dir, state.step)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        save_adapter(model, tmp, name=adapter_name)
        tensors, groups = _optimizer_tensors(optimizer)
        tensors["rng.cpu"] = torch.get_rng_state()
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng.cuda.{i}"] = s
        save_file(tensors, tmp / "optimizer.safetensors", metadata={"format": "pt"})
        (tmp / "trainer_state.json").write_text(json.dumps({**state.__dict__, "param_groups": groups}, indent=2))
        (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        if target.exists():   # the same step again (a resumed run re-saving): replace it whole
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(out_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    sd = optimizer.state_dict()
    tensors = {}
    for index, per_param in sd["state"].items():
        for key, value in per_param.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"state.{index}.{key}"] = t.detach().to("cpu").contiguous().clone()
    return tensors, sd["param_groups"]


def find_resume_checkpoint(resume: str, out_dir: Path) -> Path | None:
    """`auto`: the newest complete checkpoint in the run directory (None if there is none);
    otherwise the given checkpoint directory, which must exist."""
    if resume == "auto":
        found = list_checkpoints(out_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"resume checkpoint {path} not found (expected {path / 'trainer_state.json'})")
    return path


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    adapter_name: str = "default") -> TrainerState:
    """Restore adapter weights, optimizer state and RNG states in place; return the trainer state."""
    meta = json.loads((path / "trainer_state.json").read_text())
    load_adapter_weights(model, path, adapter_name)
    tensors = load_file(path / "optimizer.safetensors")
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    groups = meta.pop("param_groups")
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError) as e:
        raise LoraError(f"checkpoint {path} does not fit this run's optimizer ({e}); was the config changed?") from None
    torch.set_rng_state(tensors["rng.cpu"])
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    return TrainerState(**meta)


def read_checkpoint_config(path: Path) -> dict[str, Any]:
    return yaml.safe_load((path / "config.yaml").read_text())
