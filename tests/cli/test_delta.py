"""Δm against single-task learning and against sum: the formula on hand-made numbers (signs
for metrics better lower and higher), the single-task entry's plan (one run per loss, that loss
alone, plain sum) and its refusals."""

from __future__ import annotations

import pytest

from gcond_cli.compare.delta import delta_m, delta_m_table
from gcond_cli.compare.plan import make_plan
from gcond_cli.errors import UsageError
from gcond_cli.recipe import load_recipe


def test_delta_m_is_the_mean_signed_relative_change_in_percent():
    # err (lower better) 0.5 -> 0.6 is +20 % worse; acc (higher better) 0.8 -> 0.9 is 12.5 %
    # better: Δm = (20 − 12.5) / 2 = +3.75 %.
    better = {"a": "min", "b": "max"}
    assert delta_m({"a": 0.6, "b": 0.9}, {"a": 0.5, "b": 0.8}, better) == pytest.approx(3.75)
    assert delta_m({"a": 0.5, "b": 0.8}, {"a": 0.5, "b": 0.8}, better) == 0.0
    assert delta_m({"a": 0.6}, {"a": 0.5, "b": 0.8}, better) is None  # a task missing
    assert delta_m({"a": 0.6, "b": 0.9}, {"a": 0.0, "b": 0.8}, better) is None  # a zero base


def _run(**values: float) -> dict:
    evals = {f"eval/m_{k}": v for k, v in values.items()}
    return {"eval_selected": evals, "eval_final": evals}


def test_the_table_uses_the_mean_single_task_base_and_pairs_sum_by_seed():
    metrics, better = {"x": "m_x", "y": "m_y"}, {"x": "min", "y": "min"}
    single = {
        "x": {"0": _run(x=1.0), "1": _run(x=3.0)},  # base x = 2
        "y": {"0": _run(y=4.0), "1": _run(y=4.0)},  # base y = 4
    }
    runs = {
        "sum": {"0": _run(x=2.0, y=4.0), "1": _run(x=4.0, y=8.0)},
        "other": {"0": _run(x=1.0, y=4.0), "1": _run(x=2.0, y=4.0)},
    }
    table = delta_m_table(runs, single, metrics, better, "sum")
    assert table["single_task"]["selected"]["x"]["mean"] == 2.0
    rows = table["entries"]
    # sum: seed 0 (0 + 0)/2 = 0 %, seed 1 (+100 + +100)/2 = +100 %.
    assert rows["sum"]["selected"]["vs_single_task"]["values"] == {"0": 0.0, "1": 100.0}
    assert rows["sum"]["selected"]["vs_single_task"]["mean"] == 50.0
    # other vs sum, paired: seed 0 (−50 + 0)/2 = −25 %, seed 1 (−50 + −50)/2 = −50 %.
    assert rows["other"]["final"]["vs_sum"]["values"] == {"0": -25.0, "1": -50.0}
    assert "vs_sum" not in rows["sum"]["final"]
    # single-task as an entry: task k from its own run, so against its own mean base.
    stl = rows["single-task"]["selected"]["vs_single_task"]["values"]
    assert stl == {"0": pytest.approx(-25.0), "1": pytest.approx(25.0)}
    assert rows["single-task"]["selected"]["vs_sum"]["values"] == {
        "0": pytest.approx(-25.0),
        "1": pytest.approx((-25.0 - 50.0) / 2),
    }


def test_single_task_plans_one_run_per_loss_on_that_loss_alone():
    recipe = load_recipe("conflict_lab")
    plan = make_plan(recipe, "conflict_lab", [], "sum,conductor,single-task", 2, [])
    names = [e.name for e in plan.entries]
    assert names == ["sum", "conductor", *(f"single-task/{n}" for n in recipe.losses)]
    assert [e.name for e in plan.compared] == ["sum", "conductor"]
    assert plan.baselines == ["sum"]
    from gcond_cli.compare.plan import cell_recipes

    recipes = cell_recipes(recipe, plan)[None]
    for name in recipe.losses:
        run = recipes[f"single-task/{name}", recipe.seed]
        assert list(run.losses) == [name]
        assert run.conductor.method == "sum" and run.loss_scale == "none"
        assert run.model == recipe.model and run.schedule == recipe.schedule


def test_single_task_is_refused_alone_or_with_one_loss():
    recipe = load_recipe("conflict_lab")
    with pytest.raises(UsageError, match="compared against methods"):
        make_plan(recipe, "conflict_lab", [], "single-task", 1, [])
    with pytest.raises(UsageError, match="--baseline 'single-task'"):
        make_plan(recipe, "conflict_lab", [], "sum,single-task", 1, [], baseline="single-task")
    one = load_recipe("conflict_lab", ["losses={a: {kind: task_mse, weight: 1.0}}"])
    with pytest.raises(UsageError, match="one loss"):
        make_plan(one, "conflict_lab", [], "sum,single-task", 1, [])
