"""Recipe schema, YAML loading and overrides (cli/recipe.py)."""

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from gcond_cli.recipe import (
    ConductorConfig,
    Recipe,
    RecipeError,
    bundled_recipes,
    dump_recipe_yaml,
    load_recipe,
    recipe_to_dict,
    recipes_dir,
    resolve_recipe_path,
)
from tests.helpers import TINY

BUNDLED = [name for name, _ in bundled_recipes()]


def _errors(path: str | Path, overrides: list[str] | tuple = ()) -> list[str]:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    return info.value.errors


def test_the_bundled_recipes_are_the_expected_ones():
    assert {"mae_l1_ssim.yaml", "multitask_rotation.yaml", "mae_stl10.yaml"} <= set(BUNDLED)
    assert all(description for _, description in bundled_recipes())


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_recipe_validates_and_round_trips(name, tmp_path):
    recipe = load_recipe(recipes_dir() / name)
    assert recipe.name == Path(name).stem
    dumped = tmp_path / "resolved.yaml"
    dumped.write_text(dump_recipe_yaml(recipe))
    assert load_recipe(dumped) == recipe
    assert yaml.safe_load(dump_recipe_yaml(recipe)) == recipe_to_dict(recipe)


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_recipe_header_shows_how_to_run_it(name):
    header = (recipes_dir() / name).read_text().split("\n\n")[0]
    assert f"gcond train {Path(name).stem}" in header
    assert "=" in header  # an override example


def test_mae_l1_ssim_spells_out_every_conductor_parameter():
    raw = yaml.safe_load((recipes_dir() / "mae_l1_ssim.yaml").read_text())
    assert list(raw["conductor"]) == list(ConductorConfig.model_fields)
    assert load_recipe("mae_l1_ssim").conductor == ConductorConfig(accumulation_steps=8)


def test_tiny_test_recipe_validates():
    recipe = load_recipe(TINY)
    assert recipe.name == "tiny"
    assert recipe.data.dataset == "synthetic"
    assert recipe.schedule.max_steps == 4


def test_bare_names_resolve_to_bundled_recipes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bundled = recipes_dir() / "mae_l1_ssim.yaml"
    assert resolve_recipe_path("mae_l1_ssim") == bundled
    assert resolve_recipe_path("mae_l1_ssim.yaml") == bundled
    (tmp_path / "mae_l1_ssim.yaml").write_text(TINY.read_text())
    assert resolve_recipe_path("mae_l1_ssim.yaml") == Path("mae_l1_ssim.yaml")  # a file wins


def test_overrides_set_values_parsed_as_yaml():
    recipe = load_recipe(
        TINY,
        [
            "optimizer.lr=3e-4",
            "optimizer.betas=[0.0,0.95]",
            "conductor.norm_cap=2.5",
            "conductor.projection_max_iters=null",
            "data.augment.vflip=0.5",
            "losses.ce.kind=mse",
            "losses.ce.weight=0.1",
            "name=renamed",
        ],
    )
    assert recipe.optimizer.lr == pytest.approx(3e-4)
    assert recipe.optimizer.betas == (0.0, 0.95)
    assert recipe.conductor.norm_cap == 2.5
    assert recipe.conductor.projection_max_iters is None
    assert recipe.data.augment.vflip == 0.5
    assert recipe.losses["ce"].kind == "mse"
    assert recipe.name == "renamed"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("optimizer.lr", "expected KEY=VALUE"),
        ("=3", "expected KEY=VALUE"),
        ("optimizer..lr=3", "expected KEY=VALUE"),
        ("data.image_size.side=3", "'data.image_size' is 16, not a mapping"),
        ("seed=[1, 2", "invalid YAML"),
        ("seed=!!python/object/apply:os.getcwd []", "Python object tags are refused"),
    ],
)
def test_malformed_overrides_are_errors(override, expected):
    errors = _errors(TINY, [override])
    assert len(errors) == 1
    assert errors[0].startswith(f"override '{override}'")
    assert expected in errors[0]


def test_errors_name_the_override_that_caused_them():
    (line,) = _errors(TINY, ["optimizer.lr=-1"])
    assert line == (
        "optimizer.lr: got -1, expected a number > 0.0 (from override 'optimizer.lr=-1')"
    )


