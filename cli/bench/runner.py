"""``gcond bench``: what each method costs per optimizer step on this device, against ``sum``.

Every method trains the same model (same initial weights) on the same micro-batches with the
same optimizer, in this process. Each round builds every method afresh and warms it up alone
(its memory is measured then), then times the methods' optimizer steps in turn, one step of each
at a time, the order rotating each step, each step bracketed by a device synchronisation; every
method is alive during the timed phase. A step is split into

* accumulation: the forwards and backwards of the N micro-batches and the method's one host
  sync (the conductor's reads their Gram matrix), i.e. the method's ``accumulate`` (for the
  sums: their whole step, including its one host sync);
* resolution: the conductor's resolution (or a TorchJD weighting) + merge + momentum +
  write-back of ``p.grad``, i.e. the method's ``finish`` (``step()`` is
  ``finish(accumulate(...))`` for every method, so the two halves are timed apart);
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

import gc
import math
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from ..errors import EXIT_OK, UsageError
from ..methods import METHODS, method_unavailable, per_loss_backward_mode, resolves
from ..options import parse_methods
from ..plugins import PluginRoots, resolve_references
from ..recipe import Recipe
from ..run import distributed
from ..run.build import build_run, precision_name, resolve_device, resolve_precision
from ..run.files import MIN_COSINE
from ..run.parts import build_data
from ..tasks import batch_size
from .meters import Clock, MemoryMeter, conflict_timing, sync
from .report import bench_report, device_name, print_error, print_report, write_report
from .workloads import DATA_POOL, bench_recipe, bench_variants, with_method


def data_pool(
    recipe: Recipe, device: torch.device, components: Mapping[str, Callable[..., Any]]
) -> tuple[Any, list[Any]]:
    """The recipe's data source, and the micro-batches every method cycles through."""
    source = build_data(recipe, device, targets=components)
    provider = source.train()
    return source, [provider() for _ in range(DATA_POOL)]


