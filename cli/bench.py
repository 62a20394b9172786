"""``gcond bench``: what each method costs per optimizer step on this device, against ``sum``.

Every method trains the same model (same initial weights) on the same micro-batches with the
same optimizer, in this process. Each round builds every method afresh and warms it up alone
(its memory is measured then), then times the methods' optimizer steps in turn, one step of each
at a time, the order rotating each step, each step bracketed by a device synchronisation; every
method is alive during the timed phase. A step is split into

* accumulation: the forwards and backwards of the N micro-batches and the one host sync that
  reads their Gram matrix, i.e. ``GradientConductor.accumulate`` (for ``sum``: its whole
  ``step()``, including its one host sync);
* resolution: the conductor's resolution (or a TorchJD weighting) + merge + momentum +
  write-back of ``p.grad``, i.e. ``GradientConductor.finish`` (``step()`` is
  ``finish(accumulate(...))``, so the two public halves are timed apart);
* optimizer: gradient clipping and ``optimizer.step()``.

The split is read from CUDA events on the GPU's timeline (no extra syncs inside the step), or
from ``perf_counter`` on the CPU. Resolution is also timed on made-up conflicting gradients (every
loss at cosine ≈ -0.7 with the first), so its cost is known even when the real losses agree.

Data: a pool of a few synthetic micro-batches, prepared on the device before anything is timed
and cycled, so loading and augmentation are not part of the step. Memory: on CUDA the peak of
``max_memory_allocated`` during the method's steps above what was allocated before the model
was built; on the CPU the peak bytes of live tensor storage created from the model's
construction through the warm-up steps, counted exactly by a dispatch mode that sees every
operator's outputs (the process's resident set says little: freed memory stays mapped, and
pages count only once written).
"""

from __future__ import annotations

import functools
import gc
import json
import math
import platform
import statistics
import sys
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from rich.text import Text
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import gcond
from gcond import GradientConductor

from . import distributed
from .compare import parse_methods, parse_variants
from .errors import UsageError
from .methods import (
    METHODS,
    build_method,
    method_unavailable,
    per_loss_backward_mode,
)
from .plugins import PluginRoots, resolve_references
from .recipe import (
    ImageDataConfig,
    LabDataConfig,
    Recipe,
    load_recipe,
    recipe_from_dict,
    recipe_to_dict,
)
from .run import build_data, build_parts
from .tasks import batch_size
from .train import EXIT_OK, build_optimizer, resolve_device, resolve_precision

DATA_POOL = 2  # distinct micro-batches cycled through (kept small: they count in the memory)
CONFLICT_COSINE = -0.7  # of the made-up gradients resolution is also timed on


def _workload(name: str, size: int, batch: int, patch: int, model: dict, n: int = 8) -> dict:
    return {
        "name": name,
        "seed": 0,
        "data": {
            "dataset": "synthetic",
            "image_size": size,
            "micro_batch_size": batch,
            "mask": {"ratio": 0.75, "patch_size": patch},
        },
        "model": model,
        "losses": {  # as in the bundled MAE recipe and the seed: L1 + SSIM, 0.85 / 0.15
            "l1": {"kind": "l1", "weight": 0.85},
            "ssim": {"kind": "ssim", "weight": 0.15, "win_size": 11 if size >= 11 else 7},
        },
        "conductor": {"accumulation_steps": n},
        "optimizer": {"name": "adamw", "lr": 1e-4},
        "schedule": {"max_steps": 1},
    }


