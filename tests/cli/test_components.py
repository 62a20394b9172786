"""The registry: every built-in registered once, with its own typed section, and the recipe's
choices and messages read from it."""

from __future__ import annotations

from contextlib import nullcontext

import pytest

from gcond_cli.components import builtins, lookup, names, register
from gcond_cli.recipe import (
    LabModelConfig,
    MaeVitConfig,
    MaskedConvConfig,
    MultidigitsCnnConfig,
    Qm9MlpConfig,
    RecipeError,
    recipe_from_dict,
)
from gcond_cli.run.parts import build_parts
from tests.helpers import TINY


def test_the_built_ins_by_kind():
    assert names("model") == ("mae_vit", "masked_conv", "lab_mlp", "multidigits_cnn", "qm9_mlp")
    assert names("data") == (
        "embedded",
        "faces",
        "cifar10",
        "stl10",
        "imagefolder",
        "synthetic",
        "conflict_lab",
        "multidigits",
        "qm9",
    )
    assert names("loss") == (
        "l1",
        "mse",
        "ssim",
        "ms_ssim",
        "cross_entropy",
        "task_mse",
        "task_cross_entropy",
        "qm9_mse",
    )
    assert names("method") == (
        "conductor",
        "conductor-stochastic",
        "sum",
        "sum-log",
        "sum-normalized",
        "pcgrad",
        "upgrad",
        "mgda",
        "cagrad",
        "alignedmtl",
        "imtlg",
        "dualproj",
        "config",
        "nashmtl",
        "db-mtl",
        "geometric-mean",
        "famo",
        "uncertainty",
    )
    assert [lookup("model", n).section for n in names("model")] == [
        MaeVitConfig,
        MaskedConvConfig,
        LabModelConfig,
        MultidigitsCnnConfig,
        Qm9MlpConfig,
    ]


@pytest.mark.parametrize("kind", ["model", "data", "loss", "method"])
def test_every_builder_can_be_loaded(kind):
    for entry in builtins(kind).values():
        assert callable(entry.builder()), entry


def test_a_name_cannot_be_registered_twice():
    with pytest.raises(ValueError, match="built-in model 'mae_vit' is registered twice"):
        register("model", "mae_vit", "models:build_mae_vit")


def _raw(**model: object) -> dict:
    return {
        "model": model,
        "losses": {"l1": {"kind": "l1", "weight": 1.0}},
        "schedule": {"max_steps": 1},
    }


def _errors(raw: dict) -> list[str]:
    with pytest.raises(RecipeError) as caught:
        recipe_from_dict(raw)
    return caught.value.errors


def test_each_built_in_has_its_own_section():
    (error,) = _errors(_raw(name="mae_vit", backbone="resnet18"))
    assert error.startswith("model.backbone: unknown key; valid keys of mae_vit: ")
    (error,) = _errors(_raw(name="masked_conv", heads=4))
    assert error.startswith("model.heads: unknown key; valid keys of masked_conv: ")
    assert "backbone" in error and "patch_size" not in error
    (error,) = _errors(_raw(name="masked_conv", backbone="mobilenet v3"))
    assert error.startswith("model.backbone: got 'mobilenet v3', expected a string matching")


def test_a_wrong_name_lists_every_registered_choice():
    (error,) = _errors(_raw(name="mae_vt"))
    assert error == (
        "model.name: got 'mae_vt', expected one of 'mae_vit', 'masked_conv', 'lab_mlp', "
        "'multidigits_cnn', 'qm9_mlp', or target: 'module:function' for your own code; "
        "did you mean 'mae_vit'?"
    )
    (error,) = _errors(_raw(dim=8))
    assert error.startswith("model.name: required key is missing; expected one of 'mae_vit'")


def test_the_run_builder_builds_what_the_registry_names():
    import torch

    from gcond_cli.recipe import load_recipe

    recipe = load_recipe(TINY)
    parts = build_parts(recipe, torch.device("cpu"))
    assert type(parts.model).__name__ == "MaskedAutoencoderViT"
    assert sorted(parts.loss_fns) == sorted(recipe.losses)
    (x, _), _ = parts.provider()
    assert x.shape[0] == recipe.data.micro_batch_size
    with torch.no_grad():
        metrics, _ = parts.task.evaluate(parts.model.eval(), parts.data.val(), nullcontext)
    # What the recipe promises at validation time is what the evaluation reports.
    assert sorted(f"eval/{m}" for m in metrics) == sorted(recipe.metrics())
    assert parts.data_state()["micro_batches_served"] == 1
