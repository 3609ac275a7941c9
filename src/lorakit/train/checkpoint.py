"""Checkpoints: everything needed to continue a run exactly where it stopped.

    <out>/checkpoints/step-00000050/
        adapter_config.json, adapter_model.safetensors   the adapter (PEFT format), or a mixture's
                                                          files (lorakit.train.trainee)
        optimizer.safetensors                             optimizer moments and the RNG states
        trainer_state.json                                step, data position, processes, param groups
        config.yaml                                       the resolved run config

A checkpoint is written into a hidden temporary directory and renamed into place, so a run killed
at any moment leaves only complete checkpoints; the oldest beyond `keep_last` are deleted after.
The learning-rate schedule is a pure function of the step and the data order a pure function of
(seed, epoch), so step, position and RNG states are all the state there is. No pickle anywhere.

With several processes every one of them calls `save_checkpoint` (FSDP2 shards are gathered into
whole tensors, and each process's RNG states are collected) and only the main process writes. The
files hold whole tensors, whatever the strategy; on loading, each process reads them and keeps its
shard. Each process draws its own dropout masks, so its RNG states are kept under `rank<N>.` (rank
0's under the plain names, as in a single-process run).
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file
from torch import nn

from ..errors import LoraError
from ..files import atomic_dir, read_safetensors
from ..io import gather_full, shard_like
from .distributed import Dist
from .trainee import Trainee

_STEP_DIR = re.compile(r"step-(\d{8})")


class CheckpointWriteError(LoraError):
    """A checkpoint could not be written (a full disk, say); the ones before it are intact."""


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
    world: int = 1
    """Processes that trained it; the global batch, and so the run, depends on it."""


def checkpoint_dir(out_dir: Path, step: int) -> Path:
    return out_dir / "checkpoints" / f"step-{step:08d}"


def list_checkpoints(out_dir: Path) -> list[Path]:
    root = out_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _STEP_DIR.fullmatch(p.name))


def save_checkpoint(out_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: TrainerState,
                    config: dict[str, Any], keep_last: int, trainee: Trainee, dist: Dist | None = None) -> Path:
    """Write the checkpoint of `state.step` and return its directory. With several processes every
    process must call this (it gathers); only the main one touches the disk."""
    dist = dist or Dist()
    target = checkpoint_dir(out_dir, state.step)
    trained = trainee.gather(model)
    tensors, groups = _optimizer_tensors(optimizer)
    for key, value in _rng_states().items():
        for rank, v in enumerate(dist.all_gather(value)):
            tensors[_rng_key(rank, key)] = v
    if not dist.is_main:
        return target
    try:
        with atomic_dir(target, overwrite=True) as tmp:   # the same step again (a resumed run re-saving): replaced whole
            trainee.write(tmp, trained)
            save_file(tensors, tmp / "optimizer.safetensors", metadata={"format": "pt"})
            (tmp / "trainer_state.json").write_text(json.dumps({**state.__dict__, "param_groups": groups}, indent=2))
            (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    except OSError as e:   # a full disk, a quota, a file system gone read-only: the earlier checkpoints are untouched
        previous = list_checkpoints(out_dir)
        then = (f"the previous checkpoint {previous[-1]} is intact: make room and resume with training.resume=auto"
                if previous else "there is no earlier checkpoint: make room and start again")
        raise CheckpointWriteError(f"could not write the checkpoint of step {state.step} to {target}: "
                                   f"{e.strerror or e}; {then}") from None
    for old in list_checkpoints(out_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    sd = optimizer.state_dict()
    tensors = {}
    for index, per_param in sd["state"].items():
        for key, value in per_param.items():
            tensors[f"state.{index}.{key}"] = gather_full(value if torch.is_tensor(value) else torch.tensor(value))
    return tensors, sd["param_groups"]


def _rng_states() -> dict[str, torch.Tensor]:
    """This process's RNG states: the CPU generator and every visible GPU's."""
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            states[f"cuda.{i}"] = s
    return states


def _rng_key(rank: int, key: str) -> str:
    return f"rng.{key}" if rank == 0 else f"rank{rank}.rng.{key}"


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


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, trainee: Trainee,
                    dist: Dist | None = None) -> TrainerState:
    """Restore the trained weights (adapter or mixture), optimizer state and RNG states in place; return the trainer state.
    With several processes each one calls this and keeps its shards and its own RNG states."""
    dist = dist or Dist()
    meta = json.loads((path / "trainer_state.json").read_text())
    saved_world = meta.get("world", 1)
    if saved_world != dist.world:
        raise LoraError(f"checkpoint {path} was written by a run of {saved_world} process(es) and this run has "
                        f"{dist.world}; the global batch depends on it, so resume with --nproc {saved_world} "
                        "or start a new output.dir")
    trainee.load_weights(model, path)
    tensors = read_safetensors(path / "optimizer.safetensors", "a checkpoint directory holds the optimizer state")
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
    _shard_optimizer_state(optimizer)
    mine = _rng_key(dist.rank, "")
    torch.set_rng_state(tensors[mine + "cpu"])
    n_cuda = sum(k.startswith(mine + "cuda.") for k in tensors)
    if n_cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[f"{mine}cuda.{i}"] for i in range(n_cuda)])
    return TrainerState(**meta)


def _shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """The file holds whole moments; a parameter sharded by FSDP2 needs its moments sharded alike
    (the scalar `step` stays as it is)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            per_param = optimizer.state.get(p, {})
            for key, value in per_param.items():
                if torch.is_tensor(value) and value.shape == p.shape:
                    per_param[key] = shard_like(value, p)


def read_checkpoint_config(path: Path) -> dict[str, Any]:
    return yaml.safe_load((path / "config.yaml").read_text())
