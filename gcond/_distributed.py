"""The few collectives the conductor makes under ``torch.distributed`` (DDP)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def is_ddp(model: nn.Module) -> bool:
    return isinstance(model, nn.parallel.DistributedDataParallel)


def distributed(group: Any = None) -> bool:
    """Whether there are other ranks to talk to."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def mean_over_ranks_(tensor: torch.Tensor, group: Any) -> None:
    """In place. Divided before the sum, so that low-precision buffers do not overflow with many
    ranks."""
    tensor.div_(dist.get_world_size(group))
    dist.all_reduce(tensor, group=group)


def on_any_rank(flags: list[bool], group: Any, device: torch.device) -> list[bool]:
    """Element-wise OR of ``flags`` over the ranks: one K-sized collective and a host sync."""
    votes = torch.tensor(flags, dtype=torch.float32, device=device)
    dist.all_reduce(votes, op=dist.ReduceOp.MAX, group=group)
    return [v > 0 for v in votes.tolist()]


def summed_over_ranks(values: list[float], group: Any, device: torch.device) -> list[float]:
    both = torch.tensor(values, device=device)
    dist.all_reduce(both, group=group)
    return both.tolist()
