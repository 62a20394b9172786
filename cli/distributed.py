"""torch.distributed plumbing for runs launched with ``torchrun`` (one process per GPU).

Outside torchrun every function here is a no-op, so the training loop has one code path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def context() -> DistContext:
    """Rank and world size as torchrun sets them in the environment."""
    return DistContext(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )


def init(ctx: DistContext) -> None:
    """Join the process group (NCCL on CUDA, gloo on CPU) once per process."""
    if not ctx.active or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(ctx.local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", ctx.local_rank))
    else:
        dist.init_process_group("gloo")


def wrap(model: nn.Module, ctx: DistContext) -> nn.Module:
    """DistributedDataParallel around the model when several processes train it."""
    if not ctx.active:
        return model
    ids = [ctx.local_rank] if next(model.parameters()).device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def barrier(ctx: DistContext) -> None:
    if ctx.active and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj: T, ctx: DistContext) -> T:
    """Rank 0's value on every rank (e.g. the run directory name chosen from the clock)."""
    if not ctx.active or not dist.is_initialized():
        return obj
    box: list[Any] = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def abort(ctx: DistContext) -> None:
    """A failure on one rank must end all ranks rather than leave them hanging in a collective."""
    if ctx.active and dist.is_initialized():
        dist.destroy_process_group()
        os._exit(1)


def shutdown(ctx: DistContext) -> None:
    if ctx.active and dist.is_initialized():
        dist.destroy_process_group()