VIT_S = {
    "name": "mae_vit",
    "patch_size": 16,
    "dim": 384,
    "depth": 12,
    "heads": 6,
    "decoder_dim": 256,
    "decoder_depth": 4,
    "decoder_heads": 8,
}
TINY_VIT = {
    "name": "mae_vit",
    "patch_size": 4,
    "dim": 32,
    "depth": 1,
    "heads": 2,
    "decoder_dim": 32,
    "decoder_depth": 1,
    "decoder_heads": 2,
}
WORKLOADS: dict[str, dict] = {
    "vit_mae_224": _workload("vit_mae_224", 224, 32, 16, VIT_S),
    "conv_mobilenet_128": _workload(
        "conv_mobilenet_128", 128, 64, 16, {"name": "masked_conv", "backbone": "mobilenet_v3_small"}
    ),
    "conv_convnext_128": _workload(
        "conv_convnext_128", 128, 32, 16, {"name": "masked_conv", "backbone": "convnext_tiny"}
    ),
    "tiny": _workload("tiny", 16, 4, 4, TINY_VIT, n=2),
    # K cheap heads on a shared MLP trunk that is most of the compute (the conflict lab's model):
    # for the cost per step against K (``--losses K``) of full mode, stochastic accumulation,
    # conductor.gradients_at=representation and conductor.resolve_every=R.
    "heads": {
        "name": "heads",
        "seed": 0,
        "device": "cpu",
        "data": {
            "dataset": "conflict_lab",
            "micro_batch_size": 256,
            "val_samples": 1,
            "lab": {"direction": -0.5, "input_dim": 256, "output_dim": 16},
        },
        "model": {"name": "lab_mlp", "dim": 1024, "depth": 4},
        "losses": {
            "t1": {"kind": "task_mse", "weight": 0.5},
            "t2": {"kind": "task_mse", "weight": 0.5},
        },
        "conductor": {"accumulation_steps": 4},
        "optimizer": {"name": "adamw", "lr": 1e-3},
        "schedule": {"max_steps": 1, "warmup_steps": 0},
        "checkpoint": {"best_metric": "eval/mean_err", "best_mode": "min"},
    },
}


# ---------------------------------------------------------------------------------------------
# The recipe to measure


def bench_losses(count: int, image_size: int) -> dict[str, dict]:
    """K losses for ``--losses K``: l1, ssim, mse, then the same restricted to the masked region,
    and so on; equal weights."""
    kinds, losses = ("l1", "ssim", "mse"), {}
    for i in range(count):
        kind, round_ = kinds[i % 3], i // 3
        spec: dict[str, Any] = {"kind": kind, "weight": 1.0 / count, "masked_only": round_ % 2 == 1}
        if kind == "ssim":
            spec["win_size"] = 11 if image_size >= 11 else 7
        losses[kind if round_ == 0 else f"{kind}_{round_ + 1}"] = spec
    return losses


def bench_recipe(
    recipe: str | None,
    overrides: Sequence[str],
    *,
    workload: str | None,
    accumulation_steps: int | None = None,
    losses: int | None = None,
    dim: int | None = None,
    depth: int | None = None,
) -> Recipe:
    """The recipe or workload with the command's settings, its data made synthetic."""
    if recipe is not None and workload is not None:
        raise UsageError("give a RECIPE or --workload, not both")
    if recipe is not None:
        raw = recipe_to_dict(load_recipe(recipe))
    else:
        if workload is None:
            workload = "vit_mae_224" if torch.cuda.is_available() else "tiny"
        if workload not in WORKLOADS:
            raise UsageError(
                f"--workload: unknown workload {workload!r}, expected one of {', '.join(WORKLOADS)}"
            )
        raw = WORKLOADS[workload]
    options = [f"conductor.accumulation_steps={accumulation_steps}"] if accumulation_steps else []
    options += [f"model.dim={dim}"] if dim else []
    options += [f"model.depth={depth}"] if depth else []
    resolved = recipe_from_dict(raw, [*overrides, *options])
    data = resolved.data
    if isinstance(data, LabDataConfig) and losses:  # K tasks of the lab, one head each
        tasks = {f"t{k + 1}": {"kind": "task_mse", "weight": 1.0 / losses} for k in range(losses)}
        return recipe_from_dict(recipe_to_dict(resolved), ["losses=" + json.dumps(tasks)])
    if not isinstance(data, ImageDataConfig):  # the user's data: measured as it is
        if losses:
            raise UsageError("--losses: only for recipes on an image data set or the lab")
        return resolved
    synthetic = [
        "data.dataset=synthetic",
        "data.download=false",
        f"data.train_samples={data.micro_batch_size * DATA_POOL}",
        "data.val_samples=1",
    ]
    if losses:
        synthetic.append("losses=" + json.dumps(bench_losses(losses, data.image_size)))
    return recipe_from_dict(recipe_to_dict(resolved), synthetic)


# ---------------------------------------------------------------------------------------------
# Measuring


