"""The user's own code in the harness: targets, trusted roots, the errors a user can act on, and
runs of a plugin recipe (tests/cli/plugins: a two-task model, its data, losses and evaluation)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from gcond_cli.plugins import PluginRoots, TargetProblem, load_target, signature_problems
from tests.helpers import TESTS

PLUGINS = TESTS / "cli" / "plugins"


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A copy of the plugin project in a fresh folder (a fresh module name per test, so an
    import is seen), run from there; `mark` lists every import of the plugin module."""
    shutil.copy(PLUGINS / "mtl.py", tmp_path / "mtl.py")
    shutil.copy(PLUGINS / "recipe.yaml", tmp_path / "recipe.yaml")
    monkeypatch.chdir(tmp_path)
    mark = tmp_path / "imported.txt"
    monkeypatch.setenv("GCOND_TEST_IMPORTED_MARK", str(mark))
    return tmp_path


def _edit(path: Path, **changes: object) -> Path:
    """Set dotted keys of a recipe file (``losses__a__args={...}`` for ``losses.a.args``)."""
    raw = yaml.safe_load(path.read_text())
    for dotted, value in changes.items():
        node, *keys = raw, *dotted.split("__")
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value
    path.write_text(yaml.safe_dump(raw))
    return path


def _imported(project: Path) -> bool:
    return (project / "imported.txt").exists()


def _usage_error(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    return result.output


# ---------------------------------------------------------------------------------- trust


def test_a_plugin_recipe_validates_with_its_file_trusted(cli, project):
    result = cli("validate", "recipe.yaml", "--plugin", "mtl.py")
    assert result.exit_code == 0, result.output
    assert "# recipe OK" in result.output
    assert _imported(project)
    assert not (project / "runs").exists()


def test_without_plugin_the_file_is_refused_and_never_imported(cli, project):
    out = _usage_error(cli("validate", "recipe.yaml"))
    assert "model.target:" in out and "not under a plugin root" in out
    assert "--plugin mtl.py" in out.replace(str(project) + "/", "")
    assert "A plugin is code" in out
    assert not _imported(project)


@pytest.mark.parametrize(
    "target",
    ["os:system", "builtins:exec", "torch:load", "logging:os.system", "subprocess:run"],
)
def test_targets_outside_the_roots_are_refused_before_import(cli, project, target):
    _edit(project / "recipe.yaml", model__target=target)
    out = _usage_error(cli("validate", "recipe.yaml", "--plugin", "mtl.py"))
    assert f"model.target: '{target}'" in out
    assert "it was not run" in out and "To trust it, pass --plugin" in out


def test_an_object_a_trusted_module_imports_is_refused(cli, project):
    """The resolved object is checked, not the string: mtl.os.system is os.system."""
    _edit(project / "recipe.yaml", model__target="mtl.py:os.system")
    out = _usage_error(cli("validate", "recipe.yaml", "--plugin", "mtl.py"))
    assert "resolves to system, defined in module posix" in out
    assert "not something it imports" in out


def test_a_file_beside_a_trusted_one_is_not_trusted(cli, project):
    shutil.copy(project / "mtl.py", project / "other.py")
    _edit(project / "recipe.yaml", model__target="other.py:build_model")
    out = _usage_error(cli("validate", "recipe.yaml", "--plugin", "mtl.py"))
    assert "other.py:build_model' is a file" in out
    assert (project / "imported.txt").read_text().count("other") == 0


def test_a_trusted_folder_trusts_its_files_and_modules(cli, project):
    (project / "pkg").mkdir()
    shutil.move(project / "mtl.py", project / "pkg" / "mtl.py")
    _edit(
        project / "recipe.yaml",
        model__target="pkg/mtl.py:build_model",
        data__target="pkg/mtl.py:make_data",
        losses__a__target="pkg/mtl.py:task_loss",
        losses__b__target="pkg/mtl.py:task_loss",
        eval__target="mtl:evaluate",  # a module found in the trusted folder
    )
    result = cli("validate", "recipe.yaml", "--plugin", "pkg")
    assert result.exit_code == 0, result.output


def test_an_installed_package_is_trusted_by_name_or_entry_point(cli, project, monkeypatch):
    site = project / "site"
    (site / "userpkg").mkdir(parents=True)
    shutil.move(project / "mtl.py", site / "userpkg" / "mtl.py")
    (site / "userpkg" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(site))
    targets = {
        "model__target": "userpkg.mtl:build_model",
        "data__target": "userpkg.mtl:make_data",
        "losses__a__target": "userpkg.mtl:task_loss",
        "losses__b__target": "userpkg.mtl:task_loss",
        "eval__target": "userpkg.mtl:evaluate",
    }
    _edit(project / "recipe.yaml", **targets)
    out = _usage_error(cli("validate", "recipe.yaml"))  # found, but not trusted
    assert "names module userpkg.mtl" in out and not _imported(project)
    assert cli("validate", "recipe.yaml", "--plugin", "userpkg").exit_code == 0
    info = site / "userpkg-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: userpkg\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[gcond.plugins]\nuserpkg = userpkg\n")
    result = cli("validate", "recipe.yaml")  # the entry point trusts it
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("value", ["missing.py", "no_such_package_x", "recipe.yaml"])
def test_a_bad_plugin_option_is_a_usage_error(cli, project, value):
    out = _usage_error(cli("validate", "recipe.yaml", "--plugin", value))
    assert f"--plugin {value}" in out


