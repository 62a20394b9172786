"""`gcond compare` end to end on the tiny recipe (its argument grammar: test_options.py; its
summary and report: test_compare_report.py)."""

import json
import signal
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import (
    SCALARS,
    TENSORS,
    EventAccumulator,
)
from typer.testing import CliRunner

from gcond_cli.app import app
from gcond_cli.run.loop import Trainer
from tests.helpers import TINY

pytestmark = pytest.mark.slow  # integration: end-to-end comparisons

FAST = ["schedule.max_steps=2", "eval.every=1", "checkpoint.every=1"]
METHODS = ["conductor", "sum"]
SEEDS = [0, 1]
VARIANT = "seed-momentum:conductor.momentum_beta=0.9,optimizer.betas=[0.0,0.95]"
runner = CliRunner()


def _compare(runs: Path, *args: str):
    return runner.invoke(app, ["compare", str(TINY), *FAST, f"log.runs_dir={runs}", "-q", *args])


@pytest.fixture(scope="module")
def compared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    runs = tmp_path_factory.mktemp("runs")
    result = _compare(
        runs, "--methods", ",".join(METHODS), "--seeds", "2", "--variant", VARIANT, "--name", "t"
    )
    assert result.exit_code == 0, result.output
    directory = runs / "tiny" / "compare-t"
    return directory, json.loads((directory / "summary.json").read_text())


def test_every_method_and_variant_runs_every_seed(compared: tuple[Path, dict]) -> None:
    directory, summary = compared
    entries = [*METHODS, "seed-momentum"]
    assert [e["name"] for e in summary["entries"]] == entries
    assert summary["seeds"] == SEEDS
    for name in entries:
        for seed in SEEDS:
            run = summary["runs"][name][str(seed)]
            assert run["steps"] == 2 and run["seed"] == seed
            assert set(run["eval_final"]) >= {"eval/l1", "eval/ssim", "eval/psnr"}
            assert (directory / name / f"seed{seed}" / "summary.json").is_file()
        row = summary["results"][name]
        assert len(row["final/ssim"]["values"]) == len(SEEDS)
        assert row["step_seconds"]["mean"] > 0
    assert summary["results"]["sum"]["ratio_to_sum"]["mean"] == pytest.approx(1.0)
    # Conflict statistics for the conductor (raw cosines), none for plain accumulation.
    assert 0.0 <= summary["results"]["conductor"]["conflict_share"]["mean"] <= 1.0
    assert summary["results"]["sum"]["conflict_share"] is None
    variant = summary["entries"][2]
    assert variant["variant"] and variant["method"] == "conductor"
    assert variant["overrides"] == ["conductor.momentum_beta=0.9", "optimizer.betas=[0.0,0.95]"]
    assert summary["runs"]["seed-momentum"]["0"] != summary["runs"]["conductor"]["0"]


def test_every_method_sees_the_same_first_micro_batch(compared: tuple[Path, dict]) -> None:
    _, summary = compared
    check = summary["data_check"]
    assert check["identical"] and not summary["warnings"]
    per_seed = check["first_batch_sha256"]
    for seed in SEEDS:
        assert len(set(per_seed[str(seed)].values())) == 1
        assert None not in per_seed[str(seed)].values()
    assert per_seed["0"]["sum"] != per_seed["1"]["sum"]  # the data follow the seed


def test_tensorboard_events_for_every_run_and_a_compare_layout(
    compared: tuple[Path, dict],
) -> None:
    directory, summary = compared
    for name in summary["runs"]:
        for seed in SEEDS:
            events = EventAccumulator(
                str(directory / name / f"seed{seed}"), size_guidance={SCALARS: 0}
            )
            events.Reload()
            tags = events.Tags()["scalars"]
            assert {"eval/ssim", "eval/psnr", "loss/total"} <= set(tags)
            assert [e.step for e in events.Scalars("loss/total")] == [1, 2]
    root = EventAccumulator(str(directory), size_guidance={TENSORS: 0})
    root.Reload()
    assert "custom_scalars__config__" in root.Tags()["tensors"]


def test_report_and_table(compared: tuple[Path, dict]) -> None:
    directory, summary = compared
    report = (directory / "report.md").read_text()
    assert "| method | final l1 | final ssim | final psnr |" in report
    for name in summary["runs"]:
        assert f"| {name}" in report
    assert "`conductor.momentum_beta=0.9`, `optimizer.betas=[0.0,0.95]`" in report
    assert "Every entry of a seed saw the same first micro-batch" in report


