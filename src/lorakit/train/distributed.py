"""Several processes: set-up from torchrun's environment, model wrapping (DDP, or FSDP2 with the
frozen base sharded and the adapters trainable), and the few collectives the loop needs.

A single process is the same code with world size 1: every collective is then a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..errors import ConfigError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device | None = None
    strategy: str = "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def setup(cls, strategy: str, device: torch.device) -> Dist:
        """Join the process group torchrun describes (WORLD_SIZE > 1), or run alone."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls(device=device, strategy="single")
        if strategy == "single":
            raise ConfigError(f"running under torchrun with {world} processes needs training.strategy ddp or fsdp")
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(rank=rank, world=world, local_rank=local_rank, device=device, strategy=strategy)

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the training step calls. The adapters' parameters stay those of `model`."""
        if self.world == 1:
            return model
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            return DistributedDataParallel(model, device_ids=ids)
        from torch.distributed.fsdp import fully_shard

        layers = _decoder_layers(model)
        for layer in layers:
            fully_shard(layer)
        fully_shard(model)
        return model

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum over processes (in place, returned)."""
        if self.world > 1:
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one (transformers keeps them in a ModuleList)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 1
             and len({type(x) for x in m}) == 1]
    return list(max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))) if lists else []