def test_all_errors_are_reported_at_once(tmp_path):
    raw = yaml.safe_load(TINY.read_text())
    raw["data"]["image_sise"] = 32
    raw["model"]["dim"] = 0
    raw["conductor"]["conflict_thresholds"] = [0.0, -0.5, -0.8]
    raw["losses"]["l1"]["kind"] = "l2"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    errors = _errors(path, ["optimizer.lr=oops", "optimizer.lr.x=1"])
    text = "\n".join(errors)
    for key in (
        "data.image_sise",
        "model.dim",
        "conductor.conflict_thresholds",
        "losses.l1.kind",
        "optimizer.lr",
        "override 'optimizer.lr.x=1'",
    ):
        assert key in text
    assert len(errors) == 6


def test_duplicate_keys_are_refused(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text(TINY.read_text() + "\nseed: 3\n")
    (line,) = _errors(path)
    assert "duplicate key 'seed'" in line
    assert line.startswith(f"{path}:")


def test_recipe_error_str_joins_the_lines():
    error = RecipeError(["a: bad", "b: worse"])
    assert str(error) == "a: bad\nb: worse"


def test_rules_between_fields_hold_when_building_a_recipe_in_python():
    raw = recipe_to_dict(load_recipe(TINY))
    raw["conductor"].update(accumulation="stochastic", accumulation_steps=1)
    with pytest.raises(ValidationError, match="stochastic"):
        Recipe.model_validate(raw)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["data.labels=rotation", "model.num_classes=4"], "losses"),
        (
            ["data.labels=rotation", "losses.rot.kind=cross_entropy", "losses.rot.weight=1"],
            "model.num_classes",
        ),
        (
            ["losses.rot.kind=cross_entropy", "losses.rot.weight=1", "model.num_classes=4"],
            "data.labels",
        ),
        (["model.patch_size=8", "data.mask.patch_size=2"], "model.patch_size"),
        (["data.image_size=18"], "data.image_size"),
        (["data.dataset=imagefolder"], "data.root"),
        (["conductor.use_lion=true"], "conductor.momentum_beta"),
        (["schedule.warmup_steps=5"], "schedule.warmup_steps"),
        (["losses.ssim.win_size=17"], "losses.ssim.win_size"),
        (["losses.ssim.kind=ms_ssim"], "losses.ssim.win_size"),
        (["losses.l1.weight=0", "losses.ssim.weight=0"], "losses"),
        (["losses.total.kind=l1", "losses.total.weight=1"], "losses.total"),
        (["model.heads=3"], "model.dim"),
        (
            ["conductor.method=conductor-stochastic", "conductor.accumulation_steps=1"],
            "conductor.accumulation_steps",
        ),
        (
            ["optimizer.name=sgd", "optimizer.nesterov=true", "optimizer.momentum=0"],
            "optimizer.nesterov",
        ),
        (["checkpoint.best_metric=eval/accuracy"], "checkpoint.best_metric"),
        (["checkpoint.best_metric=eval/l1"], "checkpoint.best_mode"),
        (["name=a/b"], "name"),
        (["conductor.tie_breaking_weights=[0, 0]"], "conductor.tie_breaking_weights"),
        (["data.augment.crop_scale=[0.9, 0.5]"], "data.augment.crop_scale"),
        (["losses.ssim.win_size=8"], "losses.ssim.win_size"),
        (["device=gpu"], "device"),
    ],
)
def test_rule_violations_name_the_key(overrides, key):
    errors = _errors(TINY, overrides)
    assert any(line.startswith(f"{key}: got ") for line in errors), errors


def test_missing_sections_and_non_mapping_files(tmp_path):
    path = tmp_path / "partial.yaml"
    path.write_text("model: {name: mae_vit}\n")
    errors = _errors(path)
    assert errors == ["losses: required key is missing", "schedule: required key is missing"]
    path.write_text("- 1\n- 2\n")
    assert _errors(path) == [f"{path}: got [1, 2], expected a mapping of recipe keys"]
    path.write_text("")
    assert _errors(path) == [f"{path}: got an empty file, expected a mapping of recipe keys"]
