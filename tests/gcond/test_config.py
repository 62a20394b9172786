"""``ConductorConfig``: one place for every tuning parameter, its default, its checks, its repr;
the constructor's keyword arguments and the original GCond's spellings map onto it."""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import gcond._config as config_module
from gcond import ConductorConfig, GradientConductor


def _conductor(**kwargs):
    model = nn.Linear(3, 2)
    fns = {"a": lambda out, y: out.mean(), "b": lambda out, y: out.pow(2).mean()}
    return GradientConductor(model, fns, {"a": 1.0, "b": 0.5}, **kwargs)


def test_defaults_repr_and_frozen():
    config = ConductorConfig()
    assert config.accumulation == "full" and config.momentum_beta == 0.0
    for field in dataclasses.fields(ConductorConfig):
        assert f"{field.name}=" in repr(config)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.momentum_beta = 0.9  # type: ignore[misc]


def test_every_field_is_documented_in_the_docstring():
    for field in dataclasses.fields(ConductorConfig):
        assert f"``{field.name}``" in ConductorConfig.__doc__, field.name


def test_values_are_normalised_once():
    config = ConductorConfig(
        conflict_thresholds=[-1, 0, 0], momentum_beta=0, grad_dtype=torch.bfloat16
    )
    assert config.conflict_thresholds == (-1.0, 0.0, 0.0)
    assert isinstance(config.momentum_beta, float)
    assert config.grad_dtype == "bfloat16"


def test_check_reports_every_problem_at_once_without_raising():
    problems = ConductorConfig.check(
        accumulation_steps=0, conflict_thresholds=(-1.5, -0.5, 2.0), use_lion=True
    )
    assert [p.key for p in problems] == [
        "accumulation_steps",
        "conflict_thresholds[0]",
        "conflict_thresholds[2]",
        "momentum_beta",
    ]
    assert problems[1].expected == "a number in [-1.0, 1.0]"
    with pytest.raises(TypeError, match="did you mean 'momentum_beta'"):
        ConductorConfig.check(momentum_bta=0.9)


def test_the_rule_needing_the_number_of_losses_is_written_once():
    config = ConductorConfig(accumulation_steps=1, accumulation="stochastic")
    (problem,) = config.problems_with_losses(2)
    assert problem.path == ("accumulation_steps",) and "number of losses (2)" in problem.expected
    with pytest.raises(ValueError, match=r"accumulation_steps must be at least the number"):
        _conductor(config=config)


def test_keyword_arguments_map_onto_the_config():
    base = ConductorConfig(accumulation_steps=4, momentum_beta=0.9)
    conductor = _conductor(config=base, use_lion=True)
    assert conductor.config == dataclasses.replace(base, use_lion=True)
    assert _conductor(accumulation_steps=3).config.accumulation_steps == 3
    with pytest.raises(TypeError, match="did you mean 'norm_cap'"):
        _conductor(norm_capp=1.0)
    with pytest.raises(TypeError, match=r"config must be a gcond\.ConductorConfig"):
        _conductor(config={"momentum_beta": 0.9})


def test_the_constructor_signature_does_not_repeat_the_parameters():
    names = set(inspect.signature(GradientConductor).parameters)
    assert not names & {f.name for f in dataclasses.fields(ConductorConfig)} - {
        "accumulation_steps"
    }


def test_checking_a_config_does_not_load_torch():
    code = (
        "import sys\n"
        "from gcond._config import ConductorConfig\n"
        "ConductorConfig.check(momentum_beta=2.0)\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------ the original GCond


def test_the_original_import_path_works():
    from gcond.grad_conductor import GradientConductor as Original

    assert Original is GradientConductor


@pytest.mark.parametrize(
    ("old", "value", "new", "expected"),
    [
        ("use_smooth_logic", True, "resolution", "smooth"),
        ("use_smooth_logic", False, "resolution", "zones"),
        ("stochastic_accumulation", True, "accumulation", "stochastic"),
        ("stochastic_accumulation", False, "accumulation", "full"),
    ],
)
def test_original_spellings_are_accepted_with_one_warning(monkeypatch, old, value, new, expected):
    monkeypatch.setattr(config_module, "_warned", set())
    with pytest.warns(FutureWarning, match=f"write {new}='{expected}'"):
        conductor = _conductor(accumulation_steps=2, **{old: value})
    assert getattr(conductor.config, new) == expected
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _conductor(accumulation_steps=2, **{old: value})  # once per process


def test_an_original_spelling_and_its_new_name_together_are_refused():
    with pytest.raises(TypeError, match="pass only resolution="):
        _conductor(use_smooth_logic=True, resolution="zones")


@pytest.mark.parametrize("value", ["avg", "broadcast"])
def test_original_ddp_sync_values_are_refused_saying_what_ours_do(value):
    with pytest.raises(ValueError, match="original GCond") as error:
        _conductor(ddp_sync=value)
    assert "ddp_sync='grads'" in str(error.value) and "ddp_sync='update'" in str(error.value)
