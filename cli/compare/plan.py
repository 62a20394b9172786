"""What a comparison runs: its plan (methods, variants, seeds, baselines, grid), saved as
``compare.json`` so ``--resume`` continues it as it was started, and the recipe of every run,
all validated before anything runs.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import RecipeError, UsageError
from ..methods import method_unavailable
from ..options import (
    SINGLE_TASK,
    parse_baselines,
    parse_grid,
    parse_methods,
    parse_variant,
    parse_variants,
)
from ..recipe import Recipe, load_recipe, recipe_from_dict, recipe_to_dict, recipes_dir
from ..run.files import RECIPE_FILE

PLAN_FILE = "compare.json"
DEFAULT_METHODS = ("conductor", "sum")
DEFAULT_BASELINE = "sum"


@dataclass(frozen=True)
class Entry:
    """One row of the comparison: a method, or a named variant of the recipe; or one run of
    ``single-task`` (``loss`` set: the recipe with that loss alone, trained with ``sum``)."""

    name: str
    overrides: tuple[str, ...]  # applied on top of the comparison's recipe
    variant: bool
    loss: str | None = None


@dataclass
class Plan:
    source: str  # where the recipe came from (for the report)
    overrides: list[str]  # the comparison's own KEY=VALUE overrides, already in its recipe
    methods: list[str]
    variants: dict[str, list[str]]
    seeds: list[int]
    baselines: list[str] = field(default_factory=lambda: [DEFAULT_BASELINE])  # judged against
    grid: dict[str, list[str]] = field(default_factory=dict)  # recipe key -> values, crossed
    losses: list[str] = field(default_factory=list)  # the recipe's, for single-task's runs

    @property
    def cells(self) -> list[tuple[str | None, tuple[str, ...]]]:
        """(directory name, overrides) of every cell of the grid; one unnamed cell without."""
        if not self.grid:
            return [(None, ())]
        keys = list(self.grid)
        cells = []
        for values in itertools.product(*(self.grid[k] for k in keys)):
            label = "_".join(
                f"{k.rsplit('.', 1)[-1]}{v}" for k, v in zip(keys, values, strict=True)
            )
            cells.append((label, tuple(f"{k}={v}" for k, v in zip(keys, values, strict=True))))
        return cells

    @property
    def baseline(self) -> str:
        """The first baseline: the one a grid's overview and the plots judge against."""
        return self.baselines[0]

    @property
    def entries(self) -> list[Entry]:
        """Every run of a seed: the methods, the variants, then single-task's one per loss."""
        methods = [
            Entry(m, (f"conductor.method={m}",), False) for m in self.methods if m != SINGLE_TASK
        ]
        variants = [Entry(n, tuple(o), True) for n, o in self.variants.items()]
        return methods + variants + self.single_task_entries

    @property
    def compared(self) -> list[Entry]:
        """The entries of the table and the verdicts (single-task's runs are apart)."""
        return [e for e in self.entries if e.loss is None]

    @property
    def single_task_entries(self) -> list[Entry]:
        """``single-task/<loss>``: the recipe with that loss alone, plain sum, no loss scale."""
        if SINGLE_TASK not in self.methods:
            return []
        overrides = ("conductor.method=sum", "loss_scale=none")
        return [Entry(f"{SINGLE_TASK}/{n}", overrides, False, loss=n) for n in self.losses]

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "overrides": self.overrides,
            "methods": self.methods,
            "variants": self.variants,
            "seeds": self.seeds,
            "baseline": self.baseline,  # the first, as plans before several baselines
            "baselines": self.baselines,
            "grid": self.grid,
            "losses": self.losses,
        }


def make_plan(
    recipe: Recipe,
    source: str,
    overrides: Sequence[str],
    methods: str | None,
    seeds: int | None,
    variants: Sequence[str],
    baseline: str | None = None,
    grid: Sequence[str] = (),
) -> Plan:
    method_names = parse_methods(methods) if methods is not None else list(DEFAULT_METHODS)
    parsed = parse_variants(variants, method_names)
    count = 1 if seeds is None else seeds
    if count < 1:
        raise UsageError(f"--seeds: got {count}, expected at least 1")
    entries = [m for m in [*method_names, *parsed] if m != SINGLE_TASK]
    if SINGLE_TASK in method_names and len(recipe.losses) < 2:
        raise UsageError(f"--methods {SINGLE_TASK}: the recipe has one loss, nothing to separate")
    if not entries:
        raise UsageError(f"--methods: {SINGLE_TASK} is compared against methods; add some")
    if baseline is None:
        baselines = [DEFAULT_BASELINE if DEFAULT_BASELINE in entries else entries[0]]
    else:
        baselines = parse_baselines(baseline, entries)
    return Plan(
        source=source,
        overrides=list(overrides),
        methods=method_names,
        variants=parsed,
        seeds=[recipe.seed + i for i in range(count)],
        baselines=baselines,
        grid=parse_grid(grid),
        losses=list(recipe.losses),
    )


