"""Several processes: set-up from torchrun's environment, model wrapping (DDP, or FSDP2 with the
frozen base sharded and the adapters trainable), and the few collectives the loop needs.

Each process trains on its own slice of every global micro-batch. DDP keeps a whole model per
process and all-reduces the adapters' gradients; FSDP2 (`fully_shard`, per decoder layer and then
the root) keeps one shard of every parameter, frozen base and adapters alike, as DTensors, gathers
a layer's weights for its forward and backward, and reduce-scatters the gradients, so the
optimizer steps on shards. Both average gradients over processes.

A single process is the same code with world size 1: every collective is then a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

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
        """The module the training step calls. FSDP2 shards `model` in place and replaces its
        parameters with DTensor ones, so build the optimizer from `model` after this call."""
        if self.world == 1:
            return model
        if self.strategy == "ddp":
            ids = [self.device.index] if self.device.type == "cuda" else None
            return DistributedDataParallel(model, device_ids=ids)
        mesh = init_device_mesh(self.device.type, (self.world,))
        for layer in decoder_layers(model):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    def describe(self, model: nn.Module) -> str:
        """What each process holds of the wrapped `model`, for the log."""
        if self.strategy == "fsdp":
            total = sum(p.numel() for p in model.parameters())
            local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in model.parameters())
            return f"fsdp: {self.world} processes, each holding {local:,} of {total:,} parameters"
        return f"ddp: {self.world} processes, each holding the whole model"

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum over processes (in place, returned)."""
        if self.world > 1:
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def all_gather(self, value: torch.Tensor) -> list[torch.Tensor]:
        """Every process's `value` (same shape and dtype on all), in rank order, on the CPU."""
        if self.world == 1:
            return [value.cpu()]
        value = value.to(self.device)
        out = [torch.empty_like(value) for _ in range(self.world)]
        dist.all_gather(out, value)
        return [v.cpu() for v in out]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one (transformers keeps them in a ModuleList)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 1
             and len({type(x) for x in m}) == 1]
    return list(max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))) if lists else []
