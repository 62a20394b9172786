"""Run ``gcond`` with faults injected by monkeypatching, so that no fault code lives in the product.

Tests start it as a subprocess, the faults in ``GCOND_FAULTS``::

    GCOND_FAULTS="kill_in_write:latest.pt:4:1000" python tests/cli/_fault_runner.py train RECIPE ...

or call :func:`install` in-process with pytest's ``monkeypatch`` for faults that leave
the process alive. A spec is ``;``-separated ``kind:arg:...`` items; STEPS is ``3``, ``3,5``,
``3-5`` or ``3-`` (3 and every later step):

=============================== =================================================================
``kill_after_step:S``           SIGKILL once optimizer step S is done in memory, before it is
                                logged or checkpointed
``kill_in_write:NAME:S:B``      SIGKILL after B bytes of checkpoint NAME (``latest.pt``,
                                ``best.pt``) of step S reached its temporary file
``kill_before_replace:NAME:S``  SIGKILL with NAME's temporary file complete, before the rename
``kill_after_replace:NAME:S``   SIGKILL right after NAME of step S was renamed into place
``kill_in_metrics:KIND:S``      SIGKILL with half of the ``metrics.jsonl`` record of step S
                                (KIND ``train`` or ``eval``) written
``slow_steps:SECONDS``          sleep at the start of every step (time for a test to send a
                                signal while the run is busy)
``enospc_in_write:NAME:S:B``    the disk is full after B bytes of checkpoint NAME of step S
``scale_loss:LOSS:STEPS:F``     multiply loss LOSS by F (``nan``, ``inf``, ``1e10``) at STEPS
``data_raises:S:M``             the data provider raises on micro-batch M (1-based) of step S
=============================== =================================================================

Every checkpoint renamed into place is reported on stderr as ``fault-runner: NAME of step S in
place``, so a test knows which checkpoint was the last complete one when a kill struck.

``python tests/cli/_fault_runner.py --serve`` is a fork server (see :func:`serve`) that starts such
runs as forked processes, without paying for a fresh interpreter's imports each time.
"""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

Patch = Callable[[Any, str, Any], None]  # setattr(target, name, value)


class _State:
    """What the patched code knows about where the run is."""

    def __init__(self) -> None:
        self.step = 0  # the optimizer step being computed (1-based)
        self.micro_batch = 0  # micro-batches drawn in this step
        self.writing: tuple[str, int] | None = None  # (file name, step) of the checkpoint save
        self.before_step: list[Callable[[int], None]] = []
        self.after_step: list[Callable[[int], None]] = []
        self.on_micro_batch: list[Callable[[int, int], None]] = []
        self.write_limits: dict[tuple[str, int], tuple[int, str]] = {}  # -> (bytes, kill|enospc)
        self.replace_faults: dict[tuple[str, int], str] = {}  # -> before|after
        self.metrics_kills: set[tuple[str, int]] = set()
        self.loss_factors: dict[str, tuple[Callable[[int], bool], float]] = {}


STATE = _State()


def say(message: str) -> None:
    sys.stderr.write(f"fault-runner: {message}\n")
    sys.stderr.flush()


def kill(reason: str) -> None:
    """``kill -9`` of this very process: no handler, no cleanup, no flush."""
    say(f"SIGKILL {reason}")
    os.kill(os.getpid(), signal.SIGKILL)


def parse_steps(text: str) -> Callable[[int], bool]:
    """``3`` / ``3,5`` / ``3-5`` / ``3-`` -> a predicate on step numbers."""
    ranges = []
    for part in text.split(","):
        low, dash, high = part.partition("-")
        ranges.append((int(low), int(high) if high else (10**18 if dash else int(low))))
    return lambda step: any(lo <= step <= hi for lo, hi in ranges)


# --------------------------------------------------------------------------------- patches


