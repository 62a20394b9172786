"""The option grammar the commands share: ``--methods``, ``--variant``, ``--grid`` and
``--baseline``, parsed and checked before anything runs (a bad one is a `UsageError`).
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

from .errors import UsageError
from .methods import METHODS
from .recipe import name_problem

_VARIANT_FORM = (
    "NAME:KEY=VALUE,KEY=VALUE, e.g. "
    "seed-momentum:conductor.momentum_beta=0.9,optimizer.betas=[0.0,0.95]"
)


def split_top_level(text: str, sep: str = ",") -> list[str]:
    """Split at ``sep`` outside brackets and quotes: ``a=[0.0,0.95],b=1`` -> two parts."""
    parts, depth, quote, start = [], 0, "", 0
    for i, char in enumerate(text):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{(":
            depth += 1
        elif char in "]})":
            depth = max(depth - 1, 0)
        elif char == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts]


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``NAME:KEY=VALUE,KEY=VALUE`` -> (name, overrides); values may hold commas in brackets."""
    name, sep, rest = text.partition(":")
    name = name.strip()
    if not sep or not name or not rest.strip():
        raise UsageError(f"--variant {text!r}: expected {_VARIANT_FORM}")
    problem = name_problem(name)
    if problem:
        raise UsageError(f"--variant {text!r}: got the name {name!r}, expected {problem}")
    overrides = split_top_level(rest)
    for override in overrides:
        if "=" not in override:
            raise UsageError(
                f"--variant {text!r}: {override!r} is not KEY=VALUE; expected {_VARIANT_FORM}"
            )
    return name, overrides


def parse_variants(variants: Sequence[str], methods: Sequence[str]) -> dict[str, list[str]]:
    """Every ``--variant``, by name; names must be unique and no method's."""
    parsed = dict(parse_variant(v) for v in variants)
    if len(parsed) != len(variants):
        raise UsageError("--variant: two variants have the same name")
    clash = set(parsed) & set(methods)
    if clash:
        raise UsageError(f"--variant: the name {sorted(clash)[0]!r} is also a method; rename it")
    return parsed


def parse_grid(options: Sequence[str]) -> dict[str, list[str]]:
    """Every ``--grid KEY=V1,V2,...`` as key -> values (commas inside brackets kept)."""
    grid: dict[str, list[str]] = {}
    for text in options:
        key, sep, values = text.partition("=")
        key = key.strip()
        parts = [v for v in split_top_level(values) if v]
        if not sep or not key or not parts:
            raise UsageError(
                f"--grid {text!r}: expected KEY=V1,V2,..., e.g. data.lab.direction=0.5,0,-0.5"
            )
        if key in grid:
            raise UsageError(f"--grid: {key} is given twice; list all its values in one --grid")
        bad = [v for v in parts if name_problem(f"x{v}")]
        if bad:
            raise UsageError(
                f"--grid {key}: the value {bad[0]!r} cannot name a directory; use numbers or "
                "words of letters, digits, '.', '_' and '-'"
            )
        grid[key] = parts
    return grid


# Not a method but an entry of `gcond compare`: one run per loss, trained on that loss alone
# (plain sum, same model and budget), the base of Δm against single-task learning.
SINGLE_TASK = "single-task"


def parse_methods(text: str) -> list[str]:
    """``conductor,sum`` -> the method names (and ``single-task``), each checked."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UsageError(
            f"--methods {text!r}: expected comma-separated methods, e.g. conductor,sum"
        )
    known = (*METHODS, SINGLE_TASK)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise UsageError(
                f"--methods: unknown method {name!r}, expected one of {', '.join(known)}{hint}"
            )
    if len(set(names)) != len(names):
        raise UsageError(f"--methods {text!r}: a method is listed twice")
    return names


def parse_baselines(text: str, entries: Sequence[str]) -> list[str]:
    """``--baseline sum,sum-log`` -> the entries every other is judged against, each one of the
    compared methods and variants."""
    chosen = [n.strip() for n in text.split(",") if n.strip()]
    if not chosen:
        raise UsageError(f"--baseline {text!r}: expected a method or variant, e.g. sum")
    for baseline in chosen:
        if baseline not in entries:
            close = difflib.get_close_matches(baseline, entries, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise UsageError(
                f"--baseline {baseline!r}: not among the compared methods and variants "
                f"({', '.join(entries)}); add it to --methods{hint}"
            )
    if len(set(chosen)) != len(chosen):
        raise UsageError(f"--baseline {text!r}: a baseline is listed twice")
    return chosen
