"""The harness's side of ``conductor.gradients_at: representation`` and
``conductor.resolve_every``: recipe keys, the model's ``trunk(x)``/``heads(z)`` contract, and a
short training run (docs/algorithm.md, "Gradients at the representation")."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from gcond_cli.app import app
from gcond_cli.errors import UsageError
from gcond_cli.lab import LabMLP
from gcond_cli.methods import model_split

runner = CliRunner()


def test_a_built_in_model_without_a_split_is_refused_by_validate():
    result = runner.invoke(
        app, ["validate", "mae_l1_ssim", "conductor.gradients_at=representation"]
    )
    assert result.exit_code == 2, result.output
    assert "conductor.gradients_at" in result.output
    assert "trunk(x) and heads(z)" in result.output


def test_sum_ignores_gradients_at():
    overrides = ["conductor.gradients_at=representation", "conductor.method=sum"]
    result = runner.invoke(app, ["validate", "mae_l1_ssim", *overrides])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("conductor.resolve_every=0", "conductor.resolve_every: got 0, expected an integer >= 1"),
        ("conductor.gradients_at=trunk", "conductor.gradients_at: got 'trunk'"),
    ],
)
def test_bad_values_are_reported_with_their_key_path(override, expected):
    result = runner.invoke(app, ["validate", "conflict_lab", override])
    assert result.exit_code == 2
    assert expected in result.output


def test_a_model_without_trunk_and_heads_says_what_to_add():
    with pytest.raises(UsageError, match=r"add trunk\(x\) and heads\(z\) to your model"):
        model_split(nn.Linear(2, 2))


def test_lab_mlp_is_heads_of_its_trunk():
    torch.manual_seed(0)
    model = LabMLP(6, 3, 8, 2, ["t1", "t2"])
    trunk, heads = model_split(model)
    x = torch.randn(4, 6)
    whole, split = model(x), heads(trunk(x))
    assert all(torch.equal(whole[k], split[k]) for k in whole)


def test_train_the_lab_in_representation_mode_resolving_every_other_step(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    overrides = [
        "conductor.gradients_at=representation",
        "conductor.resolve_every=2",
        "schedule.max_steps=4",
        "schedule.warmup_steps=0",
        "eval.every=4",
        "checkpoint.every=4",
    ]
    result = runner.invoke(app, ["train", "conflict_lab", *overrides])
    assert result.exit_code == 0, result.output
    assert "done: 4 steps" in result.output
