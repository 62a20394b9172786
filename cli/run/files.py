"""A run directory's files, by name, and the readers of what a run wrote.

    <run_dir>/recipe.yaml          the recipe the run trains (``--resume`` continues with it)
    <run_dir>/metrics.jsonl        one JSON object per logged step (kind "train") or eval ("eval")
    <run_dir>/summary.json         written when the run finished
    <run_dir>/checkpoints/         latest.pt and best.pt (``checkpoint.py``)
    <run_dir>/bad_images.txt       the images ``data.skip_bad_images`` left out
    <run_dir>/error.log            the traceback of a failed run
    <run_dir>/first_batch.json     (compare) the checksum of the run's first micro-batch

The statistics a method reports per step (``min_cosine_sim``, ``nonfinite/<loss>``,
``raw_norm/<loss>``, ...) are read here too, so no other module parses their keys. Nothing here
imports torch: the compare report reads these files without it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

RECIPE_FILE = "recipe.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
BAD_IMAGES_FILE = "bad_images.txt"  # the images data.skip_bad_images left out
ERROR_LOG = "error.log"
FIRST_BATCH_FILE = "first_batch.json"

# Keys of a step's statistics.
MIN_COSINE = "min_cosine_sim"  # the lowest cosine between the raw per-loss gradients
NONFINITE = "nonfinite/"  # nonfinite/<loss>: 1 when that loss's gradient was not finite
RAW_NORM = "raw_norm/"  # raw_norm/<loss>: the norm of that loss's raw gradient


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``, in file order; a damaged line (a run killed while
    writing it) is left out. Empty when the file does not exist."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of a run's ``metrics.jsonl`` (see `read_records`)."""
    return read_records(Path(run_dir) / METRICS_FILE)


def read_first_batch(run_dir: Path) -> str | None:
    """The SHA-256 of the run's first micro-batch, if it was recorded."""
    path = Path(run_dir) / FIRST_BATCH_FILE
    return json.loads(path.read_text())["sha256"] if path.is_file() else None


def nonfinite_losses(stats: Mapping[str, Any]) -> list[str]:
    """The losses whose gradient was not finite in a step's statistics."""
    return [k.removeprefix(NONFINITE) for k, v in stats.items() if k.startswith(NONFINITE) and v]


def min_cosine(record: Mapping[str, Any]) -> float | None:
    """The step's lowest cosine between raw per-loss gradients (None for a method without)."""
    value = record.get(MIN_COSINE)
    return value if _is_number(value) else None


def norm_ratio(record: Mapping[str, Any]) -> float | None:
    """Largest over smallest raw per-loss gradient norm of one train record.

    Reads the finite, positive ``raw_norm/<loss>`` values; returns None when fewer than two are
    left (one loss, the ``sum`` method, NaN or zero norms).
    """
    norms = [
        float(v)
        for k, v in record.items()
        if k.startswith(RAW_NORM) and _is_number(v) and math.isfinite(v) and v > 0
    ]
    if len(norms) < 2:
        return None
    return max(norms) / min(norms)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
