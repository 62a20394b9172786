"""Recipe schema (``fields.py``, ``components.py``, ``schema.py``), YAML loading with KEY=VALUE
overrides (``files.py``), and errors that say what to fix (``problems.py``).

A recipe is plain YAML validated into the pydantic models below. Every section forbids unknown
keys, so a typo is an error instead of a silently ignored setting. `load_recipe` collects every
problem at once (YAML syntax, bad overrides, wrong types and ranges, rules between fields) and
raises one `RecipeError` whose lines each name the full key path, the bad value and what is
expected, with the nearest valid key or choice where there is one.

Rules that involve a single field are field validators, so they are reported together with the
other errors of their section; rules between fields (`_issues`) run once the fields they read
are valid.
"""

from ..errors import RecipeError
from .components import (
    MULTIDIGITS_TASKS,
    QM9_TARGET_NAMES,
    AugmentConfig,
    CrossEntropyConfig,
    DataSection,
    ImageDataConfig,
    LabConfig,
    LabDataConfig,
    LabModelConfig,
    LossSection,
    MaeVitConfig,
    MaskConfig,
    MaskedConvConfig,
    ModelSection,
    MultidigitsCnnConfig,
    MultidigitsDataConfig,
    MultidigitsLossConfig,
    PixelLossConfig,
    Qm9DataConfig,
    Qm9LossConfig,
    Qm9MlpConfig,
    SsimLossConfig,
    TargetConfig,
    TargetLoss,
    TaskLossConfig,
)
from .fields import (
    IMAGE_DATASETS,
    LOG_TAKING,
    MAX_COUNT,
    MAX_SIZE,
    OWN_LOSS_SCALES,
    RESERVED_LOSS_NAMES,
    SCALED_SUMS,
    TARGET_PATTERN,
    Beta,
    Cosine,
    Count,
    Fraction,
    NonNegative,
    Positive,
    Size,
    name_problem,
)
from .files import (
    bundled_recipes,
    dump_recipe_yaml,
    load_recipe,
    recipe_from_dict,
    recipe_to_dict,
    recipes_dir,
    resolve_recipe_path,
)
from .method_table import METHOD_NEEDS, missing_dependency
from .problems import validation_errors
from .schema import (
    CheckpointConfig,
    ConductorConfig,
    DistributedConfig,
    EvalConfig,
    LogConfig,
    OptimizerConfig,
    Recipe,
    ScheduleConfig,
)

__all__ = [
    "IMAGE_DATASETS",
    "LOG_TAKING",
    "MAX_COUNT",
    "MAX_SIZE",
    "METHOD_NEEDS",
    "MULTIDIGITS_TASKS",
    "OWN_LOSS_SCALES",
    "QM9_TARGET_NAMES",
    "RESERVED_LOSS_NAMES",
    "SCALED_SUMS",
    "TARGET_PATTERN",
    "AugmentConfig",
    "Beta",
    "CheckpointConfig",
    "ConductorConfig",
    "Cosine",
    "Count",
    "CrossEntropyConfig",
    "DataSection",
    "DistributedConfig",
    "EvalConfig",
    "Fraction",
    "ImageDataConfig",
    "LabConfig",
    "LabDataConfig",
    "LabModelConfig",
    "LogConfig",
    "LossSection",
    "MaeVitConfig",
    "MaskConfig",
    "MaskedConvConfig",
    "ModelSection",
    "MultidigitsCnnConfig",
    "MultidigitsDataConfig",
    "MultidigitsLossConfig",
    "NonNegative",
    "OptimizerConfig",
    "PixelLossConfig",
    "Positive",
    "Qm9DataConfig",
    "Qm9LossConfig",
    "Qm9MlpConfig",
    "Recipe",
    "RecipeError",
    "ScheduleConfig",
    "Size",
    "SsimLossConfig",
    "TargetConfig",
    "TargetLoss",
    "TaskLossConfig",
    "bundled_recipes",
    "dump_recipe_yaml",
    "load_recipe",
    "missing_dependency",
    "name_problem",
    "recipe_from_dict",
    "recipe_to_dict",
    "recipes_dir",
    "resolve_recipe_path",
    "validation_errors",
]
