"""What ``gcond bench`` found: each method's ratios to ``sum`` and the issue's targets, the
report (printed, and written as JSON), from plain data.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from rich.text import Text

import gcond

from ..recipe import Recipe, recipe_to_dict
from ..run import distributed


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


def bench_report(
    resolved: Recipe,
    results: dict[str, dict],
    device: torch.device,
    *,
    precision: str,
    world: int,
    micro_batch_size: int,
    steps: int,
    warmup: int,
    rounds: int,
    data: str,
    memory: str,
) -> dict[str, Any]:
    """The report of a bench: what ran where, each method's results and the targets checked
    (`add_ratios` adds the ratios to ``results`` in place)."""
    sharded_or_ddp = world > 1 or distributed.sharded(resolved.distributed.strategy)
    num_params = next((r["num_params"] for r in results.values() if "num_params" in r), 0)
    targets = add_ratios(results, len(resolved.losses), num_params)
    return {
        "workload": resolved.name,
        "device": {"type": device.type, "name": device_name(device), "index": device.index},
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gcond": gcond.__version__,
        "torchjd": _version("torchjd"),
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "precision": precision,
        "num_params": num_params,
        "num_losses": len(resolved.losses),
        "losses": list(resolved.losses),
        "accumulation_steps": resolved.conductor.accumulation_steps,
        "micro_batch_size": micro_batch_size,
        "image_size": getattr(resolved.data, "image_size", None),
        "steps": steps,
        "warmup": warmup,
        "rounds": rounds,
        "data": data,
        "memory": memory,
        "world_size": world,
        "strategy": resolved.distributed.strategy if sharded_or_ddp else "none",
        "methods": results,
        "targets": targets,
        "recipe": recipe_to_dict(resolved),
    }


def write_report(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")


def device_name(device: torch.device) -> str:
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


def _version(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def print_error(out: Console, message: str) -> None:
    out.print(Text(f"error: {message}", style="bold red"), soft_wrap=True)


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:,.1f} MiB"


def _ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


def print_report(out: Console, report: dict[str, Any]) -> None:
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
