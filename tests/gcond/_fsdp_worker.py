"""One rank of the gloo groups that tests/gcond/test_fsdp.py starts (CPU, loopback only).

The model, losses, data and scenarios are defined here and imported by the test, so the parent
builds its single-process references from exactly the same pieces. Rank r of W takes rows
``[r·R/W, (r+1)·R/W)`` of every global micro-batch of R rows; the reference takes them all.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from gcond import GradientConductor

ROWS = 12  # per global micro-batch: divisible by 1, 2 and 4 ranks
MICRO_BATCHES = 3
STEPS = 3
LR = 0.05
LAMBDAS = {"fit": 1.0, "flip": 0.7, "shrink": 0.3}
K = len(LAMBDAS)
POISON_STEP = 1  # the "nan" scenario: a NaN target on the last rank's rows at this step
# Scenarios: ConductorConfig options. Every one has conflicting losses at every step.
SCENARIOS: dict[str, dict[str, Any]] = {
    "zones": {"momentum_beta": 0.5},
    "smooth_trust": {"resolution": "smooth", "momentum_beta": 0.5, "trust_ratio_coef": 0.1},
    "lion_cap": {"momentum_beta": 0.5, "use_lion": True, "norm_cap": 0.5},
    "stochastic": {"accumulation": "stochastic", "momentum_beta": 0.5},
    "nan": {"momentum_beta": 0.5, "noise_statistics": True},
    "scaler": {"momentum_beta": 0.5, "scaler": True},  # a GradScaler (on the CPU, in fp32)
    "significant": {"conflicts": "significant", "significance": 0.5, "scaler": True},
}
RESUME_AT = 2  # the resume scenario saves after this many steps, and runs STEPS + 2 in all
RESUME_OPTIONS = {"momentum_beta": 0.5, "trust_ratio_coef": 0.1}


def make_model(seed: int = 0) -> nn.Module:
    """The last layer has 3 rows: on 2 ranks shards of 2 and 1, on 4 ranks one rank has none."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def shard(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    return fully_shard(model)


def loss_fns() -> dict[str, Any]:
    """Three losses that pull the outputs in conflicting directions."""
    return {
        "fit": lambda out, t: ((out - t) ** 2).mean(),
        "flip": lambda out, t: ((out[:, :2] + t[:, :2]) ** 2).mean(),  # the opposite, half-way
        "shrink": lambda out, t: (out**2).mean(),
    }


def global_batch(step: int, index: int, poison: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10 * step + index)
    x = torch.randn(ROWS, 6, generator=g)
    # Targets around +2: "fit" pulls the outputs up, "flip" two of them down, in every
    # micro-batch, so that even stochastic mode (one loss per micro-batch) conflicts each step.
    t = 2.0 * torch.randn(ROWS, 3, generator=g) + 2.0
    if poison and step == POISON_STEP:
        t[-1, 2] = float("nan")  # "fit" reads it, "flip" does not; a row of the last rank
    return x, t


