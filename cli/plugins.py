"""Your own model, data, losses and evaluation in the harness: references to code you trust.

A recipe is data. A component section may name the user's code instead of a built-in —
``target: "my_project.models:build"`` (an importable module) or ``target: "my_mtl.py:build"``
(a file, relative to the recipe file) with keyword arguments under ``args:`` — but code is only
imported from the roots the user names: ``--plugin PATH_OR_PACKAGE`` on the command line (a
``.py`` file, a folder, or an importable package) and installed packages that declare an entry
point in the group ``gcond.plugins``. A target outside them is refused before anything is
imported; after the import, the resolved object itself must be defined under a root
(``my_plugin:os.system`` is ``os.system``, defined in ``posix``, and is refused).

The contracts (``**args`` are the section's ``args``):

* model: ``build(**args) -> torch.nn.Module``;
* data: ``make(seed, device, **args)`` returns an object with ``train()``, a data provider for
  ``GradientConductor.step`` (each call: one micro-batch ``(input, target)``), ``val()``, an
  iterable of ``(input, target)`` batches, and optionally ``state_dict()`` /
  ``load_state_dict()`` (with them ``--resume`` is exact). ``make`` may also take ``rank`` and
  ``world_size`` keywords, filled in under torchrun;
* loss: ``fn(output, target, **args) -> scalar tensor``;
* eval (optional): ``evaluate(model, batches, **args) -> dict[str, float]``, called in eval
  mode under ``torch.no_grad()``; without it every loss is reported as ``eval/<loss name>``.

Every problem a user can fix before training (a missing file, a syntax or import error in it, a
missing attribute, arguments that do not fit the signature) is reported at once as a
`RecipeError` naming the recipe key (exit code 2); a component that misbehaves while training
raises `ComponentError` naming it (exit code 1).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib
import importlib.machinery
import importlib.metadata
import importlib.util
import inspect
import json
import sys
import traceback
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import RecipeError, UsageError

ENTRY_POINT_GROUP = "gcond.plugins"
# The arguments each kind of component receives from the harness, before the recipe's `args`.
CONTRACTS: dict[str, tuple[str, ...]] = {
    "model": (),
    "data": ("seed", "device"),
    "loss": ("output", "target"),
    "eval": ("model", "batches"),
}
INJECTED = {"data": ("rank", "world_size")}  # keywords filled in when the function takes them
_TRUST_HINT = (
    "A plugin is code: pass --plugin only for code you trust, "
    "e.g. --plugin my_mtl.py, --plugin src/ or --plugin my_project"
)


@dataclasses.dataclass(frozen=True)
class PluginRoots:
    """Where code may be imported from: plugin files, folders and packages."""

    files: tuple[Path, ...] = ()
    dirs: tuple[Path, ...] = ()
    packages: tuple[str, ...] = ()
    given: tuple[str, ...] = ()  # the --plugin values as typed (saved with a run, for --resume)

    @classmethod
    def from_options(cls, given: Sequence[str] = (), *, entry_points: bool = True) -> PluginRoots:
        """The roots of ``--plugin`` values (files, folders, package names) and, unless
        ``entry_points`` is false, of the installed ``gcond.plugins`` entry points. Raises
        UsageError for a value that is neither an existing path nor an importable package."""
        files, dirs, packages = [], [], []
        for value in given:
            path = Path(value)
            if path.is_file():
                if path.suffix != ".py":
                    raise UsageError(
                        f"--plugin {value}: expected a .py file, a folder or a package"
                    )
                files.append(path.resolve())
            elif path.is_dir():
                dirs.append(path.resolve())
            elif value.replace(".", "").replace("_", "").isalnum() and not value.endswith(".py"):
                if not _findable(value):
                    raise UsageError(
                        f"--plugin {value}: no such file or folder, and no importable package "
                        f"'{value}' (install it, or give the path of its folder)"
                    )
                packages.append(value)
            else:
                raise UsageError(f"--plugin {value}: no such file or folder")
        if entry_points:
            packages += [
                ep.module for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
            ]
        for folder in dirs:  # modules of a plugin folder are importable, after everything else
            if str(folder) not in sys.path:
                sys.path.append(str(folder))
        return cls(tuple(files), tuple(dirs), tuple(packages), tuple(given))

    def trusts_module(self, name: str) -> bool:
        return any(name == p or name.startswith(p + ".") for p in self.packages)

    def trusts_file(self, path: Path) -> bool:
        return path in self.files or any(path.is_relative_to(d) for d in self.dirs)

    def describe(self) -> str:
        roots = [*map(str, self.given)]
        roots += [f"{p} (entry point)" for p in self.packages if p not in self.given]
        return ", ".join(roots) or "none"


def _findable(name: str) -> bool:
    """Whether a top-level module of that name can be found, without running any of it."""
    top = name.split(".")[0]
    return top in sys.modules or importlib.machinery.PathFinder.find_spec(top) is not None


class TargetProblem(Exception):
    """One problem with one target; `RecipeError` lines are made of these."""


@dataclasses.dataclass(frozen=True)
class Target:
    """A parsed ``target`` string: where the code is and the attribute path inside it."""

    where: str
    attribute: str

    @classmethod
    def parse(cls, text: str) -> Target:
        where, _, attribute = text.rpartition(":")
        return cls(where, attribute)

    @property
    def is_file(self) -> bool:
        return self.where.endswith(".py") or "/" in self.where or "\\" in self.where


def load_target(text: str, roots: PluginRoots) -> Callable[..., Any]:
    """The callable a target names, imported only if it lies under ``roots``; raises
    TargetProblem with what to do."""
    target = Target.parse(text)
    module = _import_file(target, roots) if target.is_file else _import_module(target, roots)
    obj: Any = module
    for depth, part in enumerate(target.attribute.split(".")):
        if not hasattr(obj, part):
            owner = target.where if depth == 0 else ".".join(target.attribute.split(".")[:depth])
            known = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, known, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise TargetProblem(f"{owner} has no attribute '{part}'{hint}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise TargetProblem(f"'{target.attribute}' is a {type(obj).__name__}, not callable")
    _check_defined_under(obj, text, roots)
    return obj


def _refused(text: str, what: str, roots: PluginRoots, suggestion: str) -> TargetProblem:
    return TargetProblem(
        f"'{text}' {what}, which is not under a plugin root (roots: {roots.describe()}); it was "
        f"not run. To trust it, pass --plugin {suggestion}, or install a package that declares "
        f"an entry point in the group '{ENTRY_POINT_GROUP}'. {_TRUST_HINT}"
    )


def _import_file(target: Target, roots: PluginRoots) -> Any:
    path = Path(target.where).resolve()
    if not path.is_file():
        raise TargetProblem(f"file {target.where} not found")
    if not roots.trusts_file(path):
        raise _refused(f"{target.where}:{target.attribute}", "is a file", roots, target.where)
    name = f"gcond_plugin_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise TargetProblem(f"cannot import {target.where} (not a Python file?)")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before running it: dataclasses and pickling look it up
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:
        del sys.modules[name]
        if not isinstance(exc, Exception):
            raise
        raise TargetProblem(_import_failure(exc, target.where)) from None
    return module


def _import_module(target: Target, roots: PluginRoots) -> Any:
    name = target.where
    if not (roots.trusts_module(name) or _located_under(name, roots)):
        raise _refused(f"{name}:{target.attribute}", f"names module {name}", roots, name)
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (name == exc.name or name.startswith(exc.name + ".")):
            raise TargetProblem(f"no module named '{exc.name}'") from None
        raise TargetProblem(_import_failure(exc, name)) from None
    except Exception as exc:
        raise TargetProblem(_import_failure(exc, name)) from None


def _located_under(name: str, roots: PluginRoots) -> bool:
    """Whether module ``name`` (not imported) would be loaded from a trusted folder or file."""
    top = name.split(".")[0]
    module = sys.modules.get(top)
    if module is not None:
        origin = getattr(module, "__file__", None)
    else:
        spec = importlib.machinery.PathFinder.find_spec(top)
        origin = spec.origin if spec is not None else None
    return origin is not None and roots.trusts_file(Path(origin).resolve())


def _check_defined_under(obj: Any, text: str, roots: PluginRoots) -> None:
    """The resolved object must itself come from a root: a trusted module can re-export
    anything (``import os``), and the string alone would not show it."""
    module_name = getattr(obj, "__module__", None)
    if isinstance(module_name, str):
        if roots.trusts_module(module_name):
            return
        module = sys.modules.get(module_name)
        origin = getattr(module, "__file__", None)
        if origin is not None and roots.trusts_file(Path(origin).resolve()):
            return
        where = f"module {module_name}" + (f" ({origin})" if origin else "")
    else:
        where = "an unknown module"
    label = getattr(obj, "__qualname__", type(obj).__name__)
    raise TargetProblem(
        f"'{text}' resolves to {label}, defined in {where}, which is not under a plugin root "
        f"(roots: {roots.describe()}); it was not run. A target must name code defined in your "
        f"plugin, not something it imports. {_TRUST_HINT}"
    )


def _import_failure(exc: Exception, where: str) -> str:
    """The error of running a plugin's module, at the user's own file and line."""
    if isinstance(exc, SyntaxError):
        line = f"\n      {exc.text.strip()}" if exc.text else ""
        return f"syntax error in {exc.filename}, line {exc.lineno}: {exc.msg}{line}"
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "importlib" not in f.filename]
    at = f" ({frames[-1].filename}, line {frames[-1].lineno}: {frames[-1].line})" if frames else ""
    return f"importing {where} raised {type(exc).__name__}: {exc}{at}"


# ---------------------------------------------------------------------------------------------
# Arguments against the signature


def signature_problems(fn: Callable[..., Any], kind: str, args: Mapping[str, Any]) -> list[str]:
    """What is wrong with calling ``fn(*contract, **args)``: the contract's positional
    arguments, unknown (with did-you-mean) and missing arguments, and values of the wrong type
    where the parameter is annotated with a plain type."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return []  # no signature to check (some C functions): the call will tell
    contract = CONTRACTS[kind]
    params = list(signature.parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    takes_varargs = any(p.kind is p.VAR_POSITIONAL for p in params)
    label = getattr(fn, "__qualname__", repr(fn))
    if len(positional) < len(contract) and not takes_varargs:
        needed = ", ".join(contract)
        return [f"{label}{signature} must take ({needed}) first, then args as keywords"]
    rest = {p.name: p for p in params if p not in positional[: len(contract)]}
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params)
    problems = []
    for name in args:
        if name in INJECTED.get(kind, ()):
            problems.append(f"args.{name}: set by the harness (the process's {name}); remove it")
            continue
        if name not in rest and not takes_kwargs:
            valid = [n for n, p in rest.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
            close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
            hint = (
                f"did you mean '{close[0]}'?"
                if close
                else f"it takes: {', '.join(valid) or 'none'}"
            )
            problems.append(f"args.{name}: {label}{signature} has no argument '{name}'; {hint}")
    for name, p in rest.items():
        required = p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        if required and name not in args and name not in INJECTED.get(kind, ()):
            problems.append(f"args.{name}: required argument of {label}{signature} is missing")
    hints = _type_hints(fn)
    for name, value in args.items():
        expected = hints.get(name)
        if name in rest and expected is not None and not _fits(value, expected):
            problems.append(
                f"args.{name}: got {value!r}, expected {_type_name(expected)} ({label}{signature})"
            )
    return problems


def _type_hints(fn: Callable[..., Any]) -> dict[str, Any]:
    target = fn.__init__ if inspect.isclass(fn) else fn
    try:
        return typing.get_type_hints(target)
    except Exception:  # annotations that do not evaluate: nothing to check against
        return {}


_PLAIN = (int, float, str, bool, list, dict, tuple)


def _fits(value: Any, expected: Any) -> bool:
    """Whether a YAML value fits a plain annotation; anything else is not checked (True)."""
    origin = typing.get_origin(expected)
    if expected is Any:
        return True
    if expected is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in typing.get_args(expected))
    if origin is typing.Literal:
        return value in typing.get_args(expected)
    if origin in (list, dict, tuple):
        return isinstance(value, list if origin is tuple else origin)
    if expected in _PLAIN:
        if isinstance(value, bool) and expected is not bool:
            return False
        if expected is float:
            return isinstance(value, int | float)
        if expected is tuple:
            return isinstance(value, list)
        return isinstance(value, expected)
    return True


