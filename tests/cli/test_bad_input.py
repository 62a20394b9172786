"""Nothing let in: bad recipes, arguments and checkpoints given to `gcond train`, and bad
arguments given to the library (issue 5). Every case: a clear error, and for the CLI exit code 2,
no traceback, nothing created.

The recipe cases of `test_cli_validate.py` (run there through `gcond validate`) run here through
`gcond train` too, with more cases of the same families; the library cases extend those of
`test_conductor.py` (constructor parameters, non-scalar loss, provider returning a tensor).
"""

from __future__ import annotations

import math
import os
import pickle
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from typer.testing import CliRunner

from gcond import GradientConductor
from gcond_cli.app import app
from gcond_cli.recipe import dump_recipe_yaml, load_recipe
from tests.cli.test_cli_validate import BAD, _recipe
from tests.helpers import TINY

runner = CliRunner()

ALIAS_BOMB = "".join(
    f"{name}: &{name} [{', '.join([f'*{prev}' if prev else 'lol'] * 9)}]\n"
    for prev, name in zip(["", "a", "b", "c", "d", "e", "f", "g"], "abcdefgh", strict=True)
)  # 9**8 items once expanded

# (id, recipe changes or raw YAML text, overrides, strings the output must contain), as in BAD
MORE = [
    (
        "python-object-new",
        "!!python/object/new:os.system [['touch PWNED']]\n",
        [],
        ["python/object/new:os.system", "Python object tags are refused"],
    ),
    ("python-name", "seed: !!python/name:os.system\n", [], ["Python object tags are refused"]),
    (
        "python-object-in-a-section",
        "model: !!python/object:argparse.Namespace {name: mae_vit}\n",
        [],
        ["recipe.yaml:1:8", "Python object tags are refused"],
    ),
    (
        "python-tag-in-an-override",
        None,
        ["seed=!!python/object/apply:os.system ['touch PWNED']"],
        ["override 'seed=!!python/object/apply:os.system", "Python object tags are refused"],
    ),
    (
        "yaml-alias-bomb",
        ALIAS_BOMB + "seed: *h\n",
        [],
        ["seed: got [[[[[[[['lol'", "expected an integer"],
    ),
    (
        "number-with-5000-digits",
        "seed: " + "7" * 5000 + "\n",
        [],
        ["invalid YAML", "5000 digits"],
    ),
    ("lists-nested-5000-deep", "seed: " + "[" * 5000 + "]" * 5000, [], ["nested too deeply"]),
    ("huge-count", None, ["schedule.max_steps=10**30"], ["schedule.max_steps: got '10**30'"]),
    (
        "huge-int",
        None,
        ["schedule.max_steps=" + "9" * 40],
        ["schedule.max_steps: got 9999", "<= 1000000000"],
    ),
    ("huge-seed", None, ["seed=1099511627776"], ["seed: got 1099511627776", "<= 4294967295"]),
    ("overflowing-float", None, ["optimizer.lr=1.0e+400"], ["optimizer.lr: got inf", "finite"]),
    ("float-for-a-size", None, ["model.dim=1e400"], ["model.dim: got '1e400'", "integer"]),
    ("nan-weight", None, ["losses.l1.weight=.nan"], ["losses.l1.weight: got nan", "finite"]),
    ("minus-inf-clip", None, ["clip_grad_norm=-.inf"], ["clip_grad_norm: got -inf", "finite"]),
    ("nan-in-a-list", None, ["optimizer.betas=[.nan,0.95]"], ["optimizer.betas[0]: got nan"]),
    (
        "inf-threshold",
        None,
        ["conductor.conflict_thresholds=[-.inf,-0.5,0.0]"],
        ["conductor.conflict_thresholds[0]: got -inf", "finite"],
    ),
    ("negative-batch", None, ["data.micro_batch_size=-4"], ["data.micro_batch_size: got -4"]),
    ("negative-samples", None, ["data.train_samples=-1"], ["data.train_samples: got -1"]),
    (
        "negative-accumulation",
        None,
        ["conductor.accumulation_steps=-2"],
        ["conductor.accumulation_steps: got -2", ">= 1"],
    ),
    ("negative-warmup", None, ["schedule.warmup_steps=-1"], ["schedule.warmup_steps: got -1"]),
    ("negative-weight", None, ["losses.ssim.weight=-0.5"], ["losses.ssim.weight: got -0.5"]),
    ("zero-depth", None, ["model.depth=0"], ["model.depth: got 0", ">= 1"]),
    (
        "stochastic-method-too-few-steps",
        None,
        ["conductor.method=conductor-stochastic", "conductor.accumulation_steps=1"],
        ["conductor.accumulation_steps: got 1", "number of losses (2)"],
    ),
    (
        "thresholds-reversed",
        None,
        ["conductor.conflict_thresholds=[0.0,-0.5,-0.8]"],
        ["conductor.conflict_thresholds: got [0.0, -0.5, -0.8]", "non-decreasing"],
    ),
    (
        "thresholds-weak-below-main",
        None,
        ["conductor.conflict_thresholds=[-0.8,0.0,-0.5]"],
        ["non-decreasing"],
    ),
    ("recipe-name-with-slash", {"name": "a/b"}, [], ["name: got 'a/b'", "no path separators"]),
    ("recipe-name-dotdot", {"name": ".."}, [], ["name: got '..'", "not '.' or '..'"]),
    ("recipe-name-escape", None, ["name=../../etc"], ["name: got '../../etc'"]),
    ("recipe-name-absolute", None, ["name=/tmp/x"], ["name: got '/tmp/x'"]),
]
CASES = [(f"validate:{c[0]}", "validate", *c[1:]) for c in MORE] + [
    (f"train:{c[0]}", "train", *c[1:]) for c in BAD + MORE
]


