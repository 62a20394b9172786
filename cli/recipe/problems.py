"""Turning pydantic's errors into one line per problem: the full key path, the value, what was
expected, and the nearest valid key or choice."""

import difflib
import re
from collections.abc import Mapping, Sequence
from typing import (
    Annotated,
    Any,
    Union,
    get_args,
    get_origin,
)

from pydantic import (
    BaseModel,
    Tag,
    ValidationError,
)

from ..components import CHOICE_KEY, builtins, names
from .components import TargetConfig, TargetLoss
from .schema import Recipe

_EXPECTED = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "a whole number",
    "float_type": "a number",
    "float_parsing": "a number",
    "finite_number": "a finite number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "string_too_short": "a non-empty string",
    "string_pattern_mismatch": "a string matching {pattern}",
    "dict_type": "a mapping",
    "model_type": "a mapping of keys",
    "tuple_type": "a list",
    "too_long": "a list of {max_length} items",
    "greater_than": "a number > {gt}",
    "greater_than_equal": "a number >= {ge}",
    "less_than": "a number < {lt}",
    "less_than_equal": "a number <= {le}",
    "literal_error": "one of {expected}",
    "recipe_value": "{expected}",
}


def _show(value: Any) -> str:
    """A value as the user would write it in YAML, shortened."""
    text = _render(value, 81)
    return text if len(text) <= 80 else text[:77] + "..."


def _render(value: Any, budget: int) -> str:
    """YAML-like text of `value`, stopping once `budget` characters are written: YAML aliases
    can make a small file hold a list of 9**9 items (an "alias bomb")."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, list | tuple):
        items, opening, closing = ((None, v) for v in value), "[", "]"
    elif isinstance(value, dict):
        items, opening, closing = iter(value.items()), "{", "}"
    else:
        return repr(value)[:budget]
    text = opening
    for i, (key, item) in enumerate(items):
        if len(text) >= budget:
            break
        text += (", " if i else "") + ("" if key is None else f"{key}: ")
        text += _render(item, budget - len(text))
    return text + closing


def _dotted(path: Sequence[str | int]) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text or "recipe"


def _union_members(annotation: Any) -> dict[str, Any] | None:
    """{tag: section} of a component's tagged union (see `_section_union`), else None."""
    if get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if get_origin(annotation) is not Union:
        return None
    members = {}
    for member in get_args(annotation):
        tags = [m.tag for m in getattr(member, "__metadata__", ()) if isinstance(m, Tag)]
        if not tags:
            return None
        members[tags[0]] = get_args(member)[0]
    return members


def _walk(loc: Sequence[str | int]) -> tuple[tuple[str | int, ...], Any]:
    """The recipe key path of a pydantic error location (the tags that say which component
    section was chosen are dropped), and the annotation at its end (None if there is no key)."""
    node: Any = Recipe
    path: list[str | int] = []
    parts = list(loc)
    while parts:
        members = _union_members(node)
        if members is not None:
            node = members.get(str(parts.pop(0)))
            continue
        part = parts.pop(0)
        path.append(part)
        if isinstance(node, type) and issubclass(node, BaseModel):
            field = node.model_fields.get(str(part))
            node = field.annotation if field else None
        elif get_origin(node) is dict:
            node = get_args(node)[1]
        elif get_origin(node) is tuple and isinstance(part, int):
            node = get_args(node)[part]
        elif get_origin(node) is Annotated:
            parts.insert(0, path.pop())
            node = get_args(node)[0]
        else:
            node = None
    return tuple(path), node


def _unknown_key(loc: tuple[str | int, ...]) -> tuple[tuple[str | int, ...], str]:
    path, _ = _walk(loc)
    _, section = _walk(loc[:-1])
    if not (isinstance(section, type) and issubclass(section, BaseModel)):
        return path, "unknown key"
    valid = list(section.model_fields)
    close = difflib.get_close_matches(str(path[-1]), valid, n=1, cutoff=0.6)
    if close:
        return path, f"unknown key; did you mean '{close[0]}'?"
    owner = _choice_name(section)
    here = f" of {owner}" if owner else " here"
    return path, f"unknown key; valid keys{here}: " + ", ".join(valid)


def _choice_name(section: type) -> str | None:
    """'mae_vit' for the mae_vit section: the built-in(s) a section configures, for messages."""
    for kind in CHOICE_KEY:
        found = [name for name, entry in builtins(kind).items() if entry.section is section]
        if found:
            return "/".join(found)
    return "target" if section in (TargetConfig, TargetLoss) else None


def _choice_problem(value: Any, ctx: Mapping[str, Any]) -> tuple[tuple[str, ...], str]:
    """A component section that names no built-in (relative path, problem text)."""
    kind, key = ctx["kind"], ctx["key"]
    choices = list(names(kind))
    quoted = ", ".join(f"'{choice}'" for choice in choices)
    expected = f"one of {quoted}, or target: 'module:function' for your own code"
    if not isinstance(value, dict):
        return (), f"got {_show(value)}, expected a mapping with {key}: {expected}"
    if key not in value:
        return (key,), f"required key is missing; expected {expected}"
    got = value[key]
    text = f"got {_show(got)}, expected {expected}"
    close = difflib.get_close_matches(str(got), choices, n=1, cutoff=0.5)
    return (key,), text + (f"; did you mean '{close[0]}'?" if close else "")


def _problem(error: Mapping[str, Any], loc: tuple[str | int, ...]) -> tuple[tuple, str]:
    """(key path, problem text) for one pydantic error that is not an `_Issue` bundle."""
    kind, value, ctx = error["type"], error["input"], error.get("ctx", {})
    if kind == "extra_forbidden":
        return _unknown_key(loc)
    path, _ = _walk(loc)
    if kind == "recipe_choice":
        relative, text = _choice_problem(value, ctx)
        return path + relative, text
    if kind == "missing" and path and isinstance(path[-1], int):  # a tuple given too few items
        items = len(get_args(_walk(loc[:-1])[1]))
        return path[:-1], f"got {_show(value)}, expected a list of {items} items"
    if kind == "missing":
        return path, "required key is missing"
    template = _EXPECTED.get(kind)
    expected = template.format(**ctx) if template else error["msg"]
    text = f"got {_show(value)}, expected {expected}"
    if kind == "literal_error" and isinstance(value, str):
        choices = re.findall(r"'([^']*)'", ctx["expected"])
        close = difflib.get_close_matches(value, choices, n=1, cutoff=0.5)
        text += f"; did you mean '{close[0]}'?" if close else ""
    return path, text


def _overlap(a: tuple, b: tuple) -> bool:
    """Whether one key path lies inside the other."""
    n = min(len(a), len(b))
    return a[:n] == b[:n]


def validation_errors(
    exc: ValidationError, overrides: Mapping[tuple[str, ...], str] | None = None
) -> list[str]:
    """One line per problem in `exc`: "<key path>: <problem>", noting which override set it."""
    lines = []
    for error in exc.errors(include_url=False):
        loc = tuple(part for part in error["loc"] if part != "[key]")  # dict-key errors
        if error["type"] == "recipe_issues":
            problems = [
                (_walk(loc)[0] + issue.path, f"got {_show(issue.value)}, expected {issue.expected}")
                for issue in error["ctx"]["issues"]
            ]
        else:
            problems = [_problem(error, loc)]
        for path, text in problems:
            source = next((o for key, o in (overrides or {}).items() if _overlap(key, path)), None)
            lines.append(
                f"{_dotted(path)}: {text}" + (f" (from override '{source}')" if source else "")
            )
    return lines