class _Clock:
    """Named marks within one step: CUDA events (GPU timeline, no sync) or perf_counter."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: dict[str, Any] = {}

    def mark(self, name: str) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks[name] = event
        else:
            self.marks[name] = time.perf_counter()

    def seconds(self, start: str, end: str) -> float:
        """Seconds between two marks; call after the device was synchronised."""
        a, b = self.marks[start], self.marks[end]
        return a.elapsed_time(b) / 1000 if self.cuda else b - a


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of tensor storage alive on ``device`` among the storages created while active, and
    their peak: exact where no allocator statistics exist (the CPU). Every operator's outputs pass
    through here (forward, autograd's backward, optimizer); a storage counts once however many
    views share it, and stops counting when it is freed."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.current = self.peak = 0
        self._live: dict[int, tuple[weakref.ref, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # An output sharing an input's storage (a view, an in-place or out= op) is no new
        # allocation: counted only if that storage already is (one made before entering is not).
        inputs = {id(s) for s in map(_storage, tree_leaves((args, kwargs))) if s is not None}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device == self.device:
                self._track(t, inputs)
        return out

    def _track(self, t: torch.Tensor, inputs: set[int]) -> None:
        storage = _storage(t)
        if storage is None:
            return
        key, size = id(storage), storage.nbytes()
        entry = self._live.get(key)
        if entry is None or entry[0]() is not storage:  # not counted yet
            if key in inputs:
                return
            self._live[key] = (weakref.ref(storage, functools.partial(self._freed, key)), size)
            self.current += size
        elif entry[1] != size:  # resized in place
            self._live[key] = (entry[0], size)
            self.current += size - entry[1]
        self.peak = max(self.peak, self.current)

    def _freed(self, key: int, ref: weakref.ref) -> None:
        entry = self._live.get(key)
        if entry is not None and entry[0] is ref:
            del self._live[key]
            self.current -= entry[1]


def _storage(t: Any) -> torch.UntypedStorage | None:
    if not isinstance(t, torch.Tensor):
        return None
    t = getattr(t, "_local_tensor", t)  # a DTensor (FSDP): its shard on this rank
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse and other storage-less layouts
        return None


class _MemoryMeter:
    """Peak memory from the model's construction through the warm-up steps (CPU) or through every
    step (CUDA), above the level at ``start()``.

    CUDA: ``max_memory_allocated``. CPU: :class:`LiveTensorBytes` (exact tensor bytes; it costs
    Python time on every operator, so it watches only the untimed warm-up steps)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = (
            "cuda max_memory_allocated"
            if device.type == "cuda"
            else "peak bytes of live tensor storage (exact), over model build and warm-up"
        )
        self._tracker: LiveTensorBytes | None = None
        self._watching = False
        self._base = 0

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._tracker = LiveTensorBytes(self.device)
            self._tracker.__enter__()
            self._watching = True

    def end_warmup(self) -> None:
        """CPU: stop watching, so the timed steps run without the tracker's overhead (also
        called on the way out of an error)."""
        if self._watching and self._tracker is not None:
            self._watching = False
            self._tracker.__exit__(None, None, None)

    def stop(self) -> int | None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self._base
        if self._tracker is None:
            return None
        self.end_warmup()
        peak, self._tracker = self._tracker.peak, None
        return peak


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _data_pool(
    recipe: Recipe, device: torch.device, components: Mapping[str, Callable[..., Any]]
) -> tuple[Any, list[Any]]:
    """The recipe's data source, and the micro-batches every method cycles through."""
    source = build_data(recipe, device, targets=components)
    provider = source.train()
    return source, [provider() for _ in range(DATA_POOL)]


def _conflict_timing(
    method: GradientConductor, device: torch.device, repeats: int
) -> dict[str, float]:
    """Median seconds of the Gram read + resolution + write-back on gradients that conflict: row
    0 random, every other row at cosine ≈ CONFLICT_COSINE with it (and +0.5 with each other),
    written into the conductor's accumulators."""
    k, p = method.accumulator.stack.shape  # P/world under FSDP
    generator = torch.Generator(device=device).manual_seed(0)
    base = torch.randn(k, p, device=device, generator=generator)
    grads = base.clone()
    a = -CONFLICT_COSINE  # g_k = -a·b_0 + sqrt(1 - a²)·b_k: cos(g_0, g_k) = -a
    grads[1:] = -a * base[0] + (1 - a * a) ** 0.5 * base[1:]
    del base
    times, stats = [], {}
    for _ in range(repeats + 1):  # the first one warms up
        method.accumulator.stack.copy_(grads)
        _sync(device)
        start = time.perf_counter()
        stats = method.finish(method.accumulator.summarize())
        _sync(device)
        times.append(time.perf_counter() - start)
    return {
        "seconds": statistics.median(times[1:]),
        "proj_iters": stats.get("proj_iters", 0.0),
        "min_cosine_sim": stats.get("min_cosine_sim", float("nan")),
    }