# ---------------------------------------------------------------------------------- errors


def test_broken_plugin_files_are_shown_at_the_users_line(cli, project):
    source = (project / "mtl.py").read_text()
    (project / "mtl.py").write_text(source.replace("def build_model(", "def build_model(:"))
    out = _usage_error(cli("validate", "recipe.yaml", "--plugin", "mtl.py"))
    assert "syntax error in" in out and "mtl.py, line 31: invalid syntax" in out
    assert "def build_model(:width" in out
    assert "data.target: as model.target: the same file or module" in out
    broken = source.replace("import os\n", "import os\nimport no_such_module_here\n")
    (project / "mtl.py").write_text(broken)
    line = broken.splitlines().index("import no_such_module_here") + 1
    out = _usage_error(cli("validate", "recipe.yaml", "--plugin", "mtl.py"))
    assert "raised ModuleNotFoundError: No module named 'no_such_module_here'" in out
    assert f"mtl.py, line {line}: import no_such_module_here" in out


def test_missing_file_attribute_and_not_callable(cli, project):
    _edit(
        project / "recipe.yaml",
        model__target="gone.py:build_model",
        data__target="mtl.py:make_dat",
        eval__target="mtl.py:NOT_CALLABLE",
    )
    (project / "gone.py").touch()
    out = _usage_error(cli("validate", "recipe.yaml", "--plugin", "mtl.py", "--plugin", "gone.py"))
    assert "model.target: " in out and "has no attribute 'build_model'" in out
    assert "data.target: " in out and "did you mean 'make_data'?" in out
    assert "eval.target: 'NOT_CALLABLE' is a int, not callable" in out
    (project / "gone.py").unlink()
    out = _usage_error(cli("validate", "recipe.yaml", "--plugin", "mtl.py"))
    assert "gone.py not found" in out or "no such file" in out


def test_args_are_checked_against_the_signature(cli, project):
    _edit(
        project / "recipe.yaml",
        model__args={"widht": 8},
        data__args={"batch": "eight"},
        losses__a__args={"task": 0, "seed": 1},
    )
    out = _usage_error(cli("validate", "recipe.yaml", "--plugin", "mtl.py"))
    assert "model.args.widht: build_model(width: 'int' = 8" in out
    assert "did you mean 'width'?" in out
    assert "data.args.batch: got 'eight', expected int" in out
    assert "losses.a.args.seed:" in out and "has no argument 'seed'" in out