def recipe_path(tmp_path: Path, changes: dict | str | None, overrides: list[str]) -> str:
    """The recipe file of a case, as `test_cli_validate` builds it."""
    if changes is None:
        return _recipe(tmp_path, {"optimizer.lr": float("nan")}) if not overrides else str(TINY)
    if isinstance(changes, str):
        return _recipe(tmp_path, text=changes)
    return _recipe(tmp_path, changes)


@pytest.mark.parametrize(
    ("command", "changes", "overrides", "expected"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_bad_recipe_is_refused(tmp_path, monkeypatch, command, changes, overrides, expected):
    monkeypatch.chdir(tmp_path)  # a `touch PWNED` that ran, or a run directory, would land here
    path = recipe_path(tmp_path, changes, overrides)
    result = runner.invoke(app, [command, path, *overrides])
    assert result.exit_code == 2, result.output
    assert "Recipe error" in result.output
    for text in expected:
        assert text in result.output, text
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], ["recipe.yaml"])


@pytest.mark.parametrize(
    "run_name", ["a/b", "..", ".", "../escape", "/tmp/abs", "x/../y", "", "has space", "a\\b"]
)
def test_unsafe_run_name_is_refused_by_train(tmp_path, monkeypatch, run_name):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["train", str(TINY), "--run-name", run_name])
    assert result.exit_code == 2, result.output
    assert "--run-name" in result.output
    assert "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------ resume


def run_dir_with(tmp_path: Path, recipe_text: str | None, checkpoint: bytes | None) -> Path:
    """A run directory as `gcond train` leaves it, holding what a test puts there."""
    run_dir = tmp_path / "runs" / "tiny" / "r"
    (run_dir / "checkpoints").mkdir(parents=True)
    if recipe_text is not None:
        (run_dir / "recipe.yaml").write_text(recipe_text)
    if checkpoint is not None:
        (run_dir / "checkpoints" / "latest.pt").write_bytes(checkpoint)
    return run_dir


def snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() if p.is_file() else b"<dir>"
        for p in sorted(directory.rglob("*"))
    }


class RunsCode:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def evil_checkpoint(tmp_path: Path, marker: Path, how: str) -> bytes:
    path = tmp_path / "evil.pt"
    payload = {"step": 3, "model": {"w": torch.zeros(2)}, "optimizer": RunsCode(marker)}
    if how == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=int(how.split("-")[1])))
    return path.read_bytes()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
@pytest.mark.parametrize("how", ["torch.save", "pickle-2", "pickle-4", "pickle-5"])
def test_checkpoint_that_would_run_code_is_refused_on_resume(tmp_path, monkeypatch, how):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "PWNED"
    recipe = dump_recipe_yaml(load_recipe(TINY, ["log.tensorboard=false"]))
    run_dir = run_dir_with(tmp_path, recipe, evil_checkpoint(tmp_path, marker, how))
    before = snapshot(run_dir)
    result = runner.invoke(app, ["train", str(TINY), "--resume", str(run_dir)])
    assert result.exit_code == 2, result.output
    flat = result.output.replace("\n", "")
    assert str(run_dir / "checkpoints" / "latest.pt") in flat
    assert "refused for safety" in flat and "nothing in" in flat
    assert "Traceback" not in result.output
    assert not marker.exists()
    assert snapshot(run_dir) == before
    # The file is dangerous indeed: an unsafe load runs the command.
    pickle.loads(evil_checkpoint(tmp_path, marker, "pickle-2"))
    assert marker.exists()


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("no-recipe", "no recipe.yaml there; is it a gcond run directory?"),
        ("invalid-recipe", "its recipe.yaml is invalid"),
        ("python-tag-in-saved-recipe", "Python object tags are refused"),
        ("no-checkpoint", "no checkpoint to resume from"),
        ("a-file", "is a file"),
        ("missing", "does not exist"),
    ],
)
def test_bad_resume_directory_is_refused(tmp_path, monkeypatch, case, expected):
    monkeypatch.chdir(tmp_path)
    recipe = dump_recipe_yaml(load_recipe(TINY))
    texts = {
        "no-recipe": None,
        "invalid-recipe": recipe.replace("dim: 32", "dim: -32", 1),
        "python-tag-in-saved-recipe": recipe + "x: !!python/object/apply:os.system [touch]\n",
    }
    run_dir = run_dir_with(tmp_path, texts.get(case, recipe), None)
    target = {"a-file": run_dir / "recipe.yaml", "missing": tmp_path / "nope"}.get(case, run_dir)
    before = snapshot(tmp_path)
    result = runner.invoke(app, ["train", str(TINY), "--resume", str(target)])
    assert result.exit_code == 2, result.output
    assert expected in " ".join(result.output.replace("│", " ").split()), result.output
    assert "Traceback" not in result.output
    assert snapshot(tmp_path) == before
    assert not (tmp_path / "PWNED").exists()


