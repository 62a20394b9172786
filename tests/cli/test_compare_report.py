"""The pure parts of `gcond compare`, on hand-written run summaries (no training): its plan,
`summarize`, the verdicts against one or several baselines, `report.md` and the console."""

import json
from pathlib import Path

import pytest
from rich.console import Console

from gcond_cli.compare.console import print_table, print_verdicts
from gcond_cli.compare.plan import (
    Plan,
    cell_recipes,
    check_resume_request,
    load_plan,
    make_plan,
)
from gcond_cli.compare.report import render_report
from gcond_cli.compare.results import summarize
from gcond_cli.errors import UsageError
from gcond_cli.recipe import dump_recipe_yaml, load_recipe
from tests.helpers import TINY

METHODS = "conductor,sum,sum-log"
SEEDS = 3
# Final SSIM per entry and seed: conductor beats sum everywhere, sum-log by less.
SSIM = {
    "conductor": [0.60, 0.62, 0.64],
    "sum": [0.50, 0.51, 0.52],
    "sum-log": [0.58, 0.61, 0.63],
}


def _run_summary(name: str, seed: int) -> dict:
    ssim = SSIM[name][seed]
    conflict = None if name != "conductor" else {"share": 0.25, "mean_cosine": 0.1}
    return {
        "seed": seed,
        "device": "cpu",
        "train_seconds": 10.0 + seed,
        "median_step_seconds": {"conductor": 0.2, "sum": 0.1, "sum-log": 0.1}[name],
        "eval_final": {"eval/ssim": ssim, "eval/l1": 1 - ssim},
        "eval_best": {"eval/ssim": ssim + 0.01, "eval/l1": 0.99 - ssim},
        "conflict": conflict,
        "norm_ratio": None,
        "first_batch_sha256": f"seed{seed}",
    }


@pytest.fixture
def compared(tmp_path: Path) -> tuple[Path, Plan, dict]:
    recipe = load_recipe(TINY)
    plan = make_plan(recipe, "tiny", [], METHODS, SEEDS, [], "sum,sum-log")
    for entry in plan.entries:
        for seed in plan.seeds:
            run_dir = tmp_path / entry.name / f"seed{seed}"
            run_dir.mkdir(parents=True)
            (run_dir / "summary.json").write_text(json.dumps(_run_summary(entry.name, seed)))
    recipes = cell_recipes(recipe, plan)[None]
    return tmp_path, plan, summarize(tmp_path, plan, recipes)


def test_a_plan_with_several_baselines() -> None:
    recipe = load_recipe(TINY)
    plan = make_plan(recipe, "tiny", [], METHODS, 2, [], "sum,sum-log")
    assert plan.baselines == ["sum", "sum-log"] and plan.baseline == "sum"
    assert plan.to_dict()["baselines"] == ["sum", "sum-log"]
    assert make_plan(recipe, "tiny", [], METHODS, 2, [], None).baselines == ["sum"]
    assert make_plan(recipe, "tiny", [], "conductor", 2, [], None).baselines == ["conductor"]
    with pytest.raises(UsageError, match="not among the compared"):
        make_plan(recipe, "tiny", [], "conductor,sum", 2, [], "sum,sum-log")
    check_resume_request(plan, None, None, [], "sum,sum-log")
    with pytest.raises(UsageError, match="--baseline sum,sum-log"):
        check_resume_request(plan, None, None, [], "sum")


def test_plans_are_resumed_with_their_baselines(tmp_path: Path) -> None:
    recipe = load_recipe(TINY)
    plan = make_plan(recipe, "tiny", [], METHODS, 2, [], "sum,sum-log")
    (tmp_path / "compare.json").write_text(json.dumps(plan.to_dict()))
    (tmp_path / "recipe.yaml").write_text(dump_recipe_yaml(recipe))
    assert load_plan(tmp_path, None)[0].baselines == ["sum", "sum-log"]
    old = {k: v for k, v in plan.to_dict().items() if k not in ("baselines", "baseline")}
    (tmp_path / "compare.json").write_text(json.dumps(old))  # written before --baseline
    assert load_plan(tmp_path, None)[0].baselines == ["sum"]


def test_summary_has_verdicts_against_every_baseline(compared) -> None:
    _, _, summary = compared
    assert summary["baseline"] == "sum" and summary["baselines"] == ["sum", "sum-log"]
    by_baseline = summary["verdicts_by_baseline"]
    assert set(by_baseline) == {"sum", "sum-log"}
    assert summary["verdicts"] == by_baseline["sum"]
    assert set(by_baseline["sum"]) == {"conductor", "sum-log"}
    assert set(by_baseline["sum-log"]) == {"conductor", "sum"}
    against_sum = by_baseline["sum"]["conductor"]["ssim"]
    assert against_sum["mean"] == pytest.approx(0.11) and against_sum["label"] == "better"
    against_log = by_baseline["sum-log"]["conductor"]["ssim"]
    assert against_log["mean"] == pytest.approx(0.04 / 3)
    assert by_baseline["sum-log"]["sum"]["ssim"]["label"] == "worse"
    assert len(summary["sentences"]) == 4  # two entries against each of two baselines
    json.dumps(summary, allow_nan=False)  # summary.json


def test_summary_columns_and_best(compared) -> None:
    _, _, summary = compared
    assert summary["metrics"] == {"l1": "min", "ssim": "max"}
    assert summary["primary_metric"] == "ssim"
    best = {c["key"]: c["best"] for c in summary["columns"]}
    assert best["final/ssim"] == "conductor" and best["step_seconds"] in ("sum", "sum-log")
    assert summary["results"]["conductor"]["ratio_to_sum"]["mean"] == pytest.approx(2.0)
    assert summary["data_check"]["identical"] and not summary["warnings"]


def test_report_has_a_section_per_baseline(compared) -> None:
    _, _, summary = compared
    report = render_report(summary)
    assert "## Does it beat `sum`?" in report and "## Does it beat `sum-log`?" in report
    assert "| vs sum |" in report and "| vs sum-log |" in report
    assert report.index("`sum`?") < report.index("`sum-log`?")
    assert "conductor vs sum-log: SSIM" in report


def test_console_prints_the_verdicts_against_every_baseline(compared) -> None:
    _, _, summary = compared
    out = Console(record=True, width=200)
    print_table(out, summary)
    print_verdicts(out, summary)
    text = out.export_text()
    assert "Differences to sum," in text and "Differences to sum-log," in text
    assert "conductor vs sum: SSIM" in text and "conductor vs sum-log: SSIM" in text


def test_a_summary_from_before_several_baselines_still_renders(compared) -> None:
    _, _, summary = compared
    old = {
        k: v
        for k, v in summary.items()
        if k not in ("baselines", "verdicts_by_baseline", "sentences_by_baseline")
    }
    report = render_report(old)
    assert "## Does it beat `sum`?" in report and "`sum-log`?" not in report


def test_a_run_reports_how_much_it_resolved_and_what_it_left_to_noise():
    from gcond_cli.compare.results import _resolution

    train = [
        {"proj_iters": 2.0, "conflicts/noise": 0.0},
        {"proj_iters": 0.0, "conflicts/noise": 1.0},
        {"proj_iters": 0.0, "conflicts/noise": 0.0},
        {"proj_iters": 1.0, "conflicts/noise": 0.0},
    ]
    assert _resolution(train) == {
        "proj_iters": 0.75,
        "resolved_share": 0.5,
        "left_to_noise": 0.25,
    }
    assert _resolution([{"loss/total": 1.0}]) is None  # sum, the peers: nothing to report
