"""The `gcond` command line. Commands parse their arguments, load the recipe and delegate."""

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .components import builtins
from .errors import EXIT_USAGE, GcondError, UsageError, print_error
from .plugins import PluginRoots, resolve_references
from .recipe import (
    Recipe,
    RecipeError,
    bundled_recipes,
    dump_recipe_yaml,
    load_recipe,
    missing_dependency,
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

VariantOption = Annotated[
    list[str] | None,
    typer.Option(
        "--variant",
        metavar="NAME:KEY=VALUE,...",
        help="Add a named variant of the recipe beside the methods (repeatable), e.g. "
        "seed-momentum:conductor.momentum_beta=0.9,optimizer.betas=[0.0,0.95] "
        "(bench: conductor.*, optimizer.*, clip_grad_norm, precision only).",
        show_default=False,
    ),
]
PluginOption = Annotated[
    list[str] | None,
    typer.Option(
        "--plugin",
        metavar="PATH_OR_PACKAGE",
        help="Trust this .py file, folder or installed package as a source of code for the "
        "recipe's `target:` references (repeatable). A plugin is code: give only what you trust. "
        "Packages with a 'gcond.plugins' entry point are trusted too.",
        show_default=False,
    ),
]
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


Command = TypeVar("Command", bound=Callable[..., None])


def _reports_errors(command: Command) -> Command:
    """The one path of the harness's own errors: a `GcondError` (bad recipe, data, checkpoint or
    request) is printed and exits 2, without a traceback. Any other exception is a bug and keeps
    its traceback (exit 1)."""

    @functools.wraps(command)
    def run(*args: object, **kwargs: object) -> None:
        try:
            command(*args, **kwargs)
        except GcondError as exc:
            print_error(exc)
            raise typer.Exit(EXIT_USAGE) from None

    return run  # type: ignore[return-value]


def _load(
    recipe: str, overrides: Sequence[str] | None, plugins: PluginRoots | None = None
) -> tuple[Recipe, Path]:
    """The validated recipe and its file; a bad recipe raises a RecipeError naming every problem.
    With ``plugins``, its references to the user's code are imported (from those roots only)
    and checked against their signatures too."""
    path = resolve_recipe_path(recipe)
    try:
        loaded = load_recipe(path, overrides or ())
        if plugins is not None:
            resolve_references(loaded, plugins)
        return loaded, path
    except RecipeError as exc:
        exc.source = exc.source or path
        raise


@app.command()
@_reports_errors
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
    plugin: PluginOption = None,
) -> None:
    """Train from a recipe; logs, TensorBoard events and checkpoints go to the run directory.

    Exit code 0 when training finishes, 1 when it fails, 2 on a bad recipe, data set, checkpoint
    or argument (the message says what to change; no traceback).
    Ctrl-C stops after writing a checkpoint. Several GPUs:
    `torchrun --nproc-per-node 4 -m gcond_cli train RECIPE`.
    """
    roots = PluginRoots.from_options(plugin or ())
    loaded, path = _load(recipe, overrides, None if resume else roots)
    from .train import run_train  # imports torch: only once the recipe is known good

    raise typer.Exit(
        run_train(loaded, recipe_path=path, run_name=run_name, resume=resume, plugins=roots)
    )


