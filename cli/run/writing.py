"""Writing a run directory's files safely: JSON atomically, and ``metrics.jsonl`` cut back to a
checkpoint's step on resume."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch


def json_safe(value: Any) -> Any:
    """Plain JSON values; NaN/inf become null (JSON has no spelling for them)."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, torch.Tensor):
        return json_safe(value.tolist())
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    try:  # numpy scalars and the like
        return json_safe(float(value))
    except (TypeError, ValueError):
        return str(value)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary file and rename it, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(json_safe(data), f, indent=2, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def drop_entries_after(path: Path, last_step: int) -> None:
    """On resume: keep only the records up to ``last_step`` (the steps the checkpoint holds).

    A stopped run may have logged steps past its last checkpoint, and may have left half a line;
    the resumed run logs those steps again.
    """
    if not path.exists():
        return
    kept = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and record.get("step", 0) <= last_step:
                kept.append(line if line.endswith("\n") else line + "\n")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