VARIANT_KEYS = ("conductor.", "optimizer.", "clip_grad_norm", "precision")


def bench_variants(
    recipe: Recipe, variants: Sequence[str], methods: list[str]
) -> dict[str, tuple[Recipe, list[str]]]:
    """``--variant NAME:KEY=VALUE,...``: the recipe with those overrides, measured beside the
    methods (e.g. ``seq:conductor.per_loss_backward=sequential``). Model and data stay the
    workload's, so only the settings of how a step is taken may change."""
    out = {}
    for name, overrides in parse_variants(variants, methods).items():
        for override in overrides:
            if not override.strip().startswith(VARIANT_KEYS):
                raise UsageError(
                    f"--variant {name}: {override!r} changes the workload; a bench variant may "
                    "set conductor.*, optimizer.*, clip_grad_norm or precision"
                )
        variant = recipe_from_dict(recipe_to_dict(recipe), overrides)
        reason = method_unavailable(variant.conductor.method)
        if reason:
            raise UsageError(reason)
        out[name] = (variant, overrides)
    return out


class MethodRun:
    """One method on a fresh model (same initial weights for every method): built and warmed up
    alone, its peak memory measured then; afterwards timed one optimizer step at a time, in turn
    with the other methods' runs (:func:`time_in_turn`)."""

    def __init__(
        self,
        name: str,
        recipe: Recipe,
        pool: tuple[Any, list[Any]],
        device: torch.device,
        warmup: int,
        components: Mapping[str, Callable[..., Any]] | None = None,
    ) -> None:
        """``name``: the method, or a variant's name (the method is ``recipe.conductor.method``);
        ``pool``: the data source and its micro-batches (`_data_pool`)."""
        self.name, self.recipe, self.device = name, recipe, device
        autocast_dtype, needs_scaler = resolve_precision(recipe.precision, device)
        memory = _MemoryMeter(device)
        memory.start()
        try:
            torch.manual_seed(recipe.seed)
            source, batches = pool
            parts = build_parts(recipe, device, targets=components, data=source)
            self.model = distributed.wrap(
                parts.model, distributed.context(), recipe.distributed.strategy
            )
            loss_fns = parts.loss_fns
            lambdas = {n: c.weight for n, c in recipe.losses.items()}
            self.scaler = torch.amp.GradScaler(device.type, enabled=needs_scaler)
            self.method = build_method(
                recipe.conductor,
                self.model,
                loss_fns,
                lambdas,
                autocast_dtype=autocast_dtype,
                scaler=self.scaler if needs_scaler else None,
                loss_scale=recipe.loss_scale,
            )
            self.optimizer = build_optimizer(recipe.optimizer, self.model)
            self.clock = _Clock(device)
            # A conductor is timed through its two public halves; other methods as a whole.
            self.conductor = self.method if isinstance(self.method, GradientConductor) else None
            cursor = iter(range(1 << 62))
            self.provider = lambda: batches[next(cursor) % len(batches)]
            for _ in range(warmup):
                self._step()
            _sync(device)
            # Watched over build and warm-up only (where the CPU's tracker costs no timed step).
            self.peak = memory.stop() if warmup > 0 else None
        finally:
            memory.end_warmup()
        self.parts: dict[str, list[float]] = {
            "step": [],
            "accumulation": [],
            "resolution": [],
            "optimizer": [],
        }
        self.cosines: list[float] = []
        self.iters: list[float] = []
        self.error: str | None = None

    def _step(self) -> dict[str, float]:
        self.clock.mark("start")
        self.optimizer.zero_grad(set_to_none=True)
        if self.conductor is not None:  # step() is finish(accumulate(...))
            gradients = self.conductor.accumulate(self.provider)
            self.clock.mark("accumulated")
            stats = self.conductor.finish(gradients)
            self.clock.mark("finished")
        else:
            stats = self.method.step(self.provider)
        self.clock.mark("method")
        if self.recipe.clip_grad_norm is not None and not stats["skipped"]:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.recipe.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.clock.mark("end")
        return stats

    def timed_step(self) -> None:
        _sync(self.device)
        started = time.perf_counter()
        stats = self._step()
        _sync(self.device)
        self.parts["step"].append(time.perf_counter() - started)
        timed_apart = self.conductor is not None
        accumulated = "accumulated" if timed_apart else "method"
        self.parts["accumulation"].append(self.clock.seconds("start", accumulated))
        resolution = self.clock.seconds("accumulated", "finished") if timed_apart else 0.0
        self.parts["resolution"].append(resolution)
        self.parts["optimizer"].append(self.clock.seconds("method", "end"))
        if not math.isnan(stats.get("min_cosine_sim", math.nan)):  # NaN: weights reused
            self.cosines.append(stats["min_cosine_sim"])
            self.iters.append(stats.get("proj_iters", 0.0))

    def result(self) -> dict[str, Any]:
        """Medians of the timed steps, memory, and resolution timed on conflicting gradients."""
        if self.error is not None:
            return {"method": self.name, "error": self.error}
        method, weak = self.method, self.recipe.conductor.conflict_thresholds[2]
        medians = {k: statistics.median(v) for k, v in self.parts.items()}
        result: dict[str, Any] = {
            "method": self.name,
            "step_ms": 1000 * medians["step"],
            "step_ms_all": [1000 * t for t in self.parts["step"]],
            # With conductor.resolve_every = R the steps differ (one full in R): the mean over a
            # multiple of R steps is the cost per step, the median is a step between.
            "step_ms_mean": 1000 * statistics.fmean(self.parts["step"]),
            "accumulation_ms": 1000 * medians["accumulation"],
            "resolution_ms": 1000 * medians["resolution"],
            "optimizer_ms": 1000 * medians["optimizer"],
            "resolution_share": medians["resolution"] / medians["step"],
            "peak_memory_bytes": self.peak,
            "num_params": sum(p.numel() for p in self.model.parameters() if p.requires_grad),
            "backward_mode": per_loss_backward_mode(method) or "one backward per micro-batch",
            "conflict_steps": sum(c < weak for c in self.cosines) if self.cosines else None,
            "proj_iters_mean": statistics.fmean(self.iters) if self.iters else None,
        }
        # In representation mode the resolution runs per micro-batch, inside the accumulation
        # timing; there are no K×P accumulators to time it on made-up gradients.
        if self.conductor is not None and self.conductor.config.gradients_at == "parameters":
            steps = len(self.parts["step"])
            conflict = _conflict_timing(self.conductor, self.device, max(3, min(steps, 10)))
            result["resolution_conflict_ms"] = 1000 * conflict["seconds"]
            result["resolution_conflict_share"] = conflict["seconds"] / medians["step"]
            result["resolution_conflict_proj_iters"] = conflict["proj_iters"]
        return result