def test_missing_required_argument_and_contract(tmp_path):
    def build(depth: int, *, width: int = 3) -> None: ...

    def loss(output) -> None: ...

    assert signature_problems(build, "model", {"width": 2}) == [
        "args.depth: required argument of "
        "test_missing_required_argument_and_contract.<locals>.build"
        "(depth: 'int', *, width: 'int' = 3) -> 'None' is missing"
    ]
    (problem,) = signature_problems(loss, "loss", {})
    assert "must take (output, target) first" in problem
    assert signature_problems(lambda seed, device, rank: None, "data", {"rank": 1}) == [
        "args.rank: set by the harness (the process's rank); remove it"
    ]


def test_roots_are_exact(tmp_path):
    (tmp_path / "a.py").write_text("def f():\n    return 1\n")
    roots = PluginRoots.from_options([str(tmp_path / "a.py")], entry_points=False)
    assert load_target(f"{tmp_path}/a.py:f", roots)() == 1
    with pytest.raises(TargetProblem, match="not under a plugin root"):
        load_target("json:dumps", roots)
    assert not roots.trusts_module("json") and roots.trusts_file((tmp_path / "a.py").resolve())


# ---------------------------------------------------------------------------------- runs


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_train_resume_and_evaluate_a_plugin_run(cli, project):
    def train(*args):
        # A constant learning rate: the run stopped at step 2 and the whole one share it.
        return cli("train", "recipe.yaml", *args, "schedule.min_lr_ratio=1.0")

    result = train("--plugin", "mtl.py", "--run-name", "r", "schedule.max_steps=4")
    assert result.exit_code == 0, result.output
    run = project / "runs" / "recipe" / "r"
    evals = [r for r in _records(run) if r["kind"] == "eval"]
    assert [sorted(k for k in r if k.startswith("eval/")) for r in evals] == [
        ["eval/mae_a", "eval/mae_b", "eval/score"]
    ] * 2
    assert json.loads((run / "plugins.json").read_text()) == ["mtl.py"]
    # The same run stopped at step 2 and resumed: the same weights (an exact data order).
    assert train("--plugin", "mtl.py", "--run-name", "s", "schedule.max_steps=2").exit_code == 0
    stopped = project / "runs" / "recipe" / "s"
    text = (stopped / "recipe.yaml").read_text().replace("max_steps: 2", "max_steps: 4")
    (stopped / "recipe.yaml").write_text(text)
    out = _usage_error(cli("train", "recipe.yaml", "--resume", stopped))
    assert "--plugin mtl.py" in out and "give the plugin roots it was started with" in out
    assert cli("train", "recipe.yaml", "--resume", stopped, "--plugin", "mtl.py").exit_code == 0
    import torch

    whole = torch.load(run / "checkpoints" / "latest.pt", weights_only=True)
    resumed = torch.load(stopped / "checkpoints" / "latest.pt", weights_only=True)
    assert whole["step"] == resumed["step"] == 4
    assert whole["data"] == resumed["data"] == {"served": 8}
    assert all(torch.equal(whole["model"][k], resumed["model"][k]) for k in whole["model"])


@pytest.mark.slow
def test_without_an_evaluation_every_loss_is_reported(cli, project):
    _edit(project / "recipe.yaml", checkpoint__best_metric="eval/b", checkpoint__best_mode="min")
    raw = yaml.safe_load((project / "recipe.yaml").read_text())
    del raw["eval"]["target"], raw["eval"]["higher_is_better"]
    (project / "recipe.yaml").write_text(yaml.safe_dump(raw))
    result = cli("train", "recipe.yaml", "--plugin", "mtl.py", "--run-name", "r")
    assert result.exit_code == 0, result.output
    (last,) = [r for r in _records(project / "runs/recipe/r") if r["kind"] == "eval"][-1:]
    assert sorted(k for k in last if k.startswith("eval/")) == ["eval/a", "eval/b"]
    assert last["eval/b"] > last["eval/a"]  # task b's targets are 10x larger


