"""The conflict lab: its dials do what they say, its data are exact functions of the seed, its
metrics are scale-free, and a grid of comparisons runs from one command."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from gcond_cli.lab import LabMLP, LabProblem, LabProvider, lab_eval_sums, lab_val_batches
from gcond_cli.recipe import load_recipe, recipes_dir
from gcond_cli.run.loop import Trainer

LAB = recipes_dir() / "conflict_lab.yaml"


def _recipe(*overrides: str):
    return load_recipe(LAB, ["device=cpu", *overrides])


def _targets(recipe, count: int = 20000) -> dict[str, torch.Tensor]:
    problem = LabProblem(recipe.data.lab, list(recipe.losses))
    x = torch.randn(count, recipe.data.lab.input_dim, generator=torch.Generator().manual_seed(1))
    return problem.targets(x)


@pytest.mark.parametrize("direction", [0.9, 0.5, 0.0, -0.5, -0.9])
def test_the_targets_correlate_as_the_direction_dial_says(direction):
    targets = _targets(_recipe(f"data.lab.direction={direction}", "data.lab.scale=1"))
    t1, t2 = targets["t1"].flatten(), targets["t2"].flatten()
    correlation = torch.corrcoef(torch.stack([t1, t2]))[0, 1].item()
    assert correlation == pytest.approx(direction, abs=0.05)


@pytest.mark.parametrize("scale", [1.0, 100.0, 1000.0])
def test_the_second_losses_magnitude_is_scale_times_the_first(scale):
    targets = _targets(_recipe(f"data.lab.scale={scale}"))
    # At the start the model predicts about 0, so each loss is its target's mean square.
    ratio = targets["t2"].square().mean() / targets["t1"].square().mean()
    assert ratio.item() == pytest.approx(scale, rel=0.05)


def _measured(tmp_path: Path, *overrides: str, steps: int = 4) -> dict[str, float]:
    """Mean lowest cosine and mean norm ratio of the raw per-loss gradients over a few
    conductor steps of the real training loop."""
    trainer = Trainer(_recipe(*overrides), tmp_path / "run", console=False)
    cosines, ratios = [], []
    for _ in range(steps):
        stats = trainer.train_step()
        cosines.append(stats["min_cosine_sim"])
        ratios.append(stats["raw_norm/t2"] / stats["raw_norm/t1"])
    return {"cosine": sum(cosines) / steps, "ratio": sum(ratios) / steps}


def test_the_dials_move_the_measured_cosine_and_norm_ratio(tmp_path):
    aligned = _measured(tmp_path / "a", "data.lab.direction=0.9", "data.lab.scale=1")
    opposed = _measured(tmp_path / "b", "data.lab.direction=-0.9", "data.lab.scale=1")
    unrelated = _measured(tmp_path / "c", "data.lab.direction=0", "data.lab.scale=1")
    assert aligned["cosine"] > 0.5 and opposed["cosine"] < -0.5
    assert opposed["cosine"] < unrelated["cosine"] < aligned["cosine"]
    scaled = _measured(tmp_path / "d", "data.lab.direction=0", "data.lab.scale=100")
    # Gradients scale with the square root of the loss ratio: about 10 against about 1.
    assert 0.5 < unrelated["ratio"] < 2 and 5 < scaled["ratio"] < 20


def test_validation_is_fixed_and_the_training_stream_follows_the_seed():
    recipe = _recipe()
    problem = LabProblem(recipe.data.lab, ["t1", "t2"])
    first = lab_val_batches(problem, recipe.data, torch.device("cpu"), 256)
    again = lab_val_batches(problem, recipe.data, torch.device("cpu"), 256)
    assert sum(x.shape[0] for x, _ in first) == recipe.data.val_samples
    torch.testing.assert_close(first[0][0], again[0][0], rtol=0, atol=0)

    def stream(seed: int, skip: int = 0) -> torch.Tensor:
        provider = LabProvider(problem, recipe.data, torch.device("cpu"), seed)
        provider.load_state_dict({"micro_batches_served": skip})
        return provider()[0]

    assert not torch.equal(stream(0), stream(1))
    provider = LabProvider(problem, recipe.data, torch.device("cpu"), 0)
    provider(), provider()
    assert provider.state_dict() == {"micro_batches_served": 2}
    torch.testing.assert_close(provider()[0], stream(0, skip=2), rtol=0, atol=0)


def test_errors_are_relative_to_each_targets_variance():
    recipe = _recipe("data.lab.scale=100")
    problem = LabProblem(recipe.data.lab, ["t1", "t2"])
    (x, target), *_ = lab_val_batches(problem, recipe.data, torch.device("cpu"), 1024)
    perfect = lab_eval_sums(target, target, problem)
    assert perfect["err_t1"].item() == 0 and perfect["mean_err"].item() == 0
    zero = {k: torch.zeros_like(v) for k, v in target.items()}
    sums = lab_eval_sums(zero, target, problem)
    count = sums["count"].item()
    # Predicting 0 costs about 1 for every task, whatever its scale.
    for key in ("err_t1", "err_t2", "mean_err"):
        assert sums[key].item() / count == pytest.approx(1.0, abs=0.15)
    model = LabMLP(16, 4, 8, 1, ["t1", "t2"])
    out = model(x)
    assert set(out) == {"t1", "t2"} and out["t1"].shape == (1024, 4)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("data.lab.direction=1.5", "data.lab.direction"),
        ("data.lab.direction=-2", "data.lab.direction"),
        ("data.lab.scale=0.5", "data.lab.scale"),
        ("data.lab.scale=-3", "data.lab.scale"),
        ("model.name=mae_vit", "model.name"),
        ("losses.t1.kind=l1", "losses.t1.kind"),
        ("checkpoint.best_metric=eval/ssim checkpoint.best_mode=max", "checkpoint.best_metric"),
    ],
)
def test_bad_dials_and_mismatched_parts_are_refused_with_exit_2(cli, override, expected):
    result = cli("validate", "conflict_lab", *override.split())
    assert result.exit_code == 2, result.output
    assert expected in result.output
    assert "Traceback" not in result.output


@pytest.mark.slow  # 12 runs and a resume
def test_a_grid_of_comparisons_from_one_command(cli, tmp_path):
    result = cli(
        "compare",
        "conflict_lab",
        "schedule.max_steps=3",
        "schedule.warmup_steps=1",
        "eval.every=3",
        f"log.runs_dir={tmp_path}",
        "--methods",
        "sum,sum-log,conductor",
        "--grid",
        "data.lab.direction=0.5,-0.9",
        "--grid",
        "data.lab.scale=1,100",
        "--name",
        "g",
        "-q",
    )
    assert result.exit_code == 0, result.output
    directory = tmp_path / "conflict_lab" / "compare-g"
    grid = json.loads((directory / "summary.json").read_text())
    labels = [c["cell"] for c in grid["cells"]]
    assert labels == [
        "direction0.5_scale1",
        "direction0.5_scale100",
        "direction-0.9_scale1",
        "direction-0.9_scale100",
    ]
    assert grid["primary_metric"] == "mean_err" and grid["better"] == "min"
    for cell in grid["cells"]:
        cell_dir = directory / cell["cell"]
        summary = json.loads((cell_dir / "summary.json").read_text())
        # Each cell trained with its own dials.
        run = json.loads((cell_dir / "sum" / "seed0" / "summary.json").read_text())
        assert run["steps"] == 3
        recipe = load_recipe(cell_dir / "sum" / "seed0" / "recipe.yaml")
        lab = recipe.data.lab
        assert cell["overrides"] == [
            f"data.lab.direction={lab.direction:g}",
            f"data.lab.scale={lab.scale:g}",
        ]
        assert summary["cell"] == cell["cell"]
        assert set(cell["entries"]) == {"sum", "sum-log", "conductor"}
        assert math.isfinite(cell["entries"]["sum"]["final"]["mean"])
    report = (directory / "report.md").read_text()
    for label in labels:
        assert f"| `{label}` |" in report
        assert f"({label}/report.md)" in report
    # --resume finds every run of every cell finished and writes the same overview again.
    resumed = cli("compare", "--resume", directory, "-q")
    assert resumed.exit_code == 0, resumed.output
    assert resumed.output.count("finished earlier, skipped") == 4 * 3
    again = json.loads((directory / "summary.json").read_text())
    assert [c["entries"] for c in again["cells"]] == [c["entries"] for c in grid["cells"]]
    # The opposed cells conflict on more steps than the aligned ones.
    share = {c["cell"]: c["entries"]["conductor"]["conflict_share"]["mean"] for c in grid["cells"]}
    assert share["direction-0.9_scale1"] > share["direction0.5_scale1"]


def test_bad_grid_options_exit_2_before_anything_runs(cli, tmp_path):
    for grid in ("data.lab.direction", "data.lab.direction=", "data.lab.direction=a/b"):
        result = cli("compare", "conflict_lab", f"log.runs_dir={tmp_path}", "--grid", grid)
        assert result.exit_code == 2, result.output
        assert "--grid" in result.output
    result = cli(
        "compare", "conflict_lab", f"log.runs_dir={tmp_path}", "--grid", "data.lab.scale=1,0.1"
    )
    assert result.exit_code == 2 and "scale0.1: data.lab.scale" in result.output
    assert not (tmp_path / "conflict_lab").exists()
