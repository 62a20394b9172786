"""The `gcond` command line. Commands parse their arguments, load the recipe and delegate."""

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from gcond_cli.recipe import (
    Recipe,
    RecipeError,
    bundled_recipes,
    dump_recipe_yaml,
    load_recipe,
    name_problem,
    resolve_recipe_path,
)

app = typer.Typer(
    name="gcond",
    help=(
        "Train vision models with several losses using GradientConductor, which resolves "
        "conflicts between per-loss gradients accumulated over micro-batches, and watch "
        "how the losses conflict.\n\n"
        "Recipes are YAML files (see `gcond recipes`); any key can be overridden on the "
        "command line as KEY=VALUE, e.g. `gcond train mae_l1_ssim optimizer.lr=3e-4`. "
        "Follow a run with `tensorboard --logdir runs`."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

RecipeArg = Annotated[
    str,
    typer.Argument(
        metavar="RECIPE",
        help="Recipe YAML file, or the name of a bundled recipe (`gcond recipes` lists them).",
        show_default=False,
    ),
]
OverridesArg = Annotated[
    list[str] | None,
    typer.Argument(
        metavar="KEY=VALUE...",
        help="Overrides of recipe keys, dotted, values parsed as YAML: "
        "optimizer.lr=3e-4 conductor.accumulation_steps=16 optimizer.betas=[0.0,0.95]",
        show_default=False,
    ),
]


def _check_run_name(value: str | None) -> str | None:
    problem = value is not None and name_problem(value)
    if problem:
        raise typer.BadParameter(f"got {value!r}, expected {problem}")
    return value


def _load(recipe: str, overrides: Sequence[str] | None) -> tuple[Recipe, Path]:
    """The validated recipe and its file; on a bad recipe print every error and exit 2."""
    path = resolve_recipe_path(recipe)
    try:
        return load_recipe(path, overrides or ()), path
    except RecipeError as exc:
        console = Console(stderr=True)
        count = f"{len(exc.errors)} problem" + ("s" if len(exc.errors) > 1 else "")
        header = Text(f"Recipe error in {exc.source or path} ({count}):", style="bold red")
        console.print(header, soft_wrap=True)
        for line in exc.errors:
            console.print(Text(f"  - {line}"), soft_wrap=True)
        raise typer.Exit(2) from None


@app.command()
def train(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    run_name: Annotated[
        str | None,
        typer.Option(
            "--run-name",
            metavar="NAME",
            help="Name of the run directory under runs/<recipe name>/ "
            "(letters, digits, '.', '_' and '-'); default: a fresh name.",
            callback=_check_run_name,
            show_default=False,
        ),
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option(
            "--resume",
            metavar="RUN_DIR",
            help="Continue the run in this directory from its latest checkpoint.",
            exists=True,
            file_okay=False,
            show_default=False,
        ),
    ] = None,
) -> None:
    """Train from a recipe; logs, TensorBoard events and checkpoints go to the run directory.

    Exit code 0 when training finishes, 1 when it fails, 2 on a bad recipe or argument.
    Ctrl-C stops after writing a checkpoint. Several GPUs:
    `torchrun --nproc-per-node 4 -m gcond_cli train RECIPE`.
    """
    loaded, path = _load(recipe, overrides)
    from gcond_cli.train import run_train  # imports torch: only once the recipe is known good

    raise typer.Exit(run_train(loaded, recipe_path=path, run_name=run_name, resume=resume))


@app.command()
def validate(recipe: RecipeArg, overrides: OverridesArg = None) -> None:
    """Check a recipe (with overrides) without training; print it resolved, every default filled in.

    Exit code 0 when the recipe is valid, 2 with every problem listed when it is not.
    """
    loaded, path = _load(recipe, overrides)
    typer.echo(f"# resolved from {path}" + "".join(f" {o}" for o in overrides or ()))
    typer.echo(dump_recipe_yaml(loaded), nl=False)
    typer.echo("# recipe OK")


@app.command()
def recipes() -> None:
    """List the bundled recipes; run one by name: `gcond train NAME`."""
    table = Table("recipe", "description", title="Bundled recipes")
    for file_name, description in bundled_recipes():
        table.add_row(Path(file_name).stem, description)
    Console().print(table)


def main() -> None:
    """Console entry point (`gcond`, `python -m gcond_cli`)."""
    app(prog_name="gcond")
