"""Checkpoints: atomic writes, safe loads, and the RNG state a bit-exact resume needs.

A checkpoint is a plain dict of tensors and Python scalars/containers, saved with ``torch.save``
and loaded with ``weights_only=True``: loading never runs code from the file.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ..errors import CheckpointError

__all__ = [
    "CheckpointError",
    "CheckpointPaths",
    "capture_rng_state",
    "checkpoint_paths",
    "join_shards",
    "latest_checkpoint",
    "load_checkpoint",
    "load_sharded",
    "restore_rng_state",
    "save_checkpoint",
    "save_sharded",
    "split_shards",
]

CHECKPOINT_DIR = "checkpoints"


class CheckpointPaths(NamedTuple):
    latest: Path
    best: Path


def checkpoint_paths(run_dir: Path) -> CheckpointPaths:
    """Where a run keeps its checkpoints: ``run_dir/checkpoints/{latest,best}.pt``."""
    directory = Path(run_dir) / CHECKPOINT_DIR
    return CheckpointPaths(latest=directory / "latest.pt", best=directory / "best.pt")


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The run's latest checkpoint, or None if it has not written one."""
    path = checkpoint_paths(run_dir).latest
    return path if path.is_file() else None


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write ``payload`` to ``path`` atomically.

    The data goes to a temporary file in the same directory (same file system, so the rename is
    atomic), is fsynced, then renamed over ``path``. A crash or a full disk at any point leaves the
    previous checkpoint at ``path`` as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A process killed while writing leaves its temporary file behind (a checkpoint's worth of
    # disk): remove such leftovers first, so they neither pile up nor fill the disk.
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        stale.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            recorder = _WriteErrorRecorder(f)
            try:
                torch.save(payload, recorder)
            except RuntimeError as e:
                # torch's zip writer reports a failed write() as a bare RuntimeError
                # ("unexpected pos ..."); surface the OSError (e.g. ENOSPC) it hides.
                if recorder.error is not None:
                    raise recorder.error from e
                raise
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        reason = e.strerror or (os.strerror(e.errno) if e.errno else str(e))
        raise CheckpointError(
            f"could not write checkpoint {path}: {reason}. "
            f"The previous checkpoint at {path} (if any) is intact."
        ) from e
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_directory(path.parent)


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint onto the CPU with ``weights_only=True``.

    Raises:
        CheckpointError: the file is missing, truncated or corrupt, holds something other than a
            dict, or contains objects that the safe loader refuses (it never runs their code).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        text = str(e)
        # weights_only refusals are UnpicklingErrors starting with this phrase; they name the
        # forbidden GLOBAL when the file asks for an arbitrary object, and an unsupported opcode
        # when the bytes are not a torch.save pickle at all.
        if "Weights only load failed" in text and "GLOBAL" in text:
            raise CheckpointError(
                f"checkpoint {path} contains objects that are not allowed "
                f"({_line_with(text, 'GLOBAL')}) and was refused for safety: only tensors and "
                "plain Python values are loaded, and nothing in the file was run"
            ) from e
        if "Weights only load failed" in text:
            raise CheckpointError(
                f"checkpoint {path} is corrupt or was not written by torch.save "
                f"({_line_with(text, 'Unsupported')}); it was refused for safety and nothing in "
                "it was run"
            ) from e
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt and cannot be read "
            f"({type(e).__name__}: {_line_with(text, '')})"
        ) from e
    if not isinstance(payload, dict):
        raise CheckpointError(
            f"checkpoint {path} holds a {type(payload).__name__}, not a checkpoint dict"
        )
    return payload


# ---------------------------------------------------------------------- sharded (FSDP) runs
#
# A run with distributed.strategy: fsdp writes what every rank holds a shard of (model,
# optimizer, the method's DTensors) with torch.distributed.checkpoint into ``latest.dcp/`` next
# to ``latest.pt``, which rank 0 writes as for any run, without those parts. The directory comes
# first: a ``latest.pt`` always has its shards. DCP reshards on load, so a run resumes on another
# number of ranks.


def sharded_path(path: Path) -> Path:
    """The directory of a checkpoint's shards: ``latest.pt`` → ``latest.dcp``."""
    return Path(path).with_suffix(".dcp")


def save_sharded(path: Path, state: dict[str, Any]) -> None:
    """Every rank writes its shards of ``state`` (a collective), into a temporary directory
    that rank 0 then renames over the previous one."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    target = sharded_path(path)
    tmp = target.with_name(f".{target.name}.tmp")
    rank0 = dist.get_rank() == 0
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    try:
        dcp.save(state, checkpoint_id=str(tmp))
    except Exception as e:
        raise CheckpointError(f"could not write sharded checkpoint {target}: {e}") from e
    if rank0:
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    dist.barrier()


def load_sharded(path: Path, state: dict[str, Any]) -> None:
    """Load the shards of ``path`` into ``state`` in place (every rank, a collective)."""
    import torch.distributed.checkpoint as dcp

    target = sharded_path(path)
    if not target.is_dir():
        raise CheckpointError(
            f"checkpoint {path} belongs to a sharded (distributed.strategy: fsdp) run, and its "
            f"shards {target} are missing; resume it under torchrun from the same run directory"
        )
    dcp.load(state, checkpoint_id=str(target))


def split_shards(state: Any, prefix: str = "") -> tuple[Any, dict[str, Any]]:
    """``state`` without its DTensors (None in their place), and the DTensors by path
    (``a/b/c``): the first goes into the rank-0 checkpoint, the second to DCP."""
    from torch.distributed.tensor import DTensor

    if isinstance(state, DTensor):
        return None, {prefix: state}
    if not isinstance(state, Mapping):
        return state, {}
    rest, shards = {}, {}
    for key, value in state.items():
        rest[key], found = split_shards(value, f"{prefix}/{key}" if prefix else str(key))
        shards.update(found)
    return rest, shards


def join_shards(rest: Any, shards: dict[str, Any], prefix: str = "") -> Any:
    """The inverse of :func:`split_shards`."""
    if prefix in shards:
        return shards[prefix]
    if not isinstance(rest, Mapping):
        return rest
    return {
        k: join_shards(v, shards, f"{prefix}/{k}" if prefix else str(k)) for k, v in rest.items()
    }


def capture_rng_state() -> dict[str, Any]:
    """The state of every random generator a run draws from: Python, torch CPU, all CUDA devices.

    Only tensors, ints, floats and lists, so it loads with ``weights_only=True``.
    """
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put back the generator states from `capture_rng_state`.

    CUDA states are restored for the devices present (none when CUDA is not available).
    """
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    torch.set_rng_state(state["torch"])
    cuda_states = state.get("cuda")
    if cuda_states and torch.cuda.is_available():
        for device, cuda_state in enumerate(cuda_states[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)


class _WriteErrorRecorder:
    """File proxy for ``torch.save`` that remembers the OSError a ``write`` raised."""

    def __init__(self, file: Any) -> None:
        self._file = file
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self._file.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self._file.flush()


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (POSIX: the directory entry lives in the directory)."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _line_with(text: str, needle: str) -> str:
    """The first non-empty line of an error message that contains ``needle``."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return next((line for line in lines if needle in line), lines[0] if lines else "no details")
