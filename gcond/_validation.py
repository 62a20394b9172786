"""Checks of the constructor's own arguments (model, losses, λ, precision objects); every bad
value names the argument and the value. The tuning parameters are checked by ConductorConfig."""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import Any


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_type(name: str, value: Any, types: type | tuple[type, ...], expected: str) -> None:
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
        raise TypeError(f"{name} must be {expected}, got {value!r} ({type(value).__name__})")


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def check_choice(name: str, value: Any, choices: Collection[Any]) -> None:
    if value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {options}, got {value!r}")


def real_problem(
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> tuple[str, str] | None:
    """What keeps ``value`` from being a finite real number inside [low, high] (open ends where
    asked): ("type" | "finite" | "interval", the interval as text), or None when it is one."""
    lo = "-inf" if low is None else f"{low}"
    hi = "inf" if high is None else f"{high}"
    interval = f"{'(' if low_open else '['}{lo}, {hi}{')' if high_open else ']'}"
    if not _is_number(value):
        return "type", interval
    if not math.isfinite(value):
        return "finite", interval
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    return ("interval", interval) if too_low or too_high else None


def check_real(name: str, value: Any, *, allow_none: bool = False, **bounds: Any) -> None:
    """A finite real number inside [low, high] (open ends where asked): see `real_problem`."""
    if value is None and allow_none:
        return
    problem = real_problem(value, **bounds)
    if problem is None:
        return
    kind, interval = problem
    if kind == "type":
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    if kind == "finite":
        raise ValueError(f"{name} must be finite, got {value!r}")
    raise ValueError(f"{name} must be in {interval}, got {value!r}")


def check_mapping(name: str, value: Any) -> None:
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a mapping of loss name to value, got {value!r}")