# ------------------------------------------------------------------------------------ library


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((out - target) ** 2).mean()


def provider() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ones(4, 3), torch.zeros(4, 2)


# (id, constructor changes, error type, text the message must contain)
BAD_CONSTRUCTION = [
    ("lambda-inf", {"lambdas": {"mse": math.inf, "bad": 1.0}}, ValueError, "lambdas['mse']"),
    ("lambda-minus-inf", {"lambdas": {"mse": 1.0, "bad": -math.inf}}, ValueError, "'bad'"),
    ("lambda-list", {"lambdas": {"mse": [1.0, 2.0], "bad": 1.0}}, TypeError, "lambdas['mse']"),
    ("lambda-tensor", {"lambdas": {"mse": torch.ones(2), "bad": 1.0}}, TypeError, "lambdas"),
    ("lambda-none", {"lambdas": {"mse": None, "bad": 1.0}}, TypeError, "lambdas['mse']"),
    ("lambda-extra-key", {"lambdas": {"mse": 1, "bad": 1, "x": 1}}, ValueError, "lambdas"),
    ("lambdas-not-a-mapping", {"lambdas": [1.0, 1.0]}, TypeError, "lambdas"),
    ("loss-fns-not-a-mapping", {"loss_fns": [mse]}, TypeError, "loss_fns"),
    ("model-without-parameters", {"model": nn.Identity()}, ValueError, "requires_grad"),
    ("model-of-buffers-only", {"model": nn.BatchNorm1d(3, affine=False)}, ValueError, "model"),
]


@pytest.mark.parametrize(
    ("changes", "error", "text"),
    [case[1:] for case in BAD_CONSTRUCTION],
    ids=[case[0] for case in BAD_CONSTRUCTION],
)
def test_library_refuses_bad_construction_naming_the_culprit(changes, error, text):
    kwargs = {
        "model": Net(),
        "loss_fns": {"mse": mse, "bad": mse},
        "lambdas": {"mse": 1.0, "bad": 1.0},
        "accumulation_steps": 2,
    }
    with pytest.raises(error) as info:
        GradientConductor(**(kwargs | changes))
    assert text in str(info.value)


# (id, loss returned by loss "bad", data provider, error type, text the message must contain)
BAD_STEP = [
    ("loss-python-float", lambda o, t: 0.5, provider, TypeError, "loss_fns['bad']"),
    ("loss-none", lambda o, t: None, provider, TypeError, "loss_fns['bad']"),
    ("loss-shape-1", lambda o, t: mse(o, t).reshape(1), provider, TypeError, "loss_fns['bad']"),
    ("loss-matrix", lambda o, t: (o - t) ** 2, provider, TypeError, "loss_fns['bad'] must"),
    ("loss-numpy", lambda o, t: mse(o, t).detach().numpy(), provider, TypeError, "'bad'"),
    ("provider-3-tuple", mse, lambda: (*provider(), 1), TypeError, "of length 3"),
    ("provider-1-tuple", mse, lambda: (torch.ones(4, 3),), TypeError, "data_provider()"),
    ("provider-dict", mse, lambda: dict(zip("xy", provider(), strict=True)), TypeError, "got dict"),
    ("provider-none", mse, lambda: None, TypeError, "got NoneType"),
    ("provider-string", mse, lambda: "xy", TypeError, "data_provider()"),
]


@pytest.mark.parametrize(
    ("bad_loss", "data", "error", "text"),
    [case[1:] for case in BAD_STEP],
    ids=[case[0] for case in BAD_STEP],
)
def test_library_refuses_bad_losses_and_batches_naming_the_culprit(bad_loss, data, error, text):
    model = Net()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    for accumulation in ("full", "stochastic"):
        cond = GradientConductor(
            model, {"mse": mse, "bad": bad_loss}, {"mse": 1.0, "bad": 1.0}, 2,
            accumulation=accumulation,
        )  # fmt: skip
        with pytest.raises(error) as info:
            cond.step(data)
        assert text in str(info.value), str(info.value)
        assert all(p.grad is None for p in model.parameters())
        assert all(torch.equal(t, weights[k]) for k, t in model.state_dict().items())


def test_an_unsafe_yaml_load_would_have_run_the_code(tmp_path, monkeypatch):
    """The Python-tag cases above are dangerous for real (they are refused, not ignored)."""
    monkeypatch.chdir(tmp_path)
    yaml.unsafe_load("!!python/object/apply:os.system ['touch PWNED']")
    assert (tmp_path / "PWNED").exists()
