"""The pure parts of `gcond bench`, on made-up results (nothing timed): rounds merged, ratios to
`sum`, the issue's targets, and the printed table."""

import pytest
from rich.console import Console

from gcond_cli.bench.report import add_ratios, print_report
from gcond_cli.bench.runner import merge_rounds


def _result(name: str, step_ms: float, memory: int | None = 1000, **extra) -> dict:
    return {
        "method": name,
        "step_ms": step_ms,
        "step_ms_all": [step_ms],
        "accumulation_ms": step_ms * 0.9,
        "resolution_ms": step_ms * 0.01,
        "optimizer_ms": step_ms * 0.09,
        "resolution_share": 0.01,
        "peak_memory_bytes": memory,
        "backward_mode": "one backward per micro-batch",
        **extra,
    }


def test_rounds_merge_to_medians_and_the_largest_peak() -> None:
    rounds = [_result("sum", 10.0, 900), _result("sum", 12.0, 1100), _result("sum", 11.0, None)]
    merged = merge_rounds(rounds)
    assert merged["step_ms"] == 11.0 and merged["resolution_share"] == 0.01
    assert merged["peak_memory_bytes"] == 1100
    assert merged["step_ms_all"] == [10.0, 12.0, 11.0]
    assert merged["step_ms_rounds"] == [10.0, 12.0, 11.0]
    error = {"method": "sum", "error": "RuntimeError: out of memory"}
    assert merge_rounds([rounds[0], error]) == error


def test_ratios_to_sum_and_targets() -> None:
    results = {
        "sum": _result("sum", 10.0, 1000),
        "conductor": _result("conductor", 12.0, 1100, resolution_conflict_share=0.02),
        "pcgrad": _result("pcgrad", 15.0, 1200),
        "broken": {"method": "broken", "error": "ValueError: no"},
    }
    targets = add_ratios(results, num_losses=2, num_params=1)
    assert results["conductor"]["time_ratio_to_sum"] == pytest.approx(1.2)
    assert results["conductor"]["memory_ratio_to_sum"] == pytest.approx(1.1)
    assert results["conductor"]["memory_over_sum_bytes"] == 100
    assert "time_ratio_to_sum" not in results["broken"]
    checks = {t["target"]: t["pass"] for t in targets}
    assert checks["conductor step ≤ 1.35 × sum"]
    assert checks["conductor step ≤ pcgrad step"]
    assert checks["conductor: resolution + momentum + write-back ≤ 3 % of the step"]
    # 1100 B > 1.05 · 1000 B + (2·2 + 2) · 1 · 4 B
    assert not checks["conductor: peak memory ≤ sum's + (2K+2)·P·4 B + 5 %"]


def test_the_printed_table() -> None:
    results = {"sum": _result("sum", 10.0), "seq": _result("seq", 11.0)}
    results["seq"]["variant"] = {"method": "conductor", "overrides": ["conductor.x=1"]}
    targets = add_ratios(results, num_losses=2, num_params=10)
    report = {
        "workload": "tiny",
        "num_params": 10,
        "num_losses": 2,
        "accumulation_steps": 2,
        "precision": "fp32",
        "device": {"type": "cpu", "name": "a CPU"},
        "torch": "2.x",
        "rounds": 1,
        "steps": 2,
        "memory": "exact",
        "world_size": 1,
        "strategy": "none",
        "methods": results,
        "targets": targets,
    }
    out = Console(record=True, width=250)
    print_report(out, report)
    text = out.export_text()
    assert "gcond bench: tiny" in text
    assert "seq (conductor: conductor.x=1)" in text and "1.10×" in text
