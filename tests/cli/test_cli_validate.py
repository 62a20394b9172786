"""The `gcond` CLI on good and bad recipes: `validate`, `recipes`, and `train`'s argument checks."""

import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from gcond_cli.app import app
from tests.helpers import TINY

runner = CliRunner()


def _recipe(tmp_path: Path, changes: dict | None = None, text: str | None = None) -> str:
    """A recipe file: the tiny recipe with dotted `changes`, or the raw `text`."""
    if text is None:
        raw = yaml.safe_load(TINY.read_text())
        for key, value in (changes or {}).items():
            *parents, last = key.split(".")
            node = raw
            for part in parents:
                node = node.setdefault(part, {})
            node[last] = value
        text = yaml.safe_dump(raw)
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return str(path)


# (id, recipe changes or raw YAML text, overrides, strings the output must contain)
BAD = [
    (
        "unknown-top-level-key",
        {"conductr": {"method": "sum"}},
        [],
        ["conductr: unknown key", "did you mean 'conductor'?"],
    ),
    (
        "unknown-nested-key",
        {"conductor.accumulation_stepz": 4},
        [],
        ["conductor.accumulation_stepz: unknown key", "did you mean 'accumulation_steps'?"],
    ),
    (
        "unknown-key-in-a-loss",
        {"losses.l1.wieght": 1.0},
        [],
        ["losses.l1.wieght: unknown key", "did you mean 'weight'?"],
    ),
    (
        "wrong-type",
        {"data.image_size": "big"},
        [],
        ["data.image_size: got 'big', expected an integer"],
    ),
    ("out-of-range", {"data.mask.ratio": 1.5}, [], ["data.mask.ratio: got 1.5", "< 1.0"]),
    (
        "unknown-loss-kind",
        {"losses.ssim.kind": "ssmi"},
        [],
        ["losses.ssim.kind: got 'ssmi'", "'ms_ssim'", "'cross_entropy'", "did you mean 'ssim'?"],
    ),
    (
        "unknown-model",
        {"model.name": "vit"},
        [],
        ["model.name: got 'vit'", "'masked_conv'", "did you mean 'mae_vit'?"],
    ),
    (
        "thresholds-out-of-order",
        {"conductor.conflict_thresholds": [-0.5, -0.8, 0.0]},
        [],
        ["conductor.conflict_thresholds: got [-0.5, -0.8, 0.0]", "non-decreasing"],
    ),
    (
        "threshold-out-of-range",
        {"conductor.conflict_thresholds": [-1.5, -0.5, 0.0]},
        [],
        ["conductor.conflict_thresholds[0]: got -1.5"],
    ),
    ("non-finite-in-file", None, [], ["optimizer.lr: got nan, expected a finite number"]),
    (
        "non-finite-override",
        None,
        ["conductor.eps=.inf"],
        ["conductor.eps: got inf, expected a finite number"],
    ),
    (
        "huge-number",
        {"data.micro_batch_size": 10**12},
        [],
        ["data.micro_batch_size: got 1000000000000", "<= 1000000"],
    ),
    ("negative-size", {"model.dim": -8}, [], ["model.dim: got -8", ">= 1"]),
    (
        "stochastic-too-few-steps",
        {"conductor.accumulation": "stochastic", "conductor.accumulation_steps": 1},
        [],
        ["conductor.accumulation_steps: got 1", "number of losses (2)"],
    ),
    (
        "malformed-yaml",
        "data: [16, 32\nmodel: {name: mae_vit}\n",
        [],
        ["recipe.yaml:2:6: invalid YAML"],
    ),
    (
        "python-object-tag",
        "!!python/object/apply:os.system ['touch PWNED']\n",
        [],
        [
            "recipe.yaml:1:1: invalid YAML",
            "python/object/apply:os.system",
            "Python object tags are refused",
        ],
    ),
    (
        "python-tag-in-a-value",
        "seed: !!python/object/apply:os.system ['touch PWNED']\n",
        [],
        ["recipe.yaml:1:7", "Python object tags are refused"],
    ),
    (
        "override-without-equals",
        None,
        ["optimizer.lr"],
        ["override 'optimizer.lr': expected KEY=VALUE"],
    ),
    (
        "override-bad-yaml",
        None,
        ["optimizer.betas=[0.9, 0.95"],
        ["override 'optimizer.betas=[0.9, 0.95'", "invalid YAML"],
    ),
    (
        "override-unknown-key",
        None,
        ["optimizer.lrr=3e-4"],
        ["optimizer.lrr: unknown key; did you mean 'lr'?", "from override 'optimizer.lrr=3e-4'"],
    ),
    (
        "override-through-a-value",
        None,
        ["model.dim.x=1"],
        ["override 'model.dim.x=1'", "'model.dim' is 32, not a mapping"],
    ),
    (
        "override-bad-value",
        None,
        ["schedule.max_steps=0"],
        ["schedule.max_steps: got 0, expected a number >= 1"],
    ),
]