def _type_name(expected: Any) -> str:
    return getattr(expected, "__name__", None) or str(expected).replace("typing.", "")


# ---------------------------------------------------------------------------------------------
# All the targets of a recipe


@dataclasses.dataclass(frozen=True)
class Reference:
    """One ``target`` of a recipe: its key path, its kind and its section."""

    path: tuple[str, ...]
    kind: str
    target: str
    args: Mapping[str, Any]

    @property
    def key(self) -> str:
        return ".".join(self.path)


def references(recipe: Any) -> Iterator[Reference]:
    """Every component of ``recipe`` that names the user's code."""
    for path, kind, section in (
        (("model",), "model", recipe.model),
        (("data",), "data", recipe.data),
        *((("losses", name), "loss", loss) for name, loss in recipe.losses.items()),
        (("eval",), "eval", recipe.eval),
    ):
        target = getattr(section, "target", None)
        if target is not None:
            yield Reference(path, kind, target, dict(section.args))


def resolve_references(recipe: Any, roots: PluginRoots) -> dict[str, Callable[..., Any]]:
    """{target key: callable} for every reference of the recipe, checked against its signature;
    every problem at once in one RecipeError (nothing is run but the plugins' module code)."""
    resolved, errors = {}, []
    seen: dict[str, str] = {}  # problem -> the first key it was reported for
    for ref in references(recipe):
        try:
            fn = load_target(ref.target, roots)
        except TargetProblem as exc:
            first = seen.setdefault(str(exc), ref.key)
            same = f"as {first}.target: the same file or module" if first != ref.key else None
            errors.append(f"{ref.key}.target: {same or exc}")
            continue
        problems = signature_problems(fn, ref.kind, ref.args)
        errors += [f"{ref.key}.{problem}" for problem in problems]
        resolved[ref.key] = fn
    if errors:
        raise RecipeError(errors)
    return resolved


PLUGINS_FILE = "plugins.json"  # in a run directory: the --plugin values it was started with


def save_plugin_roots(run_dir: Path, roots: PluginRoots) -> None:
    if roots.given:
        (run_dir / PLUGINS_FILE).write_text(json.dumps(list(roots.given)) + "\n")


def saved_plugin_roots(run_dir: Path) -> list[str]:
    path = run_dir / PLUGINS_FILE
    return json.loads(path.read_text()) if path.is_file() else []


def require_roots(recipe: Any, roots: PluginRoots, saved: Sequence[str], run_dir: Path) -> None:
    """``--resume`` of a run that uses plugin code needs the roots it was started with."""
    refs = list(references(recipe))
    missing = [value for value in saved if value not in roots.given]
    if refs and missing:
        raise UsageError(
            f"--resume {run_dir}: this run uses your code ({refs[0].key}.target "
            f"'{refs[0].target}'); give the plugin roots it was started with: "
            + " ".join(f"--plugin {value}" for value in missing)
        )
