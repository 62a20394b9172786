"""Reading a recipe: YAML (duplicate keys refused), KEY=VALUE overrides, the bundled recipes,
file targets anchored at the recipe's folder; and writing one back."""

import copy
import re
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import (
    Any,
)

import yaml
from pydantic import (
    ValidationError,
)

from ..errors import RecipeError
from ..plugins import Target
from .problems import _show, validation_errors
from .schema import Recipe


class _RecipeLoader(yaml.SafeLoader):
    """SafeLoader (no Python tags) that refuses duplicate keys instead of keeping the last."""


def _construct_unique_mapping(loader: _RecipeLoader, node: yaml.MappingNode) -> dict:
    loader.flatten_mapping(node)
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if not isinstance(key, Hashable):
            continue  # construct_mapping reports unhashable keys
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping",
                node.start_mark,
                f"found duplicate key {key!r}",
                key_node.start_mark,
            )
        seen.add(key)
    return loader.construct_mapping(node)


_RecipeLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping
)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    context = getattr(exc, "context", None)
    problem = getattr(exc, "problem", None) or str(exc)
    detail = f"invalid YAML: {context}, {problem}" if context else f"invalid YAML: {problem}"
    if isinstance(exc, yaml.constructor.ConstructorError) and "tag" in problem:
        detail += " (recipes are plain YAML; Python object tags are refused)"
    return detail


def _parse_yaml(text: str) -> Any:
    try:
        return yaml.load(text, Loader=_RecipeLoader)  # a SafeLoader: Python tags are refused
    except RecursionError:
        raise yaml.YAMLError("values nested too deeply") from None
    except ValueError as exc:  # int() of a number with thousands of digits
        raise yaml.YAMLError(str(exc).split(";")[0]) from None


def _apply_override(raw: dict, text: str) -> tuple[str, ...]:
    """Set one `a.b.c=value` override in `raw`; returns the key path. Raises ValueError."""
    key, sep, value_text = text.partition("=")
    if not sep or not re.fullmatch(r"\w+(\.\w+)*", key, flags=re.ASCII):
        raise ValueError("expected KEY=VALUE with a dotted key, e.g. optimizer.lr=3e-4")
    path = tuple(key.split("."))
    try:
        value = _parse_yaml(value_text)
    except yaml.YAMLError as exc:
        raise ValueError(f"the value is {_yaml_problem(exc)}") from None
    node = raw
    for depth, part in enumerate(path[:-1]):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            parent = ".".join(path[: depth + 1])
            raise ValueError(f"'{parent}' is {_show(node)}, not a mapping with keys")
    node[path[-1]] = value
    return path


def recipes_dir() -> Path:
    """The folder of bundled recipes: inside the installed package, or `recipes/` at the top of
    the repository for an editable install."""
    package = Path(__file__).resolve().parents[1]  # gcond_cli (this file is in gcond_cli/recipe)
    installed = package / "recipes"
    return installed if installed.is_dir() else package.parent / "recipes"


def bundled_recipes() -> list[tuple[str, str]]:
    """(file name, one-line description from the first comment line) of each bundled recipe."""
    found = []
    for path in sorted(recipes_dir().glob("*.yaml")):
        first_line = next(iter(path.read_text(encoding="utf-8").splitlines()), "")
        description = first_line.lstrip("#").strip() if first_line.startswith("#") else ""
        found.append((path.name, description))
    return found


def resolve_recipe_path(recipe: str | Path) -> Path:
    """`recipe` if it exists, else the bundled recipe of that bare name (with or without .yaml)."""
    path = Path(recipe)
    if path.exists() or path.parent != Path("."):
        return path
    bundled = recipes_dir() / (path.name if path.suffix == ".yaml" else f"{path.name}.yaml")
    return bundled if bundled.is_file() else path


def _read_mapping(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        names = ", ".join(Path(name).stem for name, _ in bundled_recipes())
        raise RecipeError(
            [f"{path}: recipe file not found (give a path to a .yaml file or one of: {names})"]
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError([f"{path}: cannot read the recipe: {exc}"]) from None
    try:
        raw = _parse_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise RecipeError([f"{where}: {_yaml_problem(exc)}"]) from None
    if not isinstance(raw, dict):
        got = "an empty file" if raw is None else _show(raw)
        raise RecipeError([f"{path}: got {got}, expected a mapping of recipe keys"])
    return raw


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read, override and validate a recipe; every problem is reported in one RecipeError.

    `overrides` are `dotted.key=value` strings, the value parsed as YAML
    (`optimizer.betas=[0.0,0.95]`, `conductor.norm_cap=null`). `name` defaults to the file stem.
    """
    path = resolve_recipe_path(path)
    raw = _read_mapping(path)
    raw.setdefault("name", path.stem)
    recipe = recipe_from_dict(raw, overrides, source=path)
    _anchor_file_targets(recipe, path.parent)
    return recipe


def _anchor_file_targets(recipe: Recipe, recipe_dir: Path) -> None:
    """Make the file targets (``"my_mtl.py:build"``, relative to the recipe file) absolute, so
    that the recipe saved in a run directory still points at the same files."""
    sections = [recipe.model, recipe.data, *recipe.losses.values(), recipe.eval]
    for section in sections:
        target = getattr(section, "target", None)
        if target is None:
            continue
        parsed = Target.parse(target)
        if parsed.is_file and not Path(parsed.where).is_absolute():
            section.target = f"{(recipe_dir / parsed.where).resolve()}:{parsed.attribute}"


def recipe_from_dict(
    raw: Mapping[str, Any], overrides: Sequence[str] = (), source: Path | None = None
) -> Recipe:
    """Override and validate a recipe given as a (nested) dict, e.g. a built-in bench workload;
    errors as in `load_recipe`. `raw` itself is left unchanged."""
    raw = copy.deepcopy(dict(raw))
    errors, sources = [], {}
    for text in overrides:
        try:
            sources[_apply_override(raw, text)] = text
        except ValueError as exc:
            errors.append(f"override '{text}': {exc}")
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        errors += validation_errors(exc, sources)
    if errors:
        raise RecipeError(errors, source=source)
    return recipe


def recipe_to_dict(recipe: Recipe) -> dict:
    """The recipe as plain YAML/JSON-able data (tuples become lists)."""
    return recipe.model_dump(mode="json")


class _RecipeDumper(yaml.SafeDumper):
    """Block-style sections with flow-style lists (`betas: [0.9, 0.95]`), as recipes are written."""


_RecipeDumper.add_representer(
    list, lambda dumper, value: dumper.represent_sequence("tag:yaml.org,2002:seq", value, True)
)


def dump_recipe_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML that `load_recipe` reads back to an equal recipe."""
    return yaml.dump(
        recipe_to_dict(recipe), Dumper=_RecipeDumper, sort_keys=False, allow_unicode=True
    )