def check_resume_request(
    plan: Plan,
    methods: str | None,
    seeds: int | None,
    variants: Sequence[str],
    baseline: str | None = None,
    grid: Sequence[str] = (),
) -> None:
    """On ``--resume`` the saved plan is used; options that would change it are refused."""
    differ = []
    if grid and parse_grid(grid) != plan.grid:
        differ.append("the same --grid options")
    if baseline is not None and [b.strip() for b in baseline.split(",")] != plan.baselines:
        differ.append(f"--baseline {','.join(plan.baselines)}")
    if methods is not None and parse_methods(methods) != plan.methods:
        differ.append(f"--methods {','.join(plan.methods)}")
    if seeds is not None and seeds != len(plan.seeds):
        differ.append(f"--seeds {len(plan.seeds)}")
    if variants and dict(parse_variant(v) for v in variants) != plan.variants:
        differ.append("the same --variant options")
    if differ:
        raise UsageError(
            "--resume continues the comparison as it was started; drop the options or pass "
            + ", ".join(differ)
        )


def _run_recipes(base: Recipe, plan: Plan) -> dict[tuple[str, int], Recipe]:
    """The recipe of every (entry, seed), all validated before anything runs."""
    raw = recipe_to_dict(base)
    recipes, errors = {}, []
    for entry in plan.entries:
        own = raw
        if entry.loss is not None:
            own = {**raw, "losses": {entry.loss: raw["losses"][entry.loss]}}
        try:
            for seed in plan.seeds:
                recipes[entry.name, seed] = recipe_from_dict(
                    own, [*entry.overrides, f"seed={seed}"]
                )
        except RecipeError as exc:
            errors += [f"{entry.name}: {line}" for line in exc.errors]
    if errors:
        raise RecipeError(errors)
    for entry in plan.entries:
        method = recipes[entry.name, plan.seeds[0]].conductor.method
        reason = method_unavailable(method)
        if reason:
            raise UsageError(f"{entry.name}: {reason}")
    return recipes


def cell_recipes(base: Recipe, plan: Plan) -> dict[str | None, dict[tuple[str, int], Recipe]]:
    """The recipe of every (entry, seed) of every cell, all validated before anything runs."""
    cells, errors = {}, []
    for label, overrides in plan.cells:
        try:
            cell_base = recipe_from_dict(recipe_to_dict(base), list(overrides)) if label else base
            cells[label] = _run_recipes(cell_base, plan)
        except RecipeError as exc:
            errors += [f"{label}: {line}" if label else line for line in exc.errors]
    if errors:
        raise RecipeError(errors)
    return cells


def load_plan(compare_dir: Path, given: Recipe | None) -> tuple[Plan, Recipe]:
    plan_path, recipe_path = compare_dir / PLAN_FILE, compare_dir / RECIPE_FILE
    if not plan_path.is_file() or not recipe_path.is_file():
        raise UsageError(
            f"--resume {compare_dir}: no {PLAN_FILE} / {RECIPE_FILE} there; "
            "is it a gcond compare directory?"
        )
    data = json.loads(plan_path.read_text())
    plan = Plan(**{k: data[k] for k in ("source", "overrides", "methods", "variants", "seeds")})
    # Plans written before several baselines have one; before --baseline, none.
    plan.baselines = data.get("baselines") or [data.get("baseline", DEFAULT_BASELINE)]
    plan.grid = data.get("grid", {})
    plan.losses = data.get("losses", [])
    try:
        base = load_recipe(recipe_path)
    except RecipeError as exc:
        raise UsageError(f"--resume {compare_dir}: its {RECIPE_FILE} is invalid:\n{exc}") from None
    if given is not None and recipe_to_dict(given) != recipe_to_dict(base):
        raise UsageError(
            f"--resume {compare_dir}: the recipe given differs from the one the comparison "
            f"started with (saved in {recipe_path}); pass no RECIPE to continue with that one"
        )
    return plan, base


def display_path(path: Path) -> str:
    """A recipe path for reports: a bundled recipe by name, a path under the working directory
    relative to it, anything else as it is (never this machine's absolute path to a file
    the user named relatively)."""
    resolved = path.resolve()
    if resolved.parent == recipes_dir().resolve():
        return resolved.stem
    try:
        return str(resolved.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)
