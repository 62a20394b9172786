"""torch.distributed plumbing for runs launched with ``torchrun`` (one process per GPU).

Outside torchrun every function here is a no-op, so the training loop has one code path.
Whatever decides the control flow (the run directory, stopping on a signal) is decided once and
shared, so that every rank takes the same branch and meets the others in the same collectives.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
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


def init(ctx: DistContext, device_type: str, strategy: str = "ddp") -> None:
    """Join the process group once per process: NCCL when training on CUDA (one GPU per local
    rank), gloo on the CPU. The choice follows the recipe's device, not what the machine has.
    FSDP joins a group under torchrun even with one process, so that a sharded checkpoint
    resumes on any number of ranks."""
    launched = "MASTER_ADDR" in os.environ
    if dist.is_initialized() or not (ctx.active or (strategy == "fsdp" and launched)):
        return
    if device_type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")


def sharded(strategy: str) -> bool:
    """Whether this process trains a ``fully_shard`` model (``distributed.strategy: fsdp`` in a
    process group)."""
    return strategy == "fsdp" and dist.is_available() and dist.is_initialized()


def wrap(model: nn.Module, ctx: DistContext, strategy: str = "ddp") -> nn.Module:
    """DistributedDataParallel around the model when several processes train it, or, with
    ``strategy="fsdp"``, the model sharded in place with FSDP2: each module held in an
    ``nn.ModuleList`` (a transformer's blocks) is one ``fully_shard`` unit, gathered for its own
    forward and backward only, and the root takes every other parameter."""
    if sharded(strategy):
        from torch.distributed.fsdp import fully_shard

        for holder in [m for m in model.modules() if isinstance(m, nn.ModuleList)]:
            for block in holder:
                if any(p.requires_grad for p in block.parameters()):
                    fully_shard(block)
        return fully_shard(model)
    if not ctx.active:
        return model
    ids = [ctx.local_rank] if next(model.parameters()).device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def barrier(ctx: DistContext) -> None:
    if ctx.active and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj: T, ctx: DistContext) -> T:
    """Rank 0's value on every rank."""
    if not ctx.active or not dist.is_initialized():
        return obj
    box: list[Any] = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def from_rank0(fn: Callable[[], T], ctx: DistContext) -> T:
    """``fn()`` evaluated on rank 0 alone; its value, or the exception it raised, on every rank
    (e.g. the run directory: named from the clock and checked against the disk once)."""
    if not ctx.active or not dist.is_initialized():
        return fn()
    outcome: tuple[Any, Exception | None] = (None, None)
    if ctx.rank == 0:
        try:
            outcome = (fn(), None)
        except Exception as exc:
            outcome = (None, exc)
    value, error = broadcast_object(outcome, ctx)
    if error is not None:
        raise error
    return value


def any_rank(flag: bool, ctx: DistContext, device: torch.device) -> bool:
    """True on every rank when ``flag`` is True on any of them (a signal may reach one rank, or
    reach the ranks on either side of a step). One-element all-reduce: a host sync."""
    if not ctx.active or not dist.is_initialized():
        return flag
    vote = torch.tensor([float(flag)], device=device)
    dist.all_reduce(vote, op=dist.ReduceOp.MAX)
    return bool(vote.item())


def report_error(ctx: DistContext, message: str) -> None:
    """A failure on a rank other than 0, which prints nothing else: the message, tagged with the
    rank, and the traceback go to stderr (torchrun shows every rank's stderr)."""
    if ctx.rank == 0:
        return
    print(f"error: [rank {ctx.rank}] {message}", file=sys.stderr, flush=True)
    traceback.print_exc(file=sys.stderr)


def abort(ctx: DistContext, exit_code: int = 1) -> None:
    """After a failure, end this process at once when other ranks may be waiting for it.

    A rank blocked in a collective learns of the exit from its closed connections (gloo) or from
    torchrun, which stops the remaining workers when one fails. A regular exit could instead
    hang in the process group's teardown.
    """
    if ctx.active and dist.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)


def shutdown(ctx: DistContext) -> None:
    if ctx.active and dist.is_initialized():
        dist.destroy_process_group()