class _OsProxy:
    """``os`` as ``gcond_cli.run.checkpoint`` sees it, with a ``replace`` that can be
    interrupted."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def replace(self, src: Any, dst: Any) -> None:
        name, step = STATE.writing or (Path(dst).name, -1)
        fault = STATE.replace_faults.get((name, step))
        if fault == "before":
            kill(f"before renaming the complete temporary file of {name} of step {step}")
        self._real.replace(src, dst)
        say(f"{name} of step {step} in place")
        if fault == "after":
            kill(f"right after {name} of step {step} was renamed into place")


class _LimitedFile(io.FileIO):
    """A checkpoint's temporary file that takes ``limit`` bytes, then kills or reports ENOSPC."""

    def __init__(self, file: Any, mode: str, limit: int, action: str, what: str) -> None:
        super().__init__(file, mode)
        self.limit, self.action, self.what = limit, action, what

    def write(self, data: Any) -> int:  # type: ignore[override]
        room = self.limit - self.tell()
        if len(data) <= room:
            return super().write(data)
        if room > 0:
            super().write(bytes(data)[:room])
        if self.action == "kill":
            kill(f"with {self.limit} bytes of {self.what} written")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _base(patch: Patch) -> None:
    """Patches every fault relies on: step tracking, checkpoint context, data and loss hooks."""
    from gcond_cli.data import DeviceDataProvider
    from gcond_cli.run import checkpoint, logger, loop
    from gcond_cli.run import parts as run

    original_step = loop.Trainer.train_step

    def train_step(self: Any) -> dict[str, float]:
        STATE.step, STATE.micro_batch = self.step + 1, 0
        for hook in STATE.before_step:
            hook(STATE.step)
        stats = original_step(self)
        for hook in STATE.after_step:
            hook(STATE.step)
        return stats

    patch(loop.Trainer, "train_step", train_step)

    original_save = checkpoint.save_checkpoint

    def save_checkpoint(path: Path, payload: dict) -> None:
        STATE.writing = (Path(path).name, int(payload["step"]))
        try:
            original_save(path, payload)
        finally:
            STATE.writing = None

    patch(checkpoint, "save_checkpoint", save_checkpoint)
    patch(checkpoint, "os", _OsProxy(os))

    def open_(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        limit = STATE.write_limits.get(STATE.writing) if STATE.writing else None
        if limit is None or "w" not in mode:
            return open(file, mode, *args, **kwargs)
        name, step = STATE.writing  # type: ignore[misc]
        return _LimitedFile(file, mode, *limit, what=f"{name} of step {step}")

    patch(checkpoint, "open", open_)

    original_record = logger.RunLogger._write_record

    def _write_record(self: Any, record: dict) -> None:
        if (record.get("kind"), record.get("step")) in STATE.metrics_kills:
            line = json.dumps(record, default=str)
            self._jsonl.write(line[: len(line) // 2])
            self._jsonl.flush()
            kill(f"with half of the {record['kind']} record of step {record['step']} written")
        original_record(self, record)

    patch(logger.RunLogger, "_write_record", _write_record)

    original_call = DeviceDataProvider.__call__

    def __call__(self: Any) -> Any:
        STATE.micro_batch += 1
        for hook in STATE.on_micro_batch:
            hook(STATE.step, STATE.micro_batch)
        return original_call(self)

    patch(DeviceDataProvider, "__call__", __call__)

    original_build_loss = run._build_loss

    def build_loss(recipe: Any, name: str, section: Any, targets: Any) -> Callable[[Any, Any], Any]:
        fn = original_build_loss(recipe, name, section, targets)
        if name not in STATE.loss_factors:
            return fn
        at, factor = STATE.loss_factors[name]

        def faulty_loss(output: Any, target: Any) -> Any:
            loss = fn(output, target)
            return loss * factor if at(STATE.step) else loss

        return faulty_loss

    patch(run, "_build_loss", build_loss)


def _add(kind: str, args: list[str]) -> None:
    if kind == "kill_after_step":
        target = int(args[0])

        def after(step: int) -> None:
            if step == target:
                kill(f"after optimizer step {step}, before it was logged or saved")

        STATE.after_step.append(after)
    elif kind in ("kill_in_write", "enospc_in_write"):
        name, step, limit = args[0], int(args[1]), int(args[2])
        STATE.write_limits[(name, step)] = (limit, "kill" if kind == "kill_in_write" else "enospc")
    elif kind in ("kill_before_replace", "kill_after_replace"):
        STATE.replace_faults[(args[0], int(args[1]))] = kind.split("_")[1]
    elif kind == "kill_in_metrics":
        STATE.metrics_kills.add((args[0], int(args[1])))
    elif kind == "slow_steps":
        seconds = float(args[0])
        STATE.before_step.append(lambda step: time.sleep(seconds))
    elif kind == "scale_loss":
        STATE.loss_factors[args[0]] = (parse_steps(args[1]), float(args[2]))
    elif kind == "data_raises":
        step, micro = int(args[0]), int(args[1])

        def on_micro_batch(current: int, index: int) -> None:
            if (current, index) == (step, micro):
                raise OSError(errno.EIO, f"simulated read error in micro-batch {index}")

        STATE.on_micro_batch.append(on_micro_batch)
    else:
        raise ValueError(f"unknown fault {kind!r}")


def install(spec: str, monkeypatch: Any = None) -> _State:
    """Install the faults of ``spec`` (undone with ``monkeypatch`` when one is given)."""
    global STATE
    STATE = _State()

    def patch(target: Any, name: str, value: Any) -> None:
        if monkeypatch is None:
            setattr(target, name, value)
        else:
            monkeypatch.setattr(target, name, value, raising=False)

    _base(patch)
    for item in filter(None, (s.strip() for s in spec.split(";"))):
        kind, *args = item.split(":")
        _add(kind, args)
    return STATE


def run_gcond(args: list[str], faults: str) -> None:
    """``gcond ARGS`` in this process with ``faults`` installed (never undone)."""
    install(faults)
    from gcond_cli.app import main as gcond_main

    sys.argv = ["gcond", *args]
    gcond_main()


# --------------------------------------------------------------------------------- fork server


def _child(args: list[str], faults: str, log: str) -> None:
    """In a forked child: output to ``log``, run gcond, exit as a ``gcond`` process would."""
    code = 1
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        run_gcond(args, faults)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()  # what an uncaught exception prints in a fresh interpreter
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve() -> None:
    """Fork server: one interpreter imports torch and the harness once, then forks one real
    ``gcond`` process per request, which a test can kill (-9), signal and wait for. A fresh
    interpreter per run costs seconds of imports; a fork costs milliseconds.

    Requests and replies are JSON lines on stdin/stdout:
    ``{"op": "run", "args": [...], "faults": "...", "log": PATH}`` -> ``{"pid": N}``;
    ``{"op": "wait", "pid": N, "timeout": S}`` -> ``{"code": C}`` (negative: killed by signal -C;
    ``null``: still running after S seconds, then killed). At end of input, children still
    running are killed.
    """
    import gcond_cli.app
    import gcond_cli.train  # noqa: F401 (imported once, shared by every child)

    children: set[int] = set()

    def reply(message: dict) -> None:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()

    reply({"ready": True})
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "run":
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _child(request["args"], request.get("faults", ""), request["log"])
            children.add(pid)
            reply({"pid": pid})
        elif request["op"] == "wait":
            pid, code = request["pid"], None
            deadline = time.monotonic() + float(request.get("timeout", 300))
            while time.monotonic() < deadline:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    code = os.waitstatus_to_exitcode(status)
                    break
                time.sleep(0.01)
            else:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            children.discard(pid)
            reply({"code": code})
    for pid in children:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def main() -> None:
    if sys.argv[1:] == ["--serve"]:
        serve()
    else:
        run_gcond(sys.argv[1:], os.environ.get("GCOND_FAULTS", ""))


if __name__ == "__main__":
    main()
