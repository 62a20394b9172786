"""`gcond train` end to end on a tiny recipe: the run directory, TensorBoard, resume."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import (
    IMAGES,
    SCALARS,
    EventAccumulator,
)
from typer.testing import CliRunner

from gcond_cli.app import app
from gcond_cli.run.loop import Trainer
from tests.helpers import TINY

pytestmark = pytest.mark.slow  # integration: end-to-end training runs

runner = CliRunner()


def train(tmp_path: Path, *args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["train", str(TINY), f"log.runs_dir={tmp_path}", *args])
    return result.exit_code, result.output


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    payload = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)
    return payload["model"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("runs")
    code, output = train(root, "--run-name", "full")
    assert code == 0, output
    return root / "tiny" / "full", output


def test_train_writes_a_complete_run_directory(finished_run):
    run_dir, output = finished_run
    for name in ("recipe.yaml", "metrics.jsonl", "summary.json", "checkpoints/latest.pt"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "checkpoints" / "best.pt").is_file()
    assert list(run_dir.glob("events.out.tfevents.*"))
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_steps = [x["step"] for x in lines if x["kind"] == "train"]
    assert train_steps == [1, 2, 3, 4]
    assert [x["step"] for x in lines if x["kind"] == "eval"] == [2, 4]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4
    # How the per-loss gradients were computed is said once and kept.
    mode = "batched backward (per_loss_backward: auto)"
    assert summary["per_loss_backward"] == mode
    assert output.count(f"per-loss gradients: {mode}") == 1
    # The resolved recipe is printed at start and saved.
    assert "accumulation_steps: 2" in output and "run directory" in output
    assert "accumulation_steps: 2" in (run_dir / "recipe.yaml").read_text()


def test_tensorboard_holds_every_statistic_eval_metrics_and_images(finished_run):
    run_dir, _ = finished_run
    events = EventAccumulator(str(run_dir), size_guidance={SCALARS: 0, IMAGES: 0}).Reload()
    tags = set(events.Tags()["scalars"])
    expected = {
        "final_grad_norm",
        "min_cosine_sim",
        "cos/l1_vs_ssim",
        "proj_iters",
        "conflicts/weak",
        "conflicts/main",
        "conflicts/critical",
        "wins/l1",
        "wins/ssim",
        "dominance",
        "raw_norm/l1",
        "norm_ema/ssim",
        "loss/l1",
        "loss/ssim",
        "loss/total",
        "skipped",
        "train/lr",
        "train/samples_per_s",
        "eval/l1",
        "eval/ssim",
        "eval/psnr",
    }
    assert expected <= tags, expected - tags
    assert [e.step for e in events.Scalars("loss/total")] == [1, 2, 3, 4]
    assert {"images/input", "images/masked", "images/reconstruction"} <= set(
        events.Tags()["images"]
    )
    # Hyper-parameters land in the same run, not in a sub-run.
    assert not [p for p in run_dir.iterdir() if p.is_dir() and p.name != "checkpoints"]


def test_an_existing_run_directory_is_never_overwritten(finished_run):
    run_dir, _ = finished_run
    before = (run_dir / "metrics.jsonl").read_bytes()
    code, output = train(run_dir.parent.parent, "--run-name", "full")
    assert code == 2
    assert "already exists" in output
    assert (run_dir / "metrics.jsonl").read_bytes() == before


def test_resume_ends_bit_identical_to_an_uninterrupted_run(tmp_path, monkeypatch):
    # Conductor momentum makes the conductor's own state matter for the result.
    momentum = "conductor.momentum_beta=0.9"
    code, output = train(tmp_path, momentum, "--run-name", "full")
    assert code == 0, output
    full_dir = tmp_path / "tiny" / "full"
    original = Trainer.train_step

    def stop_after_two(self):
        stats = original(self)
        if self.step == 1:  # the loop increments after train_step: this is step 2
            self.stop_signal = signal.SIGINT
        return stats

    monkeypatch.setattr(Trainer, "train_step", stop_after_two)
    code, output = train(tmp_path, momentum, "--run-name", "cut")
    assert code == 130, output
    assert "--resume" in output
    run_dir = tmp_path / "tiny" / "cut"
    assert torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)["step"] == 2

    monkeypatch.setattr(Trainer, "train_step", original)
    code, output = train(tmp_path, "--resume", str(run_dir))
    assert code == 0, output
    resumed, uninterrupted = final_weights(run_dir), final_weights(full_dir)
    assert resumed.keys() == uninterrupted.keys()
    for key in resumed:
        assert torch.equal(resumed[key], uninterrupted[key]), key
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps.count(3) == 1 and max(steps) == 4


@pytest.mark.parametrize("method", ["sum", "conductor-stochastic"])
def test_other_methods_train_through_the_same_loop(tmp_path, method):
    code, output = train(tmp_path, f"conductor.method={method}", "--run-name", method)
    assert code == 0, output
    summary = json.loads((tmp_path / "tiny" / method / "summary.json").read_text())
    assert summary["method"] == method
    assert summary["per_loss_backward"] is None and "per-loss gradients" not in output


def test_benchmark_backward_reports_its_timings(tmp_path):
    run = ("conductor.per_loss_backward=benchmark", "schedule.max_steps=1", "--run-name", "b")
    code, output = train(tmp_path, *run)
    assert code == 0, output
    mode = json.loads((tmp_path / "tiny" / "b" / "summary.json").read_text())["per_loss_backward"]
    assert mode.split(" backward")[0] in ("batched", "sequential")
    assert "per_loss_backward: benchmark; first micro-batch: batched " in mode
    assert " ms, sequential " in mode and mode in output.replace("\n", "")


def test_resume_says_which_command_line_settings_it_ignores(tmp_path, monkeypatch):
    original = Trainer.train_step

    def stop_at_once(self):
        stats = original(self)
        self.stop_signal = signal.SIGTERM
        return stats

    monkeypatch.setattr(Trainer, "train_step", stop_at_once)
    code, _ = train(tmp_path, "--run-name", "r")
    assert code == 130
    monkeypatch.setattr(Trainer, "train_step", original)
    code, output = train(tmp_path, "optimizer.lr=0.5", "--resume", str(tmp_path / "tiny" / "r"))
    assert code == 0, output
    assert "ignored: optimizer.lr" in output