def test_verdicts_against_sum_paired_by_seed(compared: tuple[Path, dict]) -> None:
    directory, summary = compared
    assert summary["baseline"] == "sum" and summary["primary_metric"] == "ssim"
    assert set(summary["verdicts"]) == {"conductor", "seed-momentum"}
    for name, per_metric in summary["verdicts"].items():
        assert set(per_metric) == {"l1", "ssim", "psnr"}
        for metric, verdict in per_metric.items():
            ours = summary["runs"][name]
            theirs = summary["runs"]["sum"]
            diffs = [
                ours[str(s)]["eval_final"][f"eval/{metric}"]
                - theirs[str(s)]["eval_final"][f"eval/{metric}"]
                for s in SEEDS
            ]
            assert verdict["mean"] == pytest.approx(sum(diffs) / 2)
            assert verdict["seeds"] == 2
            assert verdict["low"] <= verdict["mean"] <= verdict["high"]
            inside = verdict["low"] <= 0 <= verdict["high"]
            assert (verdict["label"] == "within noise") == inside
    assert [line.split(":")[0] for line in summary["sentences"]] == [
        "conductor vs sum",
        "seed-momentum vs sum",
    ]
    assert "SSIM" in summary["sentences"][0] and "2 seeds" in summary["sentences"][0]
    assert "losses conflicted on" in summary["sentences"][0]
    report = (directory / "report.md").read_text()
    assert "## Does it beat `sum`?" in report
    assert all(line in report for line in summary["sentences"])


def test_norm_ratio_next_to_the_cosines(compared: tuple[Path, dict]) -> None:
    _, summary = compared
    run = summary["runs"]["conductor"]["0"]
    assert run["norm_ratio"]["max_ratio"] >= run["norm_ratio"]["mean_ratio"] >= 1.0
    assert summary["runs"]["sum"]["0"]["norm_ratio"] is None
    assert summary["results"]["conductor"]["norm_ratio"]["mean"] >= 1.0


def test_plots_are_written_and_embedded(compared: tuple[Path, dict]) -> None:
    directory, summary = compared
    plots = summary["plots"]
    assert plots, summary["warnings"]
    report = (directory / "report.md").read_text()
    for title, file_name in plots.items():
        assert (directory / file_name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"![{title}]({file_name})" in report


def test_paths_in_the_report_are_as_typed_or_relative(compared: tuple[Path, dict]) -> None:
    directory, summary = compared
    assert summary["source"] == "tests/recipes/tiny.yaml"
    assert "tensorboard --logdir ." in (directory / "report.md").read_text()


def test_resume_skips_finished_runs(compared: tuple[Path, dict]) -> None:
    directory, _ = compared
    result = runner.invoke(app, ["compare", "--resume", str(directory)])
    assert result.exit_code == 0, result.output
    assert result.output.count("finished earlier, skipped") == 6
    refused = runner.invoke(app, ["compare", "--resume", str(directory), "--seeds", "3"])
    assert refused.exit_code == 2 and "--seeds 2" in refused.output


def test_a_compare_interrupted_in_its_third_run_continues_there(
    compared: tuple[Path, dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    reference_dir, reference = compared
    runs = reference_dir.parent.parent
    steps = {"count": 0}
    train_step = Trainer.train_step

    def interrupted_step(self: Trainer) -> dict[str, float]:
        stats = train_step(self)
        steps["count"] += 1
        if steps["count"] == 5:  # run 3 (conductor, seed 1), its first step: as if Ctrl-C
            self.stop_signal = signal.SIGINT
        return stats

    monkeypatch.setattr(Trainer, "train_step", interrupted_step)
    result = _compare(runs, "--methods", "conductor,sum", "--seeds", "2", "--name", "i")
    assert result.exit_code == 130, result.output
    directory = runs / "tiny" / "compare-i"
    assert "gcond compare --resume" in result.output
    third = directory / "conductor" / "seed1"
    assert (third / "checkpoints" / "latest.pt").is_file()
    assert not (third / "summary.json").exists()

    monkeypatch.setattr(Trainer, "train_step", train_step)
    result = runner.invoke(app, ["compare", "--resume", str(directory), "-q"])
    assert result.exit_code == 0, result.output
    assert result.output.count("finished earlier, skipped") == 2
    summary = json.loads((directory / "summary.json").read_text())
    resumed = summary["runs"]["conductor"]["1"]
    assert resumed["steps"] == 2
    expected = reference["runs"]["conductor"]["1"]
    assert resumed["first_batch_sha256"] == expected["first_batch_sha256"]
    for key, value in expected["eval_final"].items():
        assert resumed["eval_final"][key] == pytest.approx(value, rel=1e-6)


def test_bad_requests_exit_2_before_anything_runs(tmp_path: Path) -> None:
    result = _compare(tmp_path, "--methods", "conductor,pcgard")
    assert result.exit_code == 2 and "did you mean 'pcgrad'" in result.output
    result = _compare(tmp_path, "--variant", "lion:conductor.use_lion=true,optimizr.lr=1e-4")
    assert result.exit_code == 2
    assert "lion: conductor.momentum_beta" in result.output
    assert "did you mean 'optimizer'" in result.output
    result = _compare(tmp_path, "--methods", "conductor,sum", "--baseline", "sun")
    assert result.exit_code == 2 and "did you mean 'sum'" in result.output
    assert not (tmp_path / "tiny").exists()
