"""One rank of the 2-process gloo group that tests/gcond/test_ddp.py starts (CPU, loopback only).

The model, losses and micro-batches are defined here and imported by the test, so the parent
builds its single-process references from exactly the same pieces. Each rank runs every
scenario and saves what it saw to ``<out_dir>/rank<r>.pt``; the test compares ranks with each
other and with the references.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from gcond import GradientConductor

WORLD_SIZE = 2
MICRO_BATCHES = 3  # N per rank
LR = 0.05
STEPS = 3
MORE_STEPS = 2  # continued after the state_dict round trip
LAMBDAS = {"fit": 1.0, "flip": 0.7, "shrink": 0.3}


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))


def loss_fns(poisoned: Callable[[], bool] = lambda: False) -> dict[str, Any]:
    """Three losses that pull the outputs in conflicting directions; ``fit`` turns NaN whenever
    ``poisoned()`` says so."""

    def fit(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        loss = ((out - t) ** 2).mean()
        return loss * math.nan if poisoned() else loss

    return {
        "fit": fit,
        "flip": lambda out, t: ((out[:, :2] + t[:, :2]) ** 2).mean(),  # the opposite, half-way
        "shrink": lambda out, t: (out**2).mean(),
    }


def micro_batch(rank: int, step: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `index`-th micro-batch of `rank` at optimizer step `step` (5 samples)."""
    g = torch.Generator().manual_seed(1000 * rank + 10 * step + index)
    x = torch.randn(5, 6, generator=g)
    return x, 2.0 * torch.randn(5, 4, generator=g)


