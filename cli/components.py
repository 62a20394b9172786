"""The registry of built-in components: models, data sets, losses and methods, by name.

A built-in is registered in one place: its recipe section, decorated with :func:`builtin`
(``@builtin("model", "mae_vit", build="models:build_mae_vit")``), or for a method, which has
no section of its own, one :func:`register` call. The section is the built-in's typed
sub-section of the recipe (its keys, types, defaults and rules); ``build`` names the function
that makes it, in a module of this package, imported only when a run is built — validating a
recipe never imports torch. The recipe's choices, its "expected one of ..." messages and
`gcond recipes --components` all read this registry.

A user's own component is a reference to their code instead (``target: "file.py:build"``),
imported only from the roots the user trusts (see ``plugins.py``).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any, Literal, TypeVar

Kind = Literal["model", "data", "loss", "eval", "method"]
KINDS: tuple[Kind, ...] = ("model", "data", "loss", "eval", "method")
# The key of a section that says which built-in it is.
CHOICE_KEY: dict[str, str] = {
    "model": "name",
    "data": "dataset",
    "loss": "kind",
    "method": "method",
}


@dataclasses.dataclass(frozen=True)
class Builtin:
    """One built-in component: its name, the recipe section that configures it (None for a
    method, which the ``conductor`` section configures), and where its builder lives."""

    kind: Kind
    name: str
    build: str  # "module:function", the module relative to this package
    section: type | None = None
    summary: str = ""

    def builder(self) -> Callable[..., Any]:
        """The builder function (imports its module, which may import torch)."""
        module, _, attr = self.build.partition(":")
        return getattr(importlib.import_module(f"{__package__}.{module}"), attr)


_REGISTRY: dict[str, dict[str, Builtin]] = {kind: {} for kind in KINDS}

Section = TypeVar("Section", bound=type)


def register(
    kind: Kind, name: str, build: str, *, section: type | None = None, summary: str = ""
) -> Builtin:
    """Add a built-in; a name registered twice is a programming error."""
    if name in _REGISTRY[kind]:
        raise ValueError(f"built-in {kind} {name!r} is registered twice")
    entry = Builtin(kind, name, build, section, summary)
    _REGISTRY[kind][name] = entry
    return entry


def builtin(kind: Kind, *names: str, build: str) -> Callable[[Section], Section]:
    """Class decorator: the decorated recipe section configures the built-in(s) ``names`` (one
    section may serve several names, e.g. the image data sets), made by ``build``. The first
    line of the section's docstring is the built-in's summary."""

    def decorate(section: Section) -> Section:
        summary = (section.__doc__ or "").strip().splitlines()[0] if section.__doc__ else ""
        for name in names:
            register(kind, name, build, section=section, summary=summary)
        return section

    return decorate


def builtins(kind: Kind) -> dict[str, Builtin]:
    """The built-ins of one kind, in the order they were registered."""
    return dict(_REGISTRY[kind])


def names(kind: Kind) -> tuple[str, ...]:
    return tuple(_REGISTRY[kind])


def lookup(kind: Kind, name: str) -> Builtin:
    return _REGISTRY[kind][name]