@app.command()
@_reports_errors
def compare(
    recipe: Annotated[
        str | None,
        typer.Argument(
            metavar="RECIPE",
            help="Recipe YAML file or bundled recipe name (optional with --resume).",
            show_default=False,
        ),
    ] = None,
    overrides: OverridesArg = None,
    methods: Annotated[
        str | None,
        typer.Option(
            "--methods",
            metavar="M1,M2",
            help="Methods to compare: conductor, conductor-stochastic, sum, the scale-only "
            "baselines sum-log and sum-normalized, with TorchJD pcgrad, upgrad, mgda, cagrad, "
            "alignedmtl, imtlg, dualproj, config, nashmtl, famo, geometric-mean, and db-mtl, "
            "uncertainty; `gcond recipes --components` lists them (default: conductor,sum). "
            "single-task adds one run per loss on that loss alone, the base of the report's "
            "Δm% against single-task learning.",
            show_default=False,
        ),
    ] = None,
    seeds: Annotated[
        int | None,
        typer.Option(
            "--seeds",
            metavar="N",
            help="Repeat every method with N seeds: the recipe's seed, +1, ... (default: 1).",
            show_default=False,
        ),
    ] = None,
    variant: VariantOption = None,
    name: Annotated[
        str | None,
        typer.Option(
            "--name",
            metavar="NAME",
            help="The comparison's directory is runs/<recipe>/compare-NAME; default: the time.",
            callback=_check_run_name,
            show_default=False,
        ),
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option(
            "--resume",
            metavar="COMPARE_DIR",
            help="Continue a comparison: finished runs are kept, an interrupted one continues "
            "from its checkpoint.",
            exists=True,
            file_okay=False,
            show_default=False,
        ),
    ] = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No per-step lines, only the results.")
    ] = False,
    grid: Annotated[
        list[str] | None,
        typer.Option(
            "--grid",
            metavar="KEY=V1,V2,...",
            help="Run the comparison in every cell of a grid of recipe values (repeatable: the "
            "keys are crossed), e.g. --grid data.lab.direction=0.5,0,-0.5 --grid "
            "data.lab.scale=1,100; one report with a row per cell.",
            show_default=False,
        ),
    ] = None,
    baseline: Annotated[
        str | None,
        typer.Option(
            "--baseline",
            metavar="METHOD[,METHOD]",
            help="The method or variant every other is judged against, seed by seed; several, "
            "comma-separated, each get their verdicts, e.g. --baseline sum,sum-log (default: "
            "sum when compared, else the first).",
            show_default=False,
        ),
    ] = None,
    plugin: PluginOption = None,
) -> None:
    """Train the same recipe with several methods (same seeds, data and steps) and compare them.

    Prints the eval metrics (mean ± std over seeds), time per step against `sum`, how often
    the losses conflicted and how far their gradient norms differ; then, for every method
    against each baseline, the difference paired by seed with a 95 % interval and a verdict
    (better, worse, within noise). Writes summary.json, report.md and PNG plots to the
    comparison's directory, where `tensorboard --logdir DIR` overlays every run.
    """
    roots = PluginRoots.from_options(plugin or ())
    loaded, path = _load(recipe, overrides, roots) if recipe is not None else (None, None)
    from .compare.runner import run_compare  # imports torch: only once the recipe is known good

    code = run_compare(
        loaded,
        path,
        overrides=overrides or (),
        methods=methods,
        seeds=seeds,
        variants=variant or (),
        name=name,
        resume=resume,
        quiet=quiet,
        baseline=baseline,
        grid=grid or (),
        plugins=roots,
    )
    raise typer.Exit(code)