def provider(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> Callable[[], Any]:
    it = iter(batches)
    return lambda: next(it)


def rank_batches(rank: int, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [micro_batch(rank, step, i) for i in range(MICRO_BATCHES)]


def conductor(
    model: nn.Module,
    ddp_sync: str,
    accumulation_steps: int = MICRO_BATCHES,
    poisoned: Callable[[], bool] = lambda: False,
    **options: Any,
) -> GradientConductor:
    return GradientConductor(
        model,
        loss_fns(poisoned),
        LAMBDAS,
        accumulation_steps,
        momentum_beta=0.5,
        ddp_sync=ddp_sync,
        **options,
    )


def representation(model: nn.Module) -> dict[str, Any]:
    """Representation mode over ``make_model``'s split (trunk: the first layer and its tanh),
    resolving every other step."""
    module = getattr(model, "module", model)
    split = (module[:2], module[2])
    return {"gradients_at": "representation", "split": split, "resolve_every": 2}


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


# ------------------------------------------------------------------------------ instrumentation


@contextmanager
def counted_all_reduce() -> Iterator[list[tuple[int, ...]]]:
    """Records the shape of every ``torch.distributed.all_reduce`` made inside the block."""
    shapes: list[tuple[int, ...]] = []
    original = dist.all_reduce

    def counting(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        shapes.append(tuple(tensor.shape))
        return original(tensor, *args, **kwargs)

    dist.all_reduce = counting
    try:
        yield shapes
    finally:
        dist.all_reduce = original


def ddp_with_hook_counter(model: nn.Module) -> tuple[nn.Module, list[int]]:
    """DDP around `model`, with a comm hook that records each bucket DDP would all-reduce."""
    ddp = nn.parallel.DistributedDataParallel(model)
    buckets: list[int] = []

    def hook(state, bucket):  # no annotations: DDP checks them, and they are strings here
        buckets.append(bucket.buffer().numel())
        return allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, hook)
    return ddp, buckets


# ------------------------------------------------------------------------------ scenarios


def train(
    conductor_: GradientConductor,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    rank: int,
    steps: range,
) -> dict[str, Any]:
    """Conductor steps + optimizer steps; parameters, stats and all-reduce shapes per step."""
    params, stats, reduces = [], [], []
    for step in steps:
        opt.zero_grad(set_to_none=True)
        with counted_all_reduce() as shapes:
            stats.append(conductor_.step(provider(rank_batches(rank, step))))
        opt.step()
        params.append(flat_params(model))
        reduces.append(shapes)
    return {"params": params, "stats": stats, "all_reduce": reduces}


def scenario_grads(rank: int, out_dir: Path) -> dict[str, Any]:
    model = make_model()
    ddp, buckets = ddp_with_hook_counter(model)
    cond = conductor(ddp, "grads")
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    result = train(cond, model, opt, rank, range(STEPS))
    result["ddp_buckets_during_conductor"] = list(buckets)
    result["state"] = cond.state_dict()

    # Rank 0's state restores every rank: save it, continue, then replay from it.
    checkpoint = out_dir / "grads-state.pt"
    if rank == 0:
        torch.save(
            {"model": model.state_dict(), "opt": opt.state_dict(), "conductor": cond.state_dict()},
            checkpoint,
        )
    dist.barrier()
    more = range(STEPS, STEPS + MORE_STEPS)
    result["continued"] = train(cond, model, opt, rank, more)["params"]

    fresh = make_model(seed=123)
    fresh_ddp = nn.parallel.DistributedDataParallel(fresh)
    fresh_cond = conductor(fresh_ddp, "grads")
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=LR)
    saved = torch.load(checkpoint, weights_only=True)
    fresh.load_state_dict(saved["model"])
    fresh_opt.load_state_dict(saved["opt"])
    fresh_cond.load_state_dict(saved["conductor"])
    result["restored"] = train(fresh_cond, fresh, fresh_opt, rank, more)["params"]

    # The hook does count when DDP's own backward runs: the zero above is not vacuous.
    x, t = micro_batch(rank, 99, 0)
    ((ddp(x) - t) ** 2).mean().backward()
    result["ddp_buckets_plain_backward"] = len(buckets)
    return result


def scenario_mode(rank: int, ddp_sync: str) -> dict[str, Any]:
    model = make_model()
    ddp, buckets = ddp_with_hook_counter(model)
    cond = conductor(ddp, ddp_sync)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    result = train(cond, model, opt, rank, range(STEPS))
    result["ddp_buckets_during_conductor"] = list(buckets)
    result["state_step"] = cond.state_dict()["step"]
    return result


def scenario_representation(rank: int) -> dict[str, Any]:
    model = make_model()
    ddp, buckets = ddp_with_hook_counter(model)
    cond = conductor(ddp, "grads", **representation(ddp))
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    result = train(cond, model, opt, rank, range(STEPS + 1))
    result["ddp_buckets_during_conductor"] = list(buckets)
    result["state"] = cond.state_dict()
    return result


SIGNIFICANT = {"conflicts": "significant", "significance": 0.5}


def scenario_significant(rank: int, at_representation: bool) -> dict[str, Any]:
    """``conflicts="significant"``: every rank decides on the noise of all ranks' micro-batches."""
    model = make_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    options = representation(ddp) if at_representation else {}
    cond = conductor(ddp, "grads", **SIGNIFICANT, **options)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    result = train(cond, model, opt, rank, range(STEPS + 1))
    result["state"] = cond.state_dict()
    return result


def scenario_nan_on_one_rank(rank: int, ddp_sync: str) -> dict[str, Any]:
    """Rank 1's ``fit`` loss is NaN at step 1: every rank must skip that step together."""
    current = {"step": -1}
    model = make_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    cond = conductor(ddp, ddp_sync, poisoned=lambda: rank == 1 and current["step"] == 1)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    params, skipped = [], []
    for step in range(STEPS):
        current["step"] = step
        opt.zero_grad(set_to_none=True)
        stats = cond.step(provider(rank_batches(rank, step)))
        skipped.append(stats["skipped"])
        opt.step()
        params.append(flat_params(model))
    return {"params": params, "skipped": skipped, "state_step": cond.state_dict()["step"]}


def scenario_benchmark(rank: int) -> dict[str, Any]:
    """``per_loss_backward="benchmark"`` with made-up timings that, alone, would send the two
    ranks different ways (rank 0: batched, rank 1: sequential); summed, sequential wins."""
    model = make_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    cond = GradientConductor(
        ddp, loss_fns(), LAMBDAS, MICRO_BATCHES, ddp_sync="grads", per_loss_backward="benchmark"
    )
    cost = {"batched": 1.0, "sequential": 3.0} if rank == 0 else {"batched": 4.0, "sequential": 1.0}
    now = [0.0]

    def costing(fn: Callable[..., Any], way: str) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            now[0] += cost[way]
            return fn(*args, **kwargs)

        return run

    acc = cond.accumulator
    acc._batched_grads = costing(acc._batched_grads, "batched")
    acc._backward_sequential = costing(acc._backward_sequential, "sequential")
    acc._clock = lambda: now[0]
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    result = train(cond, model, opt, rank, range(2))
    result["mode"] = cond.backward_mode
    result["timings"] = cond.backward_timings
    return result


def run(rank: int, out_dir: str) -> None:
    """Entry point for ``torch.multiprocessing.start_processes``."""
    torch.set_num_threads(1)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    out = Path(out_dir)
    dist.init_process_group(
        "gloo", init_method=f"file://{out / 'store'}", rank=rank, world_size=WORLD_SIZE
    )
    try:
        results = {
            "grads": scenario_grads(rank, out),
            "update": scenario_mode(rank, "update"),
            "none": scenario_mode(rank, "none"),
            "nan_grads": scenario_nan_on_one_rank(rank, "grads"),
            "nan_update": scenario_nan_on_one_rank(rank, "update"),
            "benchmark": scenario_benchmark(rank),
            "representation": scenario_representation(rank),
            "significant": scenario_significant(rank, at_representation=False),
            "significant_representation": scenario_significant(rank, at_representation=True),
        }
        torch.save(results, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