def time_in_turn(runs: list[MethodRun], steps: int) -> list[str]:
    """``steps`` timed optimizer steps of every run, one step of each in turn, the order rotating
    each step: whatever drifts on a shared machine (clocks, neighbours, the heap) then hits every
    method alike. A run that raises (e.g. out of memory) keeps its error and drops out. Returns
    the order the steps ran in."""
    order = []
    for s in range(steps):
        live = [run for run in runs if run.error is None]
        for run in live[s % max(len(live), 1) :] + live[: s % max(len(live), 1)]:
            try:
                run.timed_step()
            except (ValueError, RuntimeError) as exc:
                run.error = f"{type(exc).__name__}: {exc}"
                if run.device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            order.append(run.name)
    return order


def with_method(recipe: Recipe, method: str) -> Recipe:
    return recipe.model_copy(
        update={"conductor": recipe.conductor.model_copy(update={"method": method})}
    )


def bench_method(
    name: str,
    recipe: Recipe,
    pool: tuple[Any, list[Any]],
    device: torch.device,
    steps: int,
    warmup: int,
    components: Mapping[str, Callable[..., Any]] | None = None,
) -> dict[str, Any]:
    """One method alone: build, warm up, ``steps`` timed steps. ``components``: the user's code
    the recipe names (``plugins.resolve_references``)."""
    run = MethodRun(name, with_method(recipe, name), pool, device, warmup, components)
    time_in_turn([run], steps)
    return run.result()


