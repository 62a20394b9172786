"""The recipe's building blocks: limits, value types, the checks of single values, and the base
of every section (unknown keys forbidden, rules between fields reported as issues)."""

import re
from collections.abc import Iterator
from typing import (
    Annotated,
    Any,
    NamedTuple,
)

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    model_validator,
)
from pydantic_core import PydanticCustomError
from typing_extensions import Self

MAX_SIZE = 1_000_000  # sizes, widths, depths, batch sizes: anything larger is a typo
MAX_COUNT = 1_000_000_000  # steps, sample counts, intervals
RESERVED_LOSS_NAMES = ("total",)  # `loss/total` is the weighted sum in the conductor's stats
# The scale-only baselines: plain accumulation (`sum`) of the losses rescaled by `loss_scale`.
SCALED_SUMS = {"sum-log": "log", "sum-normalized": "initial"}
# Every method that sets the losses' scale itself: the scaled sums, and DB-MTL (log L_k).
OWN_LOSS_SCALES = {**SCALED_SUMS, "db-mtl": "log"}
# The methods that take the log of the losses themselves: they need L_k > 0, which log L_k is not.
LOG_TAKING = ("geometric-mean", "famo")
IMAGE_DATASETS = ("embedded", "faces", "cifar10", "stl10", "imagefolder", "synthetic")
# A reference to the user's code: "package.module:attr.path" or "path/file.py:attr.path".
TARGET_PATTERN = r"[^:\s][^:]*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*"

Size = Annotated[int, Field(ge=1, le=MAX_SIZE)]
Count = Annotated[int, Field(ge=1, le=MAX_COUNT)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
Beta = Annotated[float, Field(ge=0.0, lt=1.0)]
Positive = Annotated[float, Field(gt=0.0)]
NonNegative = Annotated[float, Field(ge=0.0)]
Cosine = Annotated[float, Field(ge=-1.0, le=1.0)]


class _Issue(NamedTuple):
    """A broken rule between fields: key path relative to the section that found it."""

    path: tuple[str, ...]
    value: Any
    expected: str


def _invalid(expected: str) -> PydanticCustomError:
    """The error a field validator raises; `expected` completes "got X, expected ..."."""
    return PydanticCustomError("recipe_value", "{expected}", {"expected": expected})


def _loss_name(name: str) -> str:
    """Loss names become TensorBoard tags (`loss/<name>`, `cos/<a>_vs_<b>`)."""
    if not re.fullmatch(r"\w+", name, flags=re.ASCII):
        raise _invalid("a loss name of letters, digits and '_' only")
    if name in RESERVED_LOSS_NAMES:
        raise _invalid(f"a loss name other than '{name}' (reserved for the weighted sum)")
    return name


def _target(target: str) -> str:
    if not re.fullmatch(TARGET_PATTERN, target, flags=re.ASCII):
        raise _invalid(
            "'package.module:function' or 'file.py:function' (a file relative to the recipe)"
        )
    return target


def _identifier(name: str) -> str:
    if not name.isidentifier():
        raise _invalid("a keyword argument name (letters, digits and '_')")
    return name


def _device(device: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda|cuda:[0-9]+", device):
        raise _invalid("auto, cpu, cuda or cuda:N")
    return device


def name_problem(name: str) -> str | None:
    """Why `name` cannot be a directory name under runs/ (recipe or run name), or None."""
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        return "a name of letters, digits, '.', '_' and '-' only (no path separators or spaces)"
    if set(name) == {"."}:
        return "a name that is not '.' or '..'"
    return None


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    def _issues(self) -> Iterator[_Issue]:
        """Rules between this section's fields; sections that have some override this."""
        return iter(())

    @model_validator(mode="after")
    def _check_issues(self) -> Self:
        issues = list(self._issues())
        if issues:
            raise PydanticCustomError("recipe_issues", "{issues}", {"issues": issues})
        return self
