"""Checkpoints: atomic save, refusal of damaged and unsafe files, RNG state round trip."""

from __future__ import annotations

import errno
import io
import os
import pickle
import random
from pathlib import Path

import pytest
import torch

from gcond_cli.run import checkpoint as ckpt
from gcond_cli.run.checkpoint import (
    CheckpointError,
    capture_rng_state,
    checkpoint_paths,
    latest_checkpoint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)


def payload(scale: float = 1.0) -> dict:
    return {
        "model": {"w": torch.randn(4, 3) * scale, "b": torch.zeros(3, dtype=torch.bfloat16)},
        "optimizer": {"state": {0: {"exp_avg": torch.ones(2)}}, "param_groups": [{"lr": 1e-3}]},
        "step": 12,
        "loss": 0.25,
        "name": "tiny",
        "history": [1, 2.5, "x", None, True],
    }


def assert_same(a: object, b: object) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a == b


def leftovers(directory: Path) -> list[Path]:
    return list(directory.glob(".*.tmp-*"))


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "checkpoints" / "latest.pt"
    data = payload()
    save_checkpoint(path, data)
    assert_same(data, load_checkpoint(path))
    assert leftovers(path.parent) == []


def test_overwrite_replaces_the_previous_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "latest.pt"
    save_checkpoint(path, {"step": 1})
    save_checkpoint(path, {"step": 2})
    assert load_checkpoint(path) == {"step": 2}


def _partial_write_then_enospc(obj: object, f: io.IOBase) -> None:
    f.write(b"PK\x03\x04 half a checkpoint")
    raise OSError(errno.ENOSPC, "No space left on device")


class _DiskFillsUp(io.FileIO):
    """A file that accepts a few hundred bytes, then fails like a full disk."""

    def write(self, data: bytes) -> int:  # type: ignore[override]
        if self.tell() + len(data) > 300:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(data)


@pytest.mark.parametrize("failure", ["torch.save", "file write"])
def test_full_disk_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    path = tmp_path / "latest.pt"
    previous = payload()
    save_checkpoint(path, previous)
    before = path.read_bytes()

    if failure == "torch.save":
        monkeypatch.setattr(torch, "save", _partial_write_then_enospc)
    else:
        # The real torch.save writing into a file whose disk fills up part-way.
        monkeypatch.setattr(ckpt, "open", _DiskFillsUp, raising=False)
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(path, payload(scale=2.0))

    message = str(info.value)
    assert "No space left on device" in message
    assert str(path) in message and "intact" in message
    assert path.read_bytes() == before
    monkeypatch.undo()
    assert_same(previous, load_checkpoint(path))
    assert leftovers(tmp_path) == []


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.pt"
    with pytest.raises(CheckpointError, match="does not exist") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_damaged_file(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "latest.pt"
    save_checkpoint(path, payload())
    data = path.read_bytes()
    damaged = {"truncated": data[: len(data) // 2], "empty": b"", "garbage": b"not a checkpoint"}
    path.write_bytes(damaged[damage])
    with pytest.raises(CheckpointError, match="corrupt") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


class _RunsCode:
    """Unpickling this would run a shell command (it creates a marker file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
@pytest.mark.parametrize("protocol", [None, 2, 4])
def test_code_in_a_checkpoint_is_refused_and_not_run(tmp_path: Path, protocol: int | None) -> None:
    """None: written by torch.save; 2, 4: a plain pickle file of that protocol."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    evil = {"model": _RunsCode(marker)}
    if protocol is None:
        torch.save(evil, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(evil, f, protocol=protocol)

    with pytest.raises(CheckpointError, match="refused for safety") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    if protocol != 4:  # protocol 4 is refused at its first opcode, before reaching the object
        assert "not allowed (Trying to load unsupported GLOBAL posix.system" in str(info.value)
    assert not marker.exists()
    # The file really is dangerous: an unsafe load runs the command.
    if protocol is None:
        torch.load(path, weights_only=False)
    else:
        pickle.loads(path.read_bytes())
    assert marker.exists()


def test_not_a_dict(tmp_path: Path) -> None:
    path = tmp_path / "tensor.pt"
    torch.save(torch.ones(2), path)
    with pytest.raises(CheckpointError, match="not a checkpoint dict"):
        load_checkpoint(path)


def draws() -> tuple:
    values = (random.random(), random.gauss(0.0, 1.0), torch.rand(3), torch.randint(0, 100, (4,)))
    if torch.cuda.is_available():
        values += (torch.rand(3, device="cuda").cpu(),)
    return values


def test_rng_state_round_trip_through_a_checkpoint(tmp_path: Path) -> None:
    random.seed(1)
    torch.manual_seed(1)
    random.gauss(0.0, 1.0)  # leaves a cached second Gaussian in Python's state
    path = tmp_path / "latest.pt"
    save_checkpoint(path, {"rng": capture_rng_state()})
    expected = draws()

    random.seed(99)
    torch.manual_seed(99)
    restore_rng_state(load_checkpoint(path)["rng"])
    assert_same(list(expected), list(draws()))


def test_rng_state_in_memory() -> None:
    state = capture_rng_state()
    expected = draws()
    restore_rng_state(state)
    assert_same(list(expected), list(draws()))


def test_checkpoint_paths(tmp_path: Path) -> None:
    paths = checkpoint_paths(tmp_path)
    assert paths.latest == tmp_path / "checkpoints" / "latest.pt"
    assert paths.best == tmp_path / "checkpoints" / "best.pt"
    assert latest_checkpoint(tmp_path) is None
    save_checkpoint(paths.latest, {"step": 1})
    assert latest_checkpoint(tmp_path) == paths.latest