def merge_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One method's rounds as one result: the median of each timing over the rounds, the largest
    peak memory, every step time."""
    if any("error" in r for r in rounds):
        return next(r for r in rounds if "error" in r)
    merged = dict(rounds[0])
    for key, value in rounds[0].items():
        if key.endswith(("_ms", "_share")) and isinstance(value, float):
            merged[key] = statistics.median(r[key] for r in rounds)
    peaks = [r["peak_memory_bytes"] for r in rounds if r["peak_memory_bytes"] is not None]
    merged["peak_memory_bytes"] = max(peaks) if peaks else None
    merged["step_ms_all"] = [t for r in rounds for t in r["step_ms_all"]]
    merged["step_ms_rounds"] = [r["step_ms"] for r in rounds]
    return merged


def add_ratios(results: dict[str, dict], num_losses: int, num_params: int) -> list[dict]:
    """Ratios of time and memory to ``sum`` in place; returns the issue's targets, checked."""
    base = results.get("sum")
    for r in results.values():
        if "error" in r:
            continue
        r["time_ratio_to_sum"] = r["step_ms"] / base["step_ms"] if base else None
        mem, base_mem = r["peak_memory_bytes"], base and base["peak_memory_bytes"]
        r["memory_ratio_to_sum"] = mem / base_mem if mem is not None and base_mem else None
        r["memory_over_sum_bytes"] = mem - base_mem if mem is not None and base_mem else None

    ok = {n: r for n, r in results.items() if "error" not in r}
    targets: list[dict] = []

    def target(text: str, value: float | None, limit: float) -> None:
        if value is not None:
            targets.append({"target": text, "value": value, "limit": limit, "pass": value <= limit})

    if "conductor-stochastic" in ok:
        target(
            "conductor-stochastic step ≤ 1.05 × sum",
            ok["conductor-stochastic"].get("time_ratio_to_sum"),
            1.05,
        )
    if "conductor" in ok:
        target("conductor step ≤ 1.35 × sum", ok["conductor"].get("time_ratio_to_sum"), 1.35)
        if "pcgrad" in ok:
            ratio = ok["conductor"]["step_ms"] / ok["pcgrad"]["step_ms"]
            target("conductor step ≤ pcgrad step", ratio, 1.0)
    budget_extra = (2 * num_losses + 2) * num_params * 4
    for name in ("conductor", "conductor-stochastic"):
        if name not in ok:
            continue
        r = ok[name]
        target(
            f"{name}: resolution + momentum + write-back ≤ 3 % of the step",
            r["resolution_share"],
            0.03,
        )
        target(
            f"{name}: the same on conflicting gradients ≤ 3 % of the step",
            r.get("resolution_conflict_share"),
            0.03,
        )
        if base and base["peak_memory_bytes"] and r["peak_memory_bytes"] is not None:
            limit = 1.05 * base["peak_memory_bytes"] + budget_extra
            target(
                f"{name}: peak memory ≤ sum's + (2K+2)·P·4 B + 5 %",
                float(r["peak_memory_bytes"]),
                limit,
            )
    return targets


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def run_bench(
    recipe: str | None,
    overrides: Sequence[str],
    *,
    workload: str | None = None,
    methods: str | None = None,
    steps: int = 10,
    warmup: int = 3,
    rounds: int = 3,
    accumulation_steps: int | None = None,
    losses: int | None = None,
    dim: int | None = None,
    depth: int | None = None,
    json_path: Path | None = None,
    variants: Sequence[str] = (),
    plugins: PluginRoots | None = None,
) -> int:
    """``gcond bench``: returns the exit code (0 done); a bad request raises a `GcondError`."""
    isatty = getattr(sys.stdout, "isatty", None)
    out = Console(highlight=False, width=None if isatty and isatty() else 200)
    if recipe is not None and "=" in recipe:  # no RECIPE, only overrides
        overrides, recipe = [recipe, *overrides], None
    try:
        resolved = bench_recipe(
            recipe,
            overrides,
            workload=workload,
            accumulation_steps=accumulation_steps,
            losses=losses,
            dim=dim,
            depth=depth,
        )
        names = (
            parse_methods(methods) if methods else [m for m in METHODS if not method_unavailable(m)]
        )
        for name in names:
            reason = method_unavailable(name)
            if reason:
                raise UsageError(reason)
        names = ["sum", *(n for n in names if n != "sum")]  # the baseline, measured first
        entries = {name: with_method(resolved, name) for name in names}
        variant_overrides = {}
        for name, (variant, overrides) in bench_variants(resolved, variants, names).items():
            entries[name], variant_overrides[name] = variant, overrides
        names = list(entries)
        components = resolve_references(resolved, plugins or PluginRoots.from_options())
        device = resolve_device(resolved.device)
        # Under torchrun every rank benchmarks its part of the model (DDP: all of it; FSDP: its
        # shards) on the same micro-batches; rank 0 prints and writes the report.
        ctx = distributed.context()
        distributed.init(ctx, device.type, resolved.distributed.strategy)
        if device.type == "cuda" and ctx.world_size > 1:
            device = torch.device("cuda", ctx.local_rank)
        out.quiet = ctx.rank != 0
        pool = _data_pool(resolved, device, components)
    except ValueError as exc:  # settings the builders refuse; other harness errors: app.py
        raise UsageError(str(exc)) from None

    autocast_dtype, _ = resolve_precision(resolved.precision, device)
    precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[autocast_dtype]
    n, k = resolved.conductor.accumulation_steps, len(resolved.losses)
    out.print(
        f"bench {resolved.name} on {_device_name(device)} ({device}), {precision}: "
        f"N={n} micro-batches of {batch_size(pool[1][0][0])}, K={k} losses, "
        f"{warmup} warm-up + {steps} timed steps per method and round, {rounds} rounds",
        markup=False,
    )
    # One untimed run first: the first method to run would otherwise pay the process's one-time
    # costs (library handles, kernel selection, allocator pools) in time and memory.
    bench_method(
        "sum", resolved, pool, device, steps=1, warmup=max(warmup, 1), components=components
    )
    # Each round builds every method afresh (one after the other, their memory measured alone),
    # then times their steps in turn, step by step. Measured one method after the other instead,
    # the ratios moved by up to 25 % between passes on a shared GPU, and on a CPU the method run
    # right after sum was 6-8 % slower than the same work run later, whichever method it was.
    per_round: dict[str, list[dict]] = {name: [] for name in names}
    for r in range(rounds):
        runs = []
        for name in names[r % len(names) :] + names[: r % len(names)]:
            if per_round[name] and "error" in per_round[name][-1]:
                continue
            out.print(f"  round {r + 1}/{rounds}: build and warm up {name} ...", markup=False)
            try:
                runs.append(MethodRun(name, entries[name], pool, device, warmup, components))
            except (ValueError, RuntimeError) as exc:  # e.g. stochastic with N < K, OOM
                per_round[name].append({"method": name, "error": f"{type(exc).__name__}: {exc}"})
                _error(out, f"{name}: {per_round[name][-1]['error']}")
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        out.print(
            f"  round {r + 1}/{rounds}: {steps} timed steps of each method, in turn ...",
            markup=False,
        )
        time_in_turn(runs, steps)
        for run in runs:
            per_round[run.name].append(run.result())
            if run.name in variant_overrides:
                per_round[run.name][-1]["variant"] = {
                    "method": run.recipe.conductor.method,
                    "overrides": variant_overrides[run.name],
                }
            if run.error is not None:
                _error(out, f"{run.name}: {run.error}")
        del runs
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    results = {name: merge_rounds(rs) for name, rs in per_round.items()}
    world = _per_rank_memory(results, ctx)
    sharded_or_ddp = world > 1 or distributed.sharded(resolved.distributed.strategy)
    num_params = next((r["num_params"] for r in results.values() if "num_params" in r), 0)
    targets = add_ratios(results, k, num_params)
    report = {
        "workload": resolved.name,
        "device": {"type": device.type, "name": _device_name(device), "index": device.index},
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gcond": gcond.__version__,
        "torchjd": _version("torchjd"),
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "precision": precision,
        "num_params": num_params,
        "num_losses": k,
        "losses": list(resolved.losses),
        "accumulation_steps": n,
        "micro_batch_size": batch_size(pool[1][0][0]),
        "image_size": getattr(resolved.data, "image_size", None),
        "steps": steps,
        "warmup": warmup,
        "rounds": rounds,
        "data": f"{DATA_POOL} micro-batches of the recipe's data on the device, cycled (not "
        "timed); synthetic images for the image data sets",
        "memory": _MemoryMeter(device).kind,
        "world_size": world,
        "strategy": resolved.distributed.strategy if sharded_or_ddp else "none",
        "methods": results,
        "targets": targets,
        "recipe": recipe_to_dict(resolved),
    }
    _print_report(out, report)
    distributed.shutdown(ctx)
    if json_path is not None and ctx.rank == 0:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
        out.print(f"written: {json_path}", markup=False)
    return EXIT_OK


