"""`gcond bench` on the tiny workload: exit code, the JSON report, and the recipe it measures."""

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from gcond_cli.app import app
from gcond_cli.bench.meters import LiveTensorBytes
from gcond_cli.bench.runner import MethodRun
from gcond_cli.bench.workloads import WORKLOADS, bench_losses, bench_recipe
from gcond_cli.methods import method_unavailable
from tests.helpers import TINY

pytestmark = pytest.mark.slow  # integration: timed benchmark runs

runner = CliRunner()
FAST = ["--steps", "2", "--warmup", "1", "--rounds", "1"]


def test_bench_reports_time_memory_and_ratios_of_every_method(tmp_path: Path) -> None:
    methods = ["sum", "conductor", "conductor-stochastic", "pcgrad"]
    out = tmp_path / "bench.json"
    result = runner.invoke(
        app,
        ["bench", "--workload", "tiny", "--methods", ",".join(methods), *FAST, "--json", str(out)],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["device"]["type"] == "cpu" and report["device"]["name"]
    assert report["torch"] and report["num_params"] > 0
    assert (report["num_losses"], report["accumulation_steps"]) == (2, 2)
    assert list(report["methods"]) == methods
    for name in methods:
        r = report["methods"][name]
        assert "error" not in r, r
        assert r["step_ms"] > 0 and len(r["step_ms_all"]) == 2
        assert r["accumulation_ms"] > 0 and r["optimizer_ms"] >= 0
        assert r["time_ratio_to_sum"] > 0
        assert r["peak_memory_bytes"] > 0
        assert r["memory_ratio_to_sum"] is not None and "memory_over_sum_bytes" in r
    assert report["methods"]["sum"]["time_ratio_to_sum"] == pytest.approx(1.0)
    assert report["methods"]["sum"]["resolution_ms"] == 0.0
    conductor = report["methods"]["conductor"]
    assert conductor["resolution_ms"] > 0
    assert conductor["backward_mode"] == "batched"  # "auto"
    stochastic = report["methods"]["conductor-stochastic"]["backward_mode"]
    assert stochastic == report["methods"]["sum"]["backward_mode"] == "one backward per micro-batch"
    assert conductor["resolution_conflict_ms"] > 0
    assert conductor["resolution_conflict_proj_iters"] >= 1  # the made-up gradients conflict
    # CPU memory is counted exactly: the conductor's extra over plain accumulation is its 2K
    # accumulators (+ the update buffer), inside the issue's budget of (2K + 2)·P·4 B + 5 %.
    k, p = report["num_losses"], report["num_params"]
    for name in ("conductor", "conductor-stochastic"):
        extra = report["methods"][name]["memory_over_sum_bytes"]
        base = report["methods"]["sum"]["peak_memory_bytes"]
        assert 2 * k * p * 4 * 0.9 <= extra <= (2 * k + 2) * p * 4 + 0.05 * base, (name, extra)
    assert report["methods"]["conductor"]["memory_over_sum_bytes"] >= 2 * k * p * 4
    targets = {t["target"] for t in report["targets"]}
    assert "conductor step ≤ 1.35 × sum" in targets
    assert "conductor step ≤ pcgrad step" in targets
    assert "step ms" in result.output and "targets" in result.output


def test_bench_a_recipe_with_more_losses_and_micro_batches(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = runner.invoke(
        app,
        [
            "bench",
            str(TINY),
            "model.dim=16",
            "--methods",
            "conductor",
            "-k",
            "3",
            "-n",
            "3",
            *FAST,
            "--json",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert list(report["methods"]) == ["sum", "conductor"]  # sum is always the baseline
    assert report["losses"] == ["l1", "ssim", "mse"]
    assert (report["num_losses"], report["accumulation_steps"]) == (3, 3)
    assert report["recipe"]["model"]["dim"] == 16
    assert report["recipe"]["data"]["dataset"] == "synthetic"


def test_bench_refuses_bad_requests() -> None:
    result = runner.invoke(app, ["bench", "--workload", "vit_mae_225"])
    assert result.exit_code == 2 and "vit_mae_224" in result.output
    result = runner.invoke(app, ["bench", "--workload", "tiny", "model.dimm=3"])
    assert result.exit_code == 2 and "did you mean 'dim'" in result.output
    if method_unavailable("cagrad"):
        result = runner.invoke(app, ["bench", "--workload", "tiny", "--methods", "cagrad"])
        assert result.exit_code == 2 and "cagrad" in result.output


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_every_workload_is_a_valid_recipe(name: str) -> None:
    recipe = bench_recipe(None, ["device=cpu"], workload=name)
    if name == "heads":  # the conflict lab's data: drawn fresh, nothing to make synthetic
        assert recipe.data.dataset == "conflict_lab"
        return
    assert recipe.data.dataset == "synthetic"
    assert recipe.data.train_samples >= recipe.data.micro_batch_size


def test_issue_workload_sizes() -> None:
    vit = bench_recipe(None, [], workload="vit_mae_224")
    assert (vit.data.image_size, vit.model.patch_size, vit.model.dim, vit.model.depth) == (
        224,
        16,
        384,
        12,
    )
    assert vit.data.micro_batch_size == 32 and vit.conductor.accumulation_steps == 8
    mobilenet = bench_recipe(None, [], workload="conv_mobilenet_128")
    assert (mobilenet.model.backbone, mobilenet.data.image_size) == ("mobilenet_v3_small", 128)
    assert mobilenet.data.micro_batch_size == 64
    convnext = bench_recipe(None, [], workload="conv_convnext_128")
    assert (convnext.model.backbone, convnext.data.micro_batch_size) == ("convnext_tiny", 32)


def test_bench_losses() -> None:
    losses = bench_losses(7, 16)
    assert list(losses) == ["l1", "ssim", "mse", "l1_2", "ssim_2", "mse_2", "l1_3"]
    assert losses["l1_2"]["masked_only"] and not losses["l1_3"]["masked_only"]
    assert sum(spec["weight"] for spec in losses.values()) == pytest.approx(1.0)


def bench_with_timed_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, timed_step, rounds: int):
    """`gcond bench` of sum and conductor on the tiny workload, ``MethodRun.timed_step`` replaced
    by ``timed_step(run, original)``; returns the command's output and the JSON report."""
    original = MethodRun.timed_step
    monkeypatch.setattr(MethodRun, "timed_step", lambda run: timed_step(run, original))
    out = tmp_path / "bench.json"
    args = ["--steps", "2", "--warmup", "1", "--rounds", str(rounds), "--json", str(out)]
    result = runner.invoke(app, ["bench", "-w", "tiny", "--methods", "sum,conductor", *args])
    assert result.exit_code == 0, result.output
    return result.output, json.loads(out.read_text())


def test_methods_take_turns_step_by_step_and_timings_are_medians_of_rounds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ran: list[str] = []

    def recording(run: MethodRun, original) -> None:
        ran.append(run.name)
        original(run)

    output, report = bench_with_timed_step(tmp_path, monkeypatch, recording, rounds=3)
    assert report["rounds"] == 3
    for r in report["methods"].values():
        assert len(r["step_ms_rounds"]) == 3 and len(r["step_ms_all"]) == 6
        assert r["step_ms"] == pytest.approx(sorted(r["step_ms_rounds"])[1])
    # Each round builds the methods in a rotated order, then times them step by step, the order
    # rotating each step (after one untimed step of sum that warms the process up).
    builds = [line.split("warm up ")[1] for line in output.splitlines() if "warm up" in line]
    s, c = "sum ...", "conductor ..."
    assert builds == [s, c, c, s, s, c]
    s, c = "sum", "conductor"
    untimed, round1, round2, round3 = [s], [s, c, c, s], [c, s, s, c], [s, c, c, s]
    assert ran == [*untimed, *round1, *round2, *round3]


def test_a_method_that_fails_while_timed_is_reported_and_the_others_go_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(run: MethodRun, original) -> None:
        if run.name == "conductor":
            raise RuntimeError("CUDA out of memory (made up)")
        original(run)

    output, report = bench_with_timed_step(tmp_path, monkeypatch, failing, rounds=1)
    methods = report["methods"]
    error = "RuntimeError: CUDA out of memory (made up)"
    assert methods["conductor"] == {"method": "conductor", "error": error}
    assert methods["sum"]["step_ms"] > 0 and len(methods["sum"]["step_ms_all"]) == 2
    assert "out of memory" in output


def test_live_tensor_bytes_counts_storages_once_and_forgets_freed_ones() -> None:
    meter = LiveTensorBytes(torch.device("cpu"))
    before = torch.ones(10_000)  # made before: not counted
    with meter:
        a = torch.zeros(1000)  # 4,000 B
        view = a.view(10, 100)  # a view: no new storage
        b = torch.ones(500, dtype=torch.float64)  # 4,000 B
        assert (meter.current, meter.peak) == (8000, 8000)
        del a, view
        assert meter.current == 4000  # freed once its last view is gone
        b.resize_(1000)  # grown in place to 8,000 B
        assert (meter.current, meter.peak) == (8000, 8000)
        del b
        w = torch.zeros(1000, requires_grad=True)
        (w * 2 + before[:1000]).sum().backward()  # backward's allocations are seen too
        assert w.grad is not None and meter.current == 8000  # w and w.grad
        assert meter.peak >= 12000  # w * 2 alive with w during the forward
    del w
    assert meter.current == 0


def test_variants_are_measured_beside_the_methods(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    seq = "seq:conductor.per_loss_backward=sequential"
    args = ["--methods", "sum,conductor", "--variant", seq, *FAST, "--json", str(out)]
    result = runner.invoke(app, ["bench", "-w", "tiny", *args])
    assert result.exit_code == 0, result.output
    methods = json.loads(out.read_text())["methods"]
    assert list(methods) == ["sum", "conductor", "seq"]
    assert methods["seq"]["variant"] == {
        "method": "conductor",
        "overrides": ["conductor.per_loss_backward=sequential"],
    }
    assert methods["seq"]["backward_mode"] == "sequential"
    assert (
        methods["conductor"]["backward_mode"] == "batched" and "variant" not in methods["conductor"]
    )
    assert methods["seq"]["time_ratio_to_sum"] > 0
    assert "seq (conductor:" in result.output  # the row names the variant's method


@pytest.mark.parametrize(
    ("variant", "message"),
    [
        ("x:model.dim=8", "changes the workload"),
        ("x:data.image_size=8", "changes the workload"),
        ("conductor:conductor.momentum_beta=0.9", "also a method"),
        ("x:conductor.per_loss_backward=fast", "per_loss_backward"),
        ("x", "expected NAME:KEY=VALUE"),
    ],
)
def test_bad_variants_are_refused(variant: str, message: str) -> None:
    args = ["-w", "tiny", "--methods", "sum,conductor", "--variant", variant, *FAST]
    result = runner.invoke(app, ["bench", *args])
    assert result.exit_code == 2 and message in result.output, result.output
    assert "Traceback" not in result.output


def test_the_heads_workload_has_one_lab_task_per_loss() -> None:
    recipe = bench_recipe(None, [], workload="heads", losses=16)
    assert list(recipe.losses) == [f"t{k}" for k in range(1, 17)]
    assert recipe.model.name == "lab_mlp" and recipe.data.dataset == "conflict_lab"
    assert sum(loss.weight for loss in recipe.losses.values()) == pytest.approx(1.0)


def test_bench_times_the_cheap_modes_on_the_heads_workload(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    variants = [
        "rep:conductor.gradients_at=representation",
        "every2:conductor.resolve_every=2",
    ]
    args = ["bench", "-w", "heads", "--losses", "3", "model.dim=32", "data.micro_batch_size=8"]
    args += ["--methods", "conductor,conductor-stochastic", *FAST, "--json", str(out)]
    result = runner.invoke(app, [*args, *(a for v in variants for a in ("--variant", v))])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert list(report["methods"]) == ["sum", "conductor", "conductor-stochastic", "rep", "every2"]
    assert report["num_losses"] == 3
