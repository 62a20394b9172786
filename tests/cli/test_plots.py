"""The compare report's PNG plots (`gcond_cli.compare.plots`), drawn from hand-written metrics
files."""

from __future__ import annotations

import ast
import json
import math
import struct
from pathlib import Path
from typing import Any

import pytest

from gcond_cli.compare import plots
from gcond_cli.compare.plots import norm_ratio, write_plots
from gcond_cli.run import files

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ALL_PLOTS = {
    "Eval metrics over steps": "eval_curves.png",
    "Gradient conflict over steps": "gradients.png",
    "Final eval metrics per seed": "final_per_seed.png",
}


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; fails on anything that is not a PNG."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    length, chunk = struct.unpack(">I4s", data[8:16])
    assert (length, chunk) == (13, b"IHDR")
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def run_records(seed: int, steps: int, conflict: bool) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    for step in range(1, steps + 1):
        train: dict[str, Any] = {"step": step, "kind": "train", "loss": 1.0 / step}
        if conflict:
            train["min_cosine_sim"] = math.cos(step / 5 + seed) * 0.5
            train["raw_norm/l1"] = 1.0 + 0.1 * seed
            train["raw_norm/ssim"] = 10.0 * step
        records.append(train)
        if step % 5 == 0:
            records.append(
                {
                    "step": step,
                    "kind": "eval",
                    "eval/l1": 0.5 / step + 0.01 * seed,
                    "eval/ssim": 1.0 - 0.5 / step,
                }
            )
    return records


def write_run(compare_dir: Path, name: str, seed: int, lines: list[str]) -> None:
    run_dir = compare_dir / name / f"seed{seed}"
    run_dir.mkdir(parents=True)
    (run_dir / plots.METRICS_FILE).write_text("\n".join(lines) + "\n")


def summary(names: list[str], seeds: list[int]) -> dict[str, Any]:
    return {
        "entries": [{"name": n} for n in names],
        "seeds": seeds,
        "metrics": ["l1", "ssim"],
        "better": {"l1": "min", "ssim": "max"},
    }


@pytest.fixture
def compare_dir(tmp_path: Path) -> Path:
    """conductor (logs cosines and norms) and sum (does not) x 3 seeds; conductor's seed 1 ends
    in a truncated line, and sum's seed 2 never ran."""
    for seed in (0, 1, 2):
        lines = [json.dumps(r) for r in run_records(seed, 20, conflict=True)]
        if seed == 1:
            lines.append('{"step": 21, "kind": "train", "min_cos')
        write_run(tmp_path, "conductor", seed, lines)
    for seed in (0, 1):
        write_run(tmp_path, "sum", seed, [json.dumps(r) for r in run_records(seed, 20, False)])
    return tmp_path


def test_metrics_file_name_matches_the_logger() -> None:
    # The logger writes and the plots read the one name of run/files.py. Read from the logger's
    # source: importing the logger would import torch.
    source = (Path(files.__file__).parent / "logger.py").read_text()
    imported = [
        alias.name
        for node in ast.parse(source).body
        if isinstance(node, ast.ImportFrom) and node.module == "files"
        for alias in node.names
    ]
    assert "METRICS_FILE" in imported
    assert plots.METRICS_FILE is files.METRICS_FILE
    assert files.METRICS_FILE == "metrics.jsonl"


def test_writes_every_plot_as_png(compare_dir: Path) -> None:
    written = write_plots(compare_dir, summary(["conductor", "sum"], [0, 1, 2]))
    assert written == ALL_PLOTS
    assert list(written) == list(ALL_PLOTS)  # report order
    for file_name in written.values():
        width, height = png_size(compare_dir / file_name)
        assert 800 <= width <= 1600
        assert 300 <= height <= 2000


def test_no_gradients_plot_without_cosines(tmp_path: Path) -> None:
    for seed in (0, 1):
        write_run(tmp_path, "sum", seed, [json.dumps(r) for r in run_records(seed, 20, False)])
    written = write_plots(tmp_path, summary(["sum"], [0, 1]))
    assert "gradients.png" not in written.values()
    assert not (tmp_path / "gradients.png").exists()
    assert list(written.values()) == ["eval_curves.png", "final_per_seed.png"]


def test_single_seed_and_nan_values(tmp_path: Path) -> None:
    records = run_records(0, 10, conflict=True)
    records[0]["min_cosine_sim"] = float("nan")  # json.dumps writes NaN, as the logger does
    records[-1]["eval/l1"] = float("nan")
    write_run(tmp_path, "conductor", 0, [json.dumps(r) for r in records])
    written = write_plots(tmp_path, summary(["conductor", "missing"], [0]))
    assert written == ALL_PLOTS
    for file_name in written.values():
        png_size(tmp_path / file_name)


def test_one_eval_per_run(tmp_path: Path) -> None:
    for seed in (0, 1):
        write_run(tmp_path, "conductor", seed, [json.dumps(r) for r in run_records(seed, 5, True)])
    assert write_plots(tmp_path, summary(["conductor"], [0, 1])) == ALL_PLOTS


def test_long_runs_are_smoothed(tmp_path: Path) -> None:
    write_run(tmp_path, "conductor", 3, [json.dumps(r) for r in run_records(3, 400, True)])
    no_evals = {**summary(["conductor"], [3]), "metrics": []}
    assert write_plots(tmp_path, no_evals) == {"Gradient conflict over steps": "gradients.png"}
    png_size(tmp_path / "gradients.png")
    assert plots._window([(list(range(400)), [0.0] * 400)]) > 1
    assert plots._smooth(([0, 1, 2], [0.0, 3.0, 0.0]), 3) == ([0, 1, 2], [1.5, 1.0, 1.5])


def test_nothing_to_draw_writes_nothing(tmp_path: Path) -> None:
    assert write_plots(tmp_path, summary(["conductor", "sum"], [0, 1])) == {}
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"raw_norm/a": 2.0, "raw_norm/b": 8.0, "raw_norm/c": 4.0}, 4.0),
        ({"raw_norm/a": 3, "raw_norm/b": 1.5, "min_cosine_sim": -0.5, "loss": 100.0}, 2.0),
        ({"raw_norm/a": 2.0, "raw_norm/b": float("nan"), "raw_norm/c": 5.0}, 2.5),
        ({"raw_norm/a": 2.0, "raw_norm/b": 0.0, "raw_norm/c": 6.0}, 3.0),
        ({"raw_norm/a": 2.0, "raw_norm/b": float("inf"), "raw_norm/c": 6.0}, 3.0),
        ({"raw_norm/a": 2.0, "raw_norm/b": 0.0}, None),
        ({"raw_norm/a": 2.0, "raw_norm/b": float("nan")}, None),
        ({"raw_norm/a": 2.0}, None),
        ({"raw_norm/a": 2.0, "raw_norm/b": True, "raw_norm/c": None}, None),
        ({"step": 3, "kind": "train", "loss": 1.0}, None),
    ],
)
def test_norm_ratio(record: dict[str, Any], expected: float | None) -> None:
    assert norm_ratio(record) == expected