@app.command()
@_reports_errors
def bench(
    recipe: Annotated[
        str | None,
        typer.Argument(
            metavar="RECIPE",
            help="Recipe to measure (an image data set is replaced by synthetic images); "
            "default: a built-in workload, see --workload.",
            show_default=False,
        ),
    ] = None,
    overrides: OverridesArg = None,
    workload: Annotated[
        str | None,
        typer.Option(
            "--workload",
            "-w",
            metavar="NAME",
            help="Built-in workload: vit_mae_224, conv_mobilenet_128, conv_convnext_128, tiny. "
            "(default: vit_mae_224 on CUDA, tiny otherwise)",
            show_default=False,
        ),
    ] = None,
    methods: Annotated[
        str | None,
        typer.Option(
            "--methods",
            metavar="M1,M2",
            help="Methods to measure (default: every method that can run here); sum always runs.",
            show_default=False,
        ),
    ] = None,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Timed optimizer steps.")] = 10,
    warmup: Annotated[
        int,
        typer.Option(
            "--warmup",
            min=0,
            help="Untimed optimizer steps first (peak memory is measured over build and "
            "warm-up: 0 leaves it unmeasured).",
        ),
    ] = 3,
    rounds: Annotated[
        int,
        typer.Option(
            "--rounds",
            min=1,
            help="Rounds of fresh models; in each, the methods' timed steps run in turn, one "
            "step of each at a time, so drift of a shared machine hits every method alike. "
            "Timings are medians over rounds.",
        ),
    ] = 3,
    accumulation_steps: Annotated[
        int | None,
        typer.Option(
            "--accumulation-steps",
            "-n",
            min=1,
            help="Micro-batches per step (N).",
            show_default=False,
        ),
    ] = None,
    losses: Annotated[
        int | None,
        typer.Option("--losses", "-k", min=1, help="Number of losses (K).", show_default=False),
    ] = None,
    dim: Annotated[
        int | None,
        typer.Option("--dim", min=1, help="mae_vit width (parameters P).", show_default=False),
    ] = None,
    depth: Annotated[
        int | None,
        typer.Option("--depth", min=1, help="mae_vit depth (parameters P).", show_default=False),
    ] = None,
    json_path: Annotated[
        Path | None,
        typer.Option(
            "--json", metavar="PATH", help="Also write the results as JSON.", show_default=False
        ),
    ] = None,
    variant: VariantOption = None,
    plugin: PluginOption = None,
) -> None:
    """Time and memory of each method per optimizer step, as ratios to plain accumulation (sum).

    Same model, data and settings for every method, in one process; the step is split into
    accumulation (forwards and backwards) and resolution + momentum + write-back.
    """
    from .bench.runner import run_bench  # imports torch

    raise typer.Exit(
        run_bench(
            recipe,
            overrides or (),
            workload=workload,
            methods=methods,
            steps=steps,
            warmup=warmup,
            rounds=rounds,
            accumulation_steps=accumulation_steps,
            losses=losses,
            dim=dim,
            depth=depth,
            json_path=json_path,
            variants=variant or (),
            plugins=PluginRoots.from_options(plugin or ()),
        )
    )


@app.command()
@_reports_errors
def validate(
    recipe: RecipeArg, overrides: OverridesArg = None, plugin: PluginOption = None
) -> None:
    """Check a recipe (with overrides) without training; print it resolved, every default filled in.

    References to your own code (`target:`) are imported from the --plugin roots and their
    `args` checked against the function's signature. Exit code 0 when the recipe is valid, 2 with
    every problem listed when it is not.
    """
    loaded, path = _load(recipe, overrides, PluginRoots.from_options(plugin or ()))
    missing = missing_dependency(loaded.conductor.method)
    if missing:
        raise UsageError(missing)
    typer.echo(f"# resolved from {path}" + "".join(f" {o}" for o in overrides or ()))
    typer.echo(dump_recipe_yaml(loaded), nl=False)
    typer.echo("# recipe OK")


@app.command()
def recipes(
    components: Annotated[
        bool,
        typer.Option(
            "--components", help="Also list the built-in models, data sets, losses and methods."
        ),
    ] = False,
) -> None:
    """List the bundled recipes; run one by name: `gcond train NAME`."""
    console = Console()
    table = Table("recipe", "description", title="Bundled recipes")
    for file_name, description in bundled_recipes():
        table.add_row(Path(file_name).stem, description)
    console.print(table)
    if components:
        table = Table("kind", "name", "description", title="Built-in components")
        for kind in ("model", "data", "loss", "method"):
            for name, entry in builtins(kind).items():
                table.add_row(kind, name, Text(entry.summary))
        console.print(table)
        console.print(
            'Your own: `target: "file.py:function"` with --plugin file.py (see the README\'s '
            "'Your own model')."
        )


def main() -> None:
    """Console entry point (`gcond`, `python -m gcond_cli`)."""
    app(prog_name="gcond")