@pytest.mark.parametrize(
    ("changes", "overrides", "expected"),
    [case[1:] for case in BAD],
    ids=[case[0] for case in BAD],
)
def test_validate_rejects_bad_recipes(tmp_path, monkeypatch, changes, overrides, expected):
    monkeypatch.chdir(tmp_path)  # a `touch PWNED` that ran would leave a file here
    if changes is None:
        path = _recipe(tmp_path, {"optimizer.lr": float("nan")}) if not overrides else str(TINY)
    elif isinstance(changes, str):
        path = _recipe(tmp_path, text=changes)
    else:
        path = _recipe(tmp_path, changes)
    result = runner.invoke(app, ["validate", path, *overrides])
    assert result.exit_code == 2, result.output
    assert "Recipe error" in result.output
    for text in expected:
        assert text in result.output
    assert "Traceback" not in result.output
    assert "recipe OK" not in result.output
    assert not (tmp_path / "PWNED").exists()


def test_validate_reports_every_problem_at_once(tmp_path):
    path = _recipe(tmp_path, {"data.image_sise": 3, "model.dim": 0, "losses.l1.kind": "l2"})
    result = runner.invoke(app, ["validate", path, "optimizer.lr=-1", "seed"])
    assert result.exit_code == 2
    assert "(5 problems)" in result.output
    for key in ("data.image_sise", "model.dim", "losses.l1.kind", "optimizer.lr", "'seed'"):
        assert key in result.output


def test_validate_missing_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["validate", "nope.yaml"])
    assert result.exit_code == 2
    assert "nope.yaml: recipe file not found" in result.output
    assert "mae_l1_ssim" in result.output  # the bundled names it could have meant
    assert "Traceback" not in result.output


def test_validate_prints_the_resolved_recipe_with_overrides():
    result = runner.invoke(
        app, ["validate", str(TINY), "optimizer.lr=3e-4", "optimizer.betas=[0.0,0.95]"]
    )
    assert result.exit_code == 0, result.output
    assert "recipe OK" in result.output
    resolved = yaml.safe_load(result.stdout)  # stdout stays valid YAML: the rest are comments
    assert resolved["optimizer"]["lr"] == pytest.approx(3e-4)
    assert resolved["optimizer"]["betas"] == [0.0, 0.95]
    assert resolved["conductor"]["accumulation_steps"] == 2  # defaults filled in
    assert resolved["conductor"]["momentum_beta"] == 0.0
    assert "lr: 0.0003" in result.output


@pytest.mark.parametrize("name", ["mae_l1_ssim", "mae_l1_ssim.yaml", "multitask_rotation"])
def test_validate_accepts_bundled_recipe_names(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["validate", name])
    assert result.exit_code == 0, result.output
    assert "recipe OK" in result.output


def test_recipes_lists_bundled_recipes_with_descriptions():
    result = runner.invoke(app, ["recipes"])
    assert result.exit_code == 0
    for name in ("mae_l1_ssim", "mae_stl10", "multitask_rotation"):
        assert name in result.output
    assert "Masked-autoencoder" in result.output


@pytest.fixture
def fake_train(monkeypatch):
    """Stands in for gcond_cli.train; records each call and returns `exit_code`."""
    module = types.ModuleType("gcond_cli.train")
    module.calls = []
    module.exit_code = 0

    def run_train(recipe, *, recipe_path, run_name, resume, plugins):
        module.calls.append(
            dict(recipe=recipe, path=recipe_path, name=run_name, resume=resume, plugins=plugins)
        )
        return module.exit_code

    module.run_train = run_train
    monkeypatch.setitem(sys.modules, "gcond_cli.train", module)
    return module


@pytest.mark.parametrize("run_name", ["a/b", "..", "../escape", "", "has space", "a\\b"])
def test_train_rejects_unsafe_run_names_before_training(fake_train, run_name):
    result = runner.invoke(app, ["train", str(TINY), "--run-name", run_name])
    assert result.exit_code == 2
    assert "--run-name" in result.output
    assert "Traceback" not in result.output
    assert fake_train.calls == []


def test_train_rejects_a_bad_recipe_before_training(fake_train, tmp_path):
    result = runner.invoke(app, ["train", str(TINY), "conductor.accumulation_stepz=3"])
    assert result.exit_code == 2
    assert "did you mean 'accumulation_steps'?" in result.output
    assert fake_train.calls == []
    result = runner.invoke(app, ["train", str(TINY), "--resume", str(tmp_path / "missing")])
    assert result.exit_code == 2
    assert fake_train.calls == []


@pytest.mark.parametrize("exit_code", [0, 1])
def test_train_delegates_and_exits_with_its_code(fake_train, tmp_path, exit_code):
    fake_train.exit_code = exit_code
    args = ["train", str(TINY), "optimizer.lr=2e-4", "--run-name", "run-1.a_b"]
    result = runner.invoke(app, [*args, "--resume", str(tmp_path)])
    assert result.exit_code == exit_code, result.output
    (call,) = fake_train.calls
    assert call["recipe"].optimizer.lr == pytest.approx(2e-4)
    assert call["path"] == TINY
    assert call["name"] == "run-1.a_b"
    assert call["resume"] == tmp_path
    assert call["plugins"].given == ()


def test_help_describes_the_tool_and_its_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "GradientConductor" in result.output
    for command in ("train", "validate", "recipes"):
        assert command in result.output


def test_python_dash_m_runs_the_cli():
    result = subprocess.run(
        [sys.executable, "-m", "gcond_cli", "validate", "mae_l1_ssim", "seed=-1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "seed: got -1" in result.stderr
    assert "Traceback" not in result.stderr