def _per_rank_memory(results: dict[str, dict], ctx: distributed.DistContext) -> int:
    """Under torchrun: each method's peak memory on every rank (``peak_memory_bytes_per_rank``)
    and its largest as ``peak_memory_bytes``. Returns the number of ranks."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 1
    world = dist.get_world_size()
    for r in results.values():
        peaks: list[Any] = [None] * world
        dist.all_gather_object(peaks, r.get("peak_memory_bytes"))
        if "error" not in r:
            r["peak_memory_bytes_per_rank"] = peaks
            known = [p for p in peaks if p is not None]
            r["peak_memory_bytes"] = max(known) if known else None
    return world


def _version(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _error(out: Console, message: str) -> None:
    out.print(Text(f"error: {message}", style="bold red"), soft_wrap=True)


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:,.1f} MiB"


def _ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


def _print_report(out: Console, report: dict[str, Any]) -> None:
    table = Table(
        title=f"gcond bench: {report['workload']}, P = {report['num_params']:,} parameters, "
        f"K = {report['num_losses']}, N = {report['accumulation_steps']}, "
        f"{report['precision']}, {report['device']['name']}, torch {report['torch']}",
        caption=f"medians over {report['rounds']} rounds of {report['steps']} steps; "
        f"memory: {report['memory']}"
        + (
            f"; {report['world_size']} rank(s) ({report['strategy']}): memory of the largest rank"
            if report["strategy"] != "none"
            else ""
        ),
    )
    for title in (
        "method",
        "step ms",
        "× sum",
        "accumulation ms",
        "resolution ms",
        "resolution (conflict) ms",
        "optimizer ms",
        "peak memory",
        "× sum",
        "backward",
    ):
        table.add_column(title, justify="left" if title in ("method", "backward") else "right")
    for name, r in report["methods"].items():
        if "variant" in r:
            name = f"{name} ({r['variant']['method']}: {', '.join(r['variant']['overrides'])})"
        if "error" in r:
            table.add_row(name, Text(r["error"], style="red"))
            continue
        conflict = r.get("resolution_conflict_ms")
        table.add_row(
            name,
            f"{r['step_ms']:.1f}",
            _ratio(r["time_ratio_to_sum"]),
            f"{r['accumulation_ms']:.1f}",
            f"{r['resolution_ms']:.2f} ({r['resolution_share']:.1%})",
            "–" if conflict is None else f"{conflict:.2f} ({r['resolution_conflict_share']:.1%})",
            f"{r['optimizer_ms']:.1f}",
            _mib(r["peak_memory_bytes"]),
            _ratio(r["memory_ratio_to_sum"]),
            r["backward_mode"],
        )
    out.print(table)
    if report["targets"]:
        checks = Table(
            title="targets (issue 6; set for CUDA, bf16)"
            if report["device"]["type"] != "cuda"
            else "targets (issue 6)"
        )
        for title in ("target", "value", "limit", ""):
            checks.add_column(title, justify="left" if title == "target" else "right")
        for t in report["targets"]:
            memory = "memory" in t["target"]
            fmt = _mib if memory else (lambda v: f"{v:.3f}")
            verdict = Text("pass", style="green") if t["pass"] else Text("FAIL", style="bold red")
            checks.add_row(t["target"], fmt(t["value"]), fmt(t["limit"]), verdict)
        out.print(checks)
