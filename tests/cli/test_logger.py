"""RunLogger: metrics.jsonl, summary.json, TensorBoard events read back, console output."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import (
    IMAGES,
    SCALARS,
    TENSORS,
    EventAccumulator,
)
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.hparams import metadata as hparams_metadata

from gcond_cli.run.logger import RunLogger

RECIPE = {
    "name": "tiny",
    "seed": 3,
    "data": {"image_size": 16, "augment": {"crop_scale": [0.35, 1.0]}},
    "losses": {"l1": {"kind": "l1", "weight": 1.0}, "ssim": {"kind": "ssim", "weight": 0.5}},
    "optimizer": {"name": "adamw", "lr": 0.001},
    "clip_grad_norm": None,
}


def step_stats(step: int) -> dict[str, float]:
    """What a conductor step reports (docs/algorithm.md, "Statistics"), for two losses."""
    return {
        "loss/l1": 0.1,
        "loss/ssim": 0.2,
        "loss/total": 0.2,
        "min_cosine_sim": -0.12,
        "cos/l1_vs_ssim": -0.12,
        "conflicts/weak": 1,
        "conflicts/main": 0,
        "conflicts/critical": 0,
        "wins/l1": 1,
        "wins/ssim": 0,
        "raw_norm/l1": 0.4,
        "raw_norm/ssim": 0.3,
        "final_grad_norm": 0.53,
        "skipped": 0,
        "step": step,
    }


EVAL = {"eval/l1": 0.08, "eval/ssim": 0.71, "eval/psnr": 21.3}


def images() -> dict[str, torch.Tensor]:
    return {name: torch.rand(4, 3, 8, 8) for name in ("input", "masked", "reconstruction")}


def run_logger(run_dir: Path | None, steps: int = 3, **kwargs) -> None:
    with RunLogger(run_dir, RECIPE, total_steps=steps, **kwargs) as log:
        log.start(0)
        for step in range(1, steps + 1):
            log.log_step(step, step_stats(step), lr=1.2e-3, samples_per_s=85.0)
        log.log_eval(steps, EVAL, images())
        log.close({"eval/ssim": 0.71, "best": {"eval/ssim": 0.72}, "bad": math.nan})


def read_events(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir), size_guidance={SCALARS: 0, IMAGES: 0, TENSORS: 0})
    acc.Reload()
    return acc


def test_metrics_jsonl_and_summary(tmp_path: Path) -> None:
    run_logger(tmp_path, console=False)

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [(r["kind"], r["step"]) for r in records] == [
        ("train", 1),
        ("train", 2),
        ("train", 3),
        ("eval", 3),
    ]
    assert records[0]["loss/l1"] == 0.1
    assert records[0]["conflicts/weak"] == 1
    assert records[0]["lr"] == 1.2e-3
    assert records[0]["samples_per_s"] == 85.0
    assert records[3]["eval/psnr"] == 21.3

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary == {"eval/ssim": 0.71, "best": {"eval/ssim": 0.72}, "bad": None}
    assert not list(tmp_path.glob(".*tmp*"))


def test_non_finite_values_are_written_as_null(tmp_path: Path) -> None:
    with RunLogger(tmp_path, RECIPE, 1, console=False, tensorboard=False) as log:
        log.start(0)
        log.log_step(1, {"loss/total": math.inf, "min_cosine_sim": math.nan}, 1e-3, 1.0)
    record = json.loads((tmp_path / "metrics.jsonl").read_text(), parse_constant=pytest.fail)
    assert record["loss/total"] is None
    assert record["min_cosine_sim"] is None


def test_tensorboard_events_in_the_run_directory(tmp_path: Path) -> None:
    run_logger(tmp_path, console=False)

    # Everything in the run directory itself: add_hparams/add_scalars would make sub-runs.
    assert [p for p in tmp_path.iterdir() if p.is_dir()] == []
    events = read_events(tmp_path)
    tags = events.Tags()
    expected_scalars = set(step_stats(1)) | set(EVAL) | {"train/lr", "train/samples_per_s"}
    assert expected_scalars <= set(tags["scalars"])
    assert [e.value for e in events.Scalars("loss/l1")] == pytest.approx([0.1] * 3)
    assert [e.step for e in events.Scalars("train/lr")] == [1, 2, 3]
    assert set(tags["images"]) == {"images/input", "images/masked", "images/reconstruction"}

    hparams = events.PluginTagToContent(hparams_metadata.PLUGIN_NAME)
    start = hparams_metadata.parse_session_start_info_plugin_data(
        hparams[hparams_metadata.SESSION_START_INFO_TAG]
    )
    assert start.hparams["optimizer.lr"].number_value == 0.001
    assert start.hparams["data.augment.crop_scale"].string_value == "[0.35, 1.0]"
    assert start.hparams["losses.ssim.kind"].string_value == "ssim"
    experiment = hparams_metadata.parse_experiment_plugin_data(
        hparams[hparams_metadata.EXPERIMENT_TAG]
    )
    metric_tags = {m.name.tag for m in experiment.metric_infos}
    assert metric_tags == {"eval/ssim", "best/eval/ssim"}  # finite numbers of the summary
    assert "best/eval/ssim" in tags["scalars"]  # the plugin reads metric values from scalars
    assert hparams_metadata.SESSION_END_INFO_TAG in hparams


def test_custom_scalar_layout_overlays_each_family(tmp_path: Path) -> None:
    run_logger(tmp_path, console=False)
    (config,) = read_events(tmp_path).Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout()
    layout.ParseFromString(config.tensor_proto.string_val[0])
    regexes = {
        chart.title: list(chart.multiline.tag)
        for category in layout.category
        for chart in category.chart
    }
    assert regexes["all losses"] == [r"^loss/.*"]
    assert regexes["loss/ssim"] == [r"^loss/ssim$"]
    for family in ("cos", "conflicts", "wins", "raw_norm"):
        assert [rf"^{family}/.*"] in regexes.values()


def test_plain_lines_when_not_a_terminal(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with RunLogger(tmp_path, RECIPE, total_steps=300, tensorboard=False) as log:
        log.start(0)
        log.info("resolved recipe [saved]")
        for step in (1, 2):
            log.log_step(step, step_stats(step), lr=1.2e-3, samples_per_s=85.0)
        log.log_eval(2, EVAL)
        log.warn("disk almost full")

    out = capsys.readouterr().out
    assert "\x1b" not in out
    lines = out.splitlines()
    assert lines[0] == "resolved recipe [saved]"
    assert re.fullmatch(
        r"step 2/300 \| loss 0\.2000 \(l1 0\.1, ssim 0\.2\) \| min_cos -0\.12 \| "
        r"zones w/m/c 1/0/0 \| gnorm 0\.53 \| lr 1\.2e-03 \| 85 samples/s \| eta \S+",
        lines[2],
    )
    assert lines[3] == "eval step 2 | l1 0.08 | ssim 0.71 | psnr 21.3"
    assert lines[4] == "warning: disk almost full"


def test_live_view_runs_and_stops(capsys: pytest.CaptureFixture) -> None:
    with RunLogger(None, RECIPE, total_steps=2, live=True) as log:
        log.start(0)
        log.log_step(1, step_stats(1), lr=1e-3, samples_per_s=10.0)
        log.log_eval(1, EVAL)
        log.close()
    out = capsys.readouterr().out
    assert "eval step 1" in out
    assert "zones w/m/c" in out  # the final frame of the live table stays on screen


def test_noop_logger_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    run_logger(None, console=False)
    assert list(tmp_path.iterdir()) == []
    assert capsys.readouterr() == ("", "")


def test_resume_replaces_steps_after_the_checkpoint(tmp_path: Path) -> None:
    with RunLogger(tmp_path, RECIPE, 6, console=False) as log:
        log.start(0)
        for step in range(1, 6):
            log.log_step(step, {"loss/total": float(step)}, 1e-3, 1.0)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "kind": "tr')  # a crash in the middle of a line

    with RunLogger(tmp_path, RECIPE, 6, console=False) as log:
        log.start(3)
        for step in range(4, 7):
            log.log_step(step, {"loss/total": 10.0 * step}, 1e-3, 1.0)

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss/total"]) for r in records] == [
        (1, 1.0),
        (2, 2.0),
        (3, 3.0),
        (4, 40.0),
        (5, 50.0),
        (6, 60.0),
    ]
    steps = [e.step for e in read_events(tmp_path).Scalars("loss/total")]
    assert steps == [1, 2, 3, 4, 5, 6]  # purge_step hid the first run's steps 4-5


def test_failed_run_leaves_the_session_open(tmp_path: Path) -> None:
    with pytest.raises(ValueError), RunLogger(tmp_path, RECIPE, 3, console=False) as log:
        log.start(0)
        log.log_step(1, step_stats(1), 1e-3, 1.0)
        raise ValueError("boom")
    hparams = read_events(tmp_path).PluginTagToContent(hparams_metadata.PLUGIN_NAME)
    assert hparams_metadata.SESSION_START_INFO_TAG in hparams
    assert hparams_metadata.SESSION_END_INFO_TAG not in hparams


def test_logging_before_start_is_an_error(tmp_path: Path) -> None:
    log = RunLogger(tmp_path, RECIPE, 3, console=False)
    with pytest.raises(RuntimeError, match=r"start\(\)"):
        log.log_step(1, {}, 1e-3, 1.0)
    log.close()