@pytest.mark.slow
def test_a_data_source_without_state_restarts_with_a_warning(cli, project):
    _edit(project / "recipe.yaml", data__args={"batch": 8, "stateful": False})
    assert (
        cli(
            "train", "recipe.yaml", "--plugin", "mtl.py", "--run-name", "r", "schedule.max_steps=2"
        ).exit_code
        == 0
    )
    run = project / "runs" / "recipe" / "r"
    (run / "recipe.yaml").write_text(
        (run / "recipe.yaml").read_text().replace("max_steps: 2", "max_steps: 3")
    )
    result = cli("train", "recipe.yaml", "--resume", run, "--plugin", "mtl.py")
    assert result.exit_code == 0, result.output
    assert "data order restarts" in result.output


@pytest.mark.slow
@pytest.mark.parametrize(
    ("changes", "expected", "where"),
    [
        ({"model__args": {"fail": True}}, "returned dict, expected a torch.nn.Module", None),
        # 2 micro-batches a step: the 7th, the bad one, is step 4's
        ({"data__args": {"fail": "provider"}}, "the provider returned a Tensor", "step 4"),
        (
            {"losses__b__args": {"task": 1, "fail_after": 10}},  # 4 loss calls a step
            "returned a torch.float32 tensor of shape (8,)",
            "step 3",
        ),
        (
            {"eval__args": {"fail": True}},
            "returned mae_a='low' (str); expected a float",
            "the evaluation after step 3",
        ),
        (
            {"checkpoint__best_metric": "eval/scor"},
            "checkpoint.best_metric is eval/scor, but the evaluation reports eval/mae_a, "
            "eval/mae_b, eval/score",
            "the evaluation after step 3",
        ),
    ],
    ids=["model", "provider", "loss", "evaluate", "best-metric"],
)
def test_a_component_that_breaks_its_contract_is_named(cli, project, changes, expected, where):
    _edit(project / "recipe.yaml", **changes)
    result = cli("train", "recipe.yaml", "--plugin", "mtl.py", "--run-name", "r")
    assert result.exit_code == 1, result.output
    assert expected in result.output
    run = project / "runs" / "recipe" / "r"
    if where is None:  # the run could not be built: nothing was created
        assert "building the run failed" in result.output and not run.exists()
        return
    assert f"training failed at {where}: ComponentError" in result.output
    import torch

    # The last checkpoint written before the failure stays: every 2 steps, and after an
    # evaluation that improved the best metric (step 3's, unless that evaluation failed).
    last_good = 3 if where == "step 4" else 2
    checkpoint = torch.load(run / "checkpoints" / "latest.pt", weights_only=True)
    assert checkpoint["step"] == last_good


def test_a_trusted_folder_cannot_shadow_other_modules(tmp_path):
    """A trusted folder is searched after everything else: its csv.py is not `import csv`."""
    import importlib.machinery

    (tmp_path / "csv.py").write_text("raise SystemExit('shadowed')\n")
    PluginRoots.from_options([str(tmp_path)], entry_points=False)
    assert str(tmp_path) in sys.path
    spec = importlib.machinery.PathFinder.find_spec("csv")
    assert spec is not None and not spec.origin.startswith(str(tmp_path))


@pytest.mark.slow
def test_compare_and_bench_take_the_same_plugin_roots(cli, project):
    out = _usage_error(cli("compare", "recipe.yaml", "--methods", "conductor,sum"))
    assert "not under a plugin root" in out and not (project / "runs").exists()
    result = cli(
        "compare", "recipe.yaml", "--plugin", "mtl.py", "--methods", "conductor,sum", "--name", "c"
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((project / "runs/recipe/compare-c/summary.json").read_text())
    # The user's metrics, each ranked the way eval.higher_is_better says.
    assert summary["better"] == {"mae_a": "min", "mae_b": "min", "score": "max"}
    assert set(summary["results"]["sum"]) >= {"final/mae_a", "final/score"}
    result = cli(
        "bench", "recipe.yaml", "--plugin", "mtl.py", "--methods", "conductor", "--steps", "1",
        "--warmup", "1", "--rounds", "1",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "micro-batches of 8, K=2 losses" in result.output