def provider(step: int, rank: int, world: int, poison: bool = False) -> Callable[[], Any]:
    rows = slice(rank * ROWS // world, (rank + 1) * ROWS // world)
    batches = iter(global_batch(step, i, poison) for i in range(MICRO_BATCHES))
    return lambda: tuple(t[rows] for t in next(batches))


SCALE = 2.0**8  # the GradScaler's: the written p.grad carries it


def conductor(model: nn.Module, scaler: bool = False, **options: Any) -> GradientConductor:
    amp = torch.amp.GradScaler("cpu", init_scale=SCALE) if scaler else None
    return GradientConductor(model, loss_fns(), LAMBDAS, MICRO_BATCHES, scaler=amp, **options)


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t.detach().clone()


def train(
    model: nn.Module,
    cond: GradientConductor,
    steps: range,
    rank: int = 0,
    world: int = 1,
    poison: bool = False,
) -> dict[str, list[Any]]:
    """Per step: the written gradients, the weights after the optimizer, the statistics."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    out: dict[str, list[Any]] = {"grads": [], "params": [], "stats": []}
    for step in steps:
        opt.zero_grad(set_to_none=True)
        out["stats"].append(cond.step(provider(step, rank, world, poison)))
        grads = [torch.zeros(p.shape) if p.grad is None else full(p.grad) for p in cond._params]
        out["grads"].append(torch.cat([g.flatten() for g in grads]))
        if cond.scaler is not None:
            cond.scaler.step(opt)  # unscales p.grad (DTensors: found_inf agreed over the mesh)
            cond.scaler.update()
        else:
            opt.step()
        out["params"].append(torch.cat([full(p).flatten() for p in model.parameters()]))
    return out


def _checkpoint(model: nn.Module, cond: GradientConductor) -> dict[str, Any]:
    return {"model": model.state_dict(), "conductor": cond.state_dict()}


def scenarios(rank: int, world: int, out_dir: Path) -> dict[str, Any]:
    """Every equivalence scenario, the storage, the bad inputs, and a run saved mid-way."""
    result: dict[str, Any] = {}
    for name, options in SCENARIOS.items():
        model = shard(make_model())
        cond = conductor(model, **options)
        result[name] = train(model, cond, range(STEPS), rank, world, poison=name == "nan")
    cond = conductor(shard(make_model()))
    acc, upd = cond.accumulator, cond.updater
    result["storage"] = {
        "local_numel": sum(t.numel() for t in acc._stack_views[0][0]),
        "stack_bytes": sum(s.nbytes for s in acc._stacks),
        "update_bytes": upd.buffer.nbytes,
        "backward_mode": cond.backward_mode,
    }
    result["errors"] = bad_inputs()
    # Resume: the run that never stops, and the checkpoint after RESUME_AT steps.
    model = shard(make_model())
    cond = conductor(model, **RESUME_OPTIONS)
    first = train(model, cond, range(RESUME_AT), rank, world)
    dcp.save(_checkpoint(model, cond), checkpoint_id=str(out_dir / "ckpt"))
    rest = train(model, cond, range(RESUME_AT, STEPS + 2), rank, world)
    result["never_stopped"] = first["params"] + rest["params"]
    return result


def bad_inputs() -> dict[str, str]:
    """The message each unsupported input raises (the same on every rank: nothing waits)."""
    errors = {}
    mixed = make_model()
    from torch.distributed.fsdp import fully_shard

    fully_shard(mixed[0])  # the last layer left unsharded
    cases: dict[str, Callable[[], Any]] = {
        "mixed": lambda: conductor(mixed),
        "ddp_sync": lambda: conductor(shard(make_model()), ddp_sync="update"),
        "batched": lambda: conductor(shard(make_model()), per_loss_backward="batched"),
    }
    for name, build in cases.items():
        try:
            build()
            errors[name] = ""
        except ValueError as e:
            errors[name] = str(e)
    return errors


def resume(rank: int, world: int, out_dir: Path) -> dict[str, Any]:
    model = shard(make_model(seed=1))  # other weights: they must come from the checkpoint
    cond = conductor(model, **RESUME_OPTIONS)
    state = _checkpoint(model, cond)
    dcp.load(state, checkpoint_id=str(out_dir / "ckpt"))
    model.load_state_dict(state["model"])
    cond.load_state_dict(state["conductor"])
    return {"resumed": train(model, cond, range(RESUME_AT, STEPS + 2), rank, world)["params"]}


def run(rank: int, world: int, job: str, out_dir: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        work = {"scenarios": scenarios, "resume": resume}[job]
        result = work(rank, world, Path(out_dir))
    except Exception:
        result = {"error": traceback.format_exc()}
    torch.save(result, Path(out_dir) / f"{job}{world}_rank{rank}.pt")
    dist.destroy_process_group()