class MethodRun:
    """One method on a fresh model (same initial weights for every method): a `Run` built and
    warmed up alone, its peak memory measured then; afterwards timed one optimizer step at a
    time, in turn with the other methods' runs (:func:`time_in_turn`)."""

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
        ``pool``: the data source and its micro-batches (`data_pool`)."""
        self.name, self.recipe, self.device = name, recipe, device
        memory = MemoryMeter(device)
        memory.start()
        try:
            source, batches = pool
            self.run = build_run(recipe, device, targets=components, data=source)
            self.clock = Clock(device)
            self.resolves = resolves(self.run.method)  # per-loss gradients, resolved
            cursor = iter(range(1 << 62))
            self.provider = lambda: batches[next(cursor) % len(batches)]
            for _ in range(warmup):
                self._step()
            sync(device)
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

    @property
    def model(self) -> torch.nn.Module:
        return self.run.wrapped

    @property
    def method(self) -> Any:
        return self.run.method

    def _step(self) -> dict[str, float]:
        self.clock.mark("start")
        return self.run.step(self.provider, self.clock.mark)

    def timed_step(self) -> None:
        sync(self.device)
        started = time.perf_counter()
        stats = self._step()
        sync(self.device)
        self.parts["step"].append(time.perf_counter() - started)
        # A sum has nothing to resolve: its whole method step counts as accumulation.
        accumulated = "accumulated" if self.resolves else "finished"
        self.parts["accumulation"].append(self.clock.seconds("start", accumulated))
        resolution = self.clock.seconds("accumulated", "finished") if self.resolves else 0.0
        self.parts["resolution"].append(resolution)
        self.parts["optimizer"].append(self.clock.seconds("finished", "end"))
        if not math.isnan(stats.get(MIN_COSINE, math.nan)):  # NaN: weights reused
            self.cosines.append(stats[MIN_COSINE])
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
        if self.resolves and method.config.gradients_at == "parameters":
            steps = len(self.parts["step"])
            conflict = conflict_timing(method, self.device, max(3, min(steps, 10)))
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
        entries, variant_overrides = _entries(resolved, methods, variants)
        components = resolve_references(resolved, plugins or PluginRoots.from_options())
        device = resolve_device(resolved.device)
        # Under torchrun every rank benchmarks its part of the model (DDP: all of it; FSDP: its
        # shards) on the same micro-batches; rank 0 prints and writes the report.
        ctx = distributed.context()
        distributed.init(ctx, device.type, resolved.distributed.strategy)
        if device.type == "cuda" and ctx.world_size > 1:
            device = torch.device("cuda", ctx.local_rank)
        out.quiet = ctx.rank != 0
        pool = data_pool(resolved, device, components)
    except ValueError as exc:  # settings the builders refuse; other harness errors: app.py
        raise UsageError(str(exc)) from None

    precision = precision_name(resolve_precision(resolved.precision, device)[0])
    n, k = resolved.conductor.accumulation_steps, len(resolved.losses)
    out.print(
        f"bench {resolved.name} on {device_name(device)} ({device}), {precision}: "
        f"N={n} micro-batches of {batch_size(pool[1][0][0])}, K={k} losses, "
        f"{warmup} warm-up + {steps} timed steps per method and round, {rounds} rounds",
        markup=False,
    )
    # One untimed run first: the first method to run would otherwise pay the process's one-time
    # costs (library handles, kernel selection, allocator pools) in time and memory.
    bench_method(
        "sum", resolved, pool, device, steps=1, warmup=max(warmup, 1), components=components
    )
    per_round = measure_rounds(
        entries,
        pool,
        device,
        out,
        steps=steps,
        warmup=warmup,
        rounds=rounds,
        components=components,
        variants=variant_overrides,
    )
    results = {name: merge_rounds(rs) for name, rs in per_round.items()}
    world = _per_rank_memory(results, ctx)
    report = bench_report(
        resolved,
        results,
        device,
        precision=precision,
        world=world,
        micro_batch_size=batch_size(pool[1][0][0]),
        steps=steps,
        warmup=warmup,
        rounds=rounds,
        data=f"{DATA_POOL} micro-batches of the recipe's data on the device, cycled (not "
        "timed); synthetic images for the image data sets",
        memory=MemoryMeter(device).kind,
    )
    print_report(out, report)
    distributed.shutdown(ctx)
    if json_path is not None and ctx.rank == 0:
        write_report(json_path, report)
        out.print(f"written: {json_path}", markup=False)
    return EXIT_OK


def _entries(
    resolved: Recipe, methods: str | None, variants: Sequence[str]
) -> tuple[dict[str, Recipe], dict[str, list[str]]]:
    """The recipe of every method and variant measured, by name (``sum`` first: the baseline),
    and each variant's overrides."""
    names = parse_methods(methods) if methods else [m for m in METHODS if not method_unavailable(m)]
    for name in names:
        reason = method_unavailable(name)
        if reason:
            raise UsageError(reason)
    names = ["sum", *(n for n in names if n != "sum")]  # the baseline, measured first
    entries = {name: with_method(resolved, name) for name in names}
    variant_overrides = {}
    for name, (variant, overrides) in bench_variants(resolved, variants, names).items():
        entries[name], variant_overrides[name] = variant, overrides
    return entries, variant_overrides


def measure_rounds(
    entries: Mapping[str, Recipe],
    pool: tuple[Any, list[Any]],
    device: torch.device,
    out: Console,
    *,
    steps: int,
    warmup: int,
    rounds: int,
    components: Mapping[str, Callable[..., Any]] | None = None,
    variants: Mapping[str, list[str]] | None = None,
) -> dict[str, list[dict]]:
    """Every entry's result of every round, by name; ``variants``: the overrides of the entries
    that are variants, noted in their results.

    Each round builds every method afresh (one after the other, their memory measured alone),
    then times their steps in turn, step by step. Measured one method after the other instead,
    the ratios moved by up to 25 % between passes on a shared GPU, and on a CPU the method run
    right after sum was 6-8 % slower than the same work run later, whichever method it was."""
    names = list(entries)
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
                print_error(out, f"{name}: {per_round[name][-1]['error']}")
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        out.print(
            f"  round {r + 1}/{rounds}: {steps} timed steps of each method, in turn ...",
            markup=False,
        )
        time_in_turn(runs, steps)
        for run in runs:
            per_round[run.name].append(run.result())
            if run.name in (variants or {}):
                per_round[run.name][-1]["variant"] = {
                    "method": run.recipe.conductor.method,
                    "overrides": variants[run.name],
                }
            if run.error is not None:
                print_error(out, f"{run.name}: {run.error}")
        del runs
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return per_round


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
