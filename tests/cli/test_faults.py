"""Nothing lost: faults injected into real training runs (issue 5).

Each fault is injected for real by ``tests/cli/_fault_runner.py`` (monkeypatching from the outside;
no fault code lives in the product): ``kill -9`` at seeded moments, a disk that fills up, damaged
checkpoints, NaN losses, fp16 overflow, SIGINT/SIGTERM, a data provider that raises.

Faults that leave the process alive run `gcond train` in this process (CliRunner). Those that
kill or signal it run real `gcond train` processes forked by the runner's fork server (one
interpreter imports torch once; each run is a fork that a test can `kill -9`); the uninterrupted
reference of the kill test runs in a fresh interpreter, so "bit-identical" also holds across
interpreters.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from gcond_cli.app import app
from gcond_cli.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE
from gcond_cli.recipe import load_recipe
from gcond_cli.run.checkpoint import load_checkpoint
from gcond_cli.run.loop import Trainer
from tests.cli import _fault_runner
from tests.helpers import TINY

pytestmark = pytest.mark.slow  # integration: faults injected into real runs

RUNNER = Path(__file__).parent / "_fault_runner.py"
FAST = ["log.tensorboard=false"]
runner = CliRunner()
# These runs are tiny: one thread each keeps them fast on a busy machine, where OpenMP's
# spinning threads would otherwise fight over the cores (100x slower steps under load).
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------ helpers


def cli(root: Path, *args: str, faults: str = "", monkeypatch=None) -> tuple[int, str]:
    """`gcond train TINY log.runs_dir=root ARGS` in this process, with `faults` installed."""
    if faults:
        _fault_runner.install(faults, monkeypatch)
    result = runner.invoke(app, ["train", str(TINY), f"log.runs_dir={root}", *args])
    return result.exit_code, result.output


def spawn(args: list[str]) -> subprocess.Popen:
    """`gcond train TINY ARGS` in a fresh interpreter (through the fault runner, no faults)."""
    return subprocess.Popen(
        [sys.executable, str(RUNNER), "train", str(TINY), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **ONE_THREAD},
    )


def finish(proc: subprocess.Popen | Child, timeout: float = 300) -> tuple[int, str]:
    if isinstance(proc, Child):
        return proc.finish(timeout)
    output, _ = proc.communicate(timeout=timeout)
    return proc.returncode, output


class ForkServer:
    """`_fault_runner.py --serve`: imports once, forks one real `gcond` process per run."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.count = 0
        self.proc = subprocess.Popen(
            [sys.executable, str(RUNNER), "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **ONE_THREAD},
        )
        self.ready = False

    def ask(self, request: dict) -> dict:
        if not self.ready:
            assert json.loads(self.proc.stdout.readline()) == {"ready": True}
            self.ready = True
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the fork server died"
        return json.loads(line)

    def run(self, args: list[str], faults: str = "") -> Child:
        """`gcond train TINY ARGS` in a forked process with `faults` installed."""
        self.count += 1
        log = self.log_dir / f"run-{self.count}.log"
        request = {"op": "run", "args": ["train", str(TINY), *args], "faults": faults}
        return Child(self, self.ask({**request, "log": str(log)})["pid"], log)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


class Child:
    """A forked `gcond train` process (Popen-like: poll, kill, send_signal)."""

    def __init__(self, server: ForkServer, pid: int, log: Path) -> None:
        self.server, self.pid, self.log = server, pid, log

    def poll(self) -> int | None:
        """None while running (a finished child is a zombie until the server reaps it)."""
        try:
            state = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return 0
        return None if state != "Z" else 0

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def finish(self, timeout: float) -> tuple[int, str]:
        code = self.server.ask({"op": "wait", "pid": self.pid, "timeout": timeout})["code"]
        assert code is not None, f"still running after {timeout} s:\n{self.log.read_text()}"
        return code, self.log.read_text()


@pytest.fixture(scope="module")
def forks(tmp_path_factory) -> ForkServer:
    server = ForkServer(tmp_path_factory.mktemp("logs"))
    yield server
    server.close()


def checkpoint(run_dir: Path, name: str = "latest.pt") -> dict:
    return load_checkpoint(run_dir / "checkpoints" / name)


def assert_tensors_equal(a: object, b: object, where: str = "") -> None:
    """Same nested structure, every tensor torch.equal (bit-identical), other leaves ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_tensors_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_tensors_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def records_so_far(run_dir: Path) -> list[dict]:
    """metrics.jsonl of a killed run: its last line may be half written."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines[:-1]] + [
        json.loads(line) for line in lines[-1:] if line.endswith("}")
    ]


def records(run_dir: Path) -> list[dict]:
    """metrics.jsonl, every line of which must be complete JSON."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def temporaries(run_dir: Path) -> list[Path]:
    return sorted(p for p in run_dir.rglob(".*") if ".tmp-" in p.name)


def assert_nothing_half_written(run_dir: Path) -> None:
    for path in (run_dir / "checkpoints").glob("*.pt"):
        load_checkpoint(path)
    records(run_dir)
    assert temporaries(run_dir) == []
    if (run_dir / "summary.json").exists():
        json.loads((run_dir / "summary.json").read_text())


def snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() if p.is_file() else b"<dir>"
        for p in sorted(directory.rglob("*"))
    }


def trainer_for(tmp_path: Path, *overrides: str) -> Trainer:
    recipe = load_recipe(TINY, [f"log.runs_dir={tmp_path}", *FAST, *overrides])
    trainer = Trainer(recipe, tmp_path / "run", console=False)
    trainer.logger.start(0)
    return trainer


def state_of(trainer: Trainer) -> dict:
    """What a step may change (deep copies): weights, the optimizer's moments, the conductor's
    state, the scaler. (The learning-rate schedule counts every step, skipped ones included.)"""
    return copy.deepcopy(
        {
            "model": trainer.model.state_dict(),
            "optimizer": trainer.optimizer.state_dict()["state"],
            "method": trainer.method.state_dict(),
            "scaler": trainer.scaler.state_dict(),
        }
    )


def record_steps(trainer: Trainer) -> list[tuple[dict, dict, dict]]:
    """Make `trainer.run()` record (state before, stats, state after) for every step."""
    history = []
    original = trainer.train_step

    def train_step() -> dict[str, float]:
        before = state_of(trainer)
        stats = original()
        history.append((before, stats, state_of(trainer)))
        return stats

    trainer.train_step = train_step  # type: ignore[method-assign]
    return history


def weights_moved(before: dict, after: dict) -> bool:
    return any(not torch.equal(after["model"][k], t) for k, t in before["model"].items())


def all_finite(state: dict) -> bool:
    return all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


# ------------------------------------------------------------------------------------ kill -9

# 12 steps; a checkpoint every 2 and at each eval (3, 6, 9, 12) that improves eval/l1.
KILL_RECIPE = [
    "schedule.max_steps=12",
    "checkpoint.every=2",
    "eval.every=3",
    "checkpoint.best_metric=eval/l1",
    "checkpoint.best_mode=min",
    "conductor.momentum_beta=0.9",  # the conductor's own state matters for the result
    *FAST,
]
KILL_SEED = 20251125
IN_PLACE = re.compile(r"fault-runner: latest\.pt of step (\d+) in place")


def latest_step(run_dir: Path) -> int | None:
    path = run_dir / "checkpoints" / "latest.pt"
    return int(load_checkpoint(path)["step"]) if path.exists() else None


def first_moment(rng: random.Random) -> str:
    """A seeded moment before the first checkpoint (step 2) is complete."""
    return rng.choice(
        [
            "kill_after_step:1",
            "kill_in_metrics:train:1",
            f"kill_in_write:latest.pt:2:{rng.randint(1, 200_000)}",
        ]
    )


def next_moment(kind: str, rng: random.Random, resume_step: int) -> str:
    """A seeded moment of `kind` in the process that resumes at `resume_step`."""
    next_even = resume_step + 2 - resume_step % 2
    if kind == "kill_in_write":  # inside the temporary file of a checkpoint (not the first)
        step = rng.choice([s for s in (next_even, next_even + 2) if s > 2])
        return f"kill_in_write:latest.pt:{step}:{rng.randint(1, 300_000)}"  # of ~650 kB
    if kind == "kill_before_replace":  # temporary file complete and fsynced, not yet renamed
        return f"kill_before_replace:latest.pt:{next_even}"
    if kind == "kill_after_replace":  # at an eval step: best.pt must already be in place
        return "kill_after_replace:latest.pt:6"
    if kind == "kill_in_metrics":  # half a line in metrics.jsonl
        if rng.random() < 0.5:
            return f"kill_in_metrics:train:{resume_step + rng.randint(1, 2)}"
        return f"kill_in_metrics:eval:{(resume_step // 3 + 1) * 3}"
    raise ValueError(kind)


def wait_for_step(proc: Child, run_dir: Path, step: int, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the run ended before step {step}"
        path = run_dir / "metrics.jsonl"
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if record.get("kind") == "train" and record["step"] >= step:
                    return
        time.sleep(0.02)
    raise AssertionError(f"no step {step} within {timeout} s")


def assert_best_consistent(run_dir: Path) -> None:
    """best.pt holds the best that latest.pt records (or a newer one the resumed run rewrites)."""
    latest = checkpoint(run_dir)
    if latest["best"] is None:
        return
    best = checkpoint(run_dir, "best.pt")
    if best["step"] <= latest["step"]:
        assert best["best"] == latest["best"], (best["step"], latest["step"])


def test_kill_9_at_seeded_moments_then_resume_ends_bit_identical(tmp_path, forks):
    rng = random.Random(KILL_SEED)
    root = tmp_path / "runs"
    reference = spawn([f"log.runs_dir={root}", *KILL_RECIPE, "--run-name", "reference"])
    run_dir = root / "tiny" / "killed"
    fresh = [f"log.runs_dir={root}", *KILL_RECIPE, "--run-name", "killed"]
    resume = ["--resume", str(run_dir)]
    tried = []

    # 1. Killed before the first checkpoint: nothing to resume, the harness says so.
    spec = first_moment(rng)
    code, output = finish(forks.run(fresh, spec))
    assert code == -signal.SIGKILL, output
    tried.append(spec)
    assert latest_step(run_dir) is None
    before = snapshot(run_dir)
    code, output = cli(root, "--resume", str(run_dir))
    assert code == EXIT_USAGE, output
    assert "no checkpoint" in output and "--run-name" in output, output
    assert "Traceback" not in output
    assert snapshot(run_dir) == before
    shutil.rmtree(run_dir)  # what the message tells the user to do

    # 2-6. Killed at seeded moments; each resume starts from the last complete checkpoint.
    kinds = [
        "kill_in_write",
        "kill_before_replace",
        "kill_after_replace",
        "kill_in_metrics",
        "external",
    ]
    args = fresh
    for kind in kinds:
        start = latest_step(run_dir) or 0
        if kind == "external":
            target = start + rng.randint(1, 2)
            proc = forks.run(args, "slow_steps:0.3")
            wait_for_step(proc, run_dir, target)
            time.sleep(rng.uniform(0.0, 0.3))
            proc.kill()
            code, output = finish(proc)
            spec = f"external SIGKILL after step {target} was logged"
        else:
            spec = next_moment(kind, rng, start)
            code, output = finish(forks.run(args, spec))
        tried.append(spec)
        assert code == -signal.SIGKILL, f"{spec}: the run was not killed\n{output}"
        if args is resume:
            assert f"resuming {run_dir} at step {start}" in output, output
        if kind == "external":  # killed from outside: whichever checkpoint was complete
            logged = [r["step"] for r in records_so_far(run_dir) if r["kind"] == "train"]
            assert start <= (latest_step(run_dir) or 0) <= logged[-1]
        else:  # the last checkpoint the killed process renamed into place, else the one before
            renamed = [int(s) for s in IN_PLACE.findall(output)]
            expected = renamed[-1] if renamed else (start or None)
            assert latest_step(run_dir) == expected, (spec, output)
        assert_best_consistent(run_dir)
        args = resume

    # 7. Resumed once more, undisturbed, it finishes the run.
    start = latest_step(run_dir)
    code, output = finish(forks.run(resume))
    assert code == 0, output
    assert f"resuming {run_dir} at step {start}" in output
    code, ref_output = finish(reference)
    assert code == 0, ref_output
    ref_dir = root / "tiny" / "reference"

    final, expected = checkpoint(run_dir), checkpoint(ref_dir)
    assert final["step"] == expected["step"] == 12
    assert final["model"].keys() == expected["model"].keys()
    for key in final["model"]:
        assert torch.equal(final["model"][key], expected["model"][key]), key
    assert_tensors_equal(final["method"], expected["method"], "method")
    assert_tensors_equal(final["optimizer"], expected["optimizer"], "optimizer")
    assert_tensors_equal(
        checkpoint(run_dir, "best.pt")["model"], checkpoint(ref_dir, "best.pt")["model"], "best"
    )
    # The metrics tell the same story: every step once, the same losses as the reference.
    got, want = records(run_dir), records(ref_dir)
    assert [(r["kind"], r["step"]) for r in got] == [(r["kind"], r["step"]) for r in want]
    for a, b in zip(got, want, strict=True):
        assert a.get("loss/total") == b.get("loss/total"), a["step"]
    assert_nothing_half_written(run_dir)
    print("kill -9 moments:", *tried, sep="\n  ")
    assert len(tried) >= 6, tried


# ------------------------------------------------------------------------------------ disk full


def test_no_space_left_while_writing_a_checkpoint(tmp_path, monkeypatch):
    faults = "enospc_in_write:latest.pt:4:3000"
    code, output = cli(
        tmp_path,
        "schedule.max_steps=6",
        "checkpoint.every=2",
        "eval.every=100",
        *FAST,
        "--run-name",
        "full-disk",
        faults=faults,
        monkeypatch=monkeypatch,
    )
    run_dir = tmp_path / "tiny" / "full-disk"
    assert code == EXIT_FAILED, output
    path = run_dir / "checkpoints" / "latest.pt"
    assert f"could not write checkpoint {path}: No space left on device" in output
    assert "previous checkpoint" in output and "intact" in output
    assert "Traceback" not in output
    monkeypatch.undo()
    previous = load_checkpoint(path)  # intact and loadable: the one of step 2
    assert previous["step"] == 2
    assert_nothing_half_written(run_dir)
    # ... and the run continues from it once there is room again.
    code, output = cli(tmp_path, "--resume", str(run_dir))
    assert code == 0, output
    assert "at step 2" in output
    assert checkpoint(run_dir)["step"] == 6


# ------------------------------------------------------------------------------------ damaged


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    code, output = cli(root, "schedule.max_steps=2", "eval.every=2", *FAST, "--run-name", "done")
    assert code == 0, output
    return root / "tiny" / "done"


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated-half":
        path.write_bytes(data[: len(data) // 2])
    elif how == "truncated-tail":
        path.write_bytes(data[:-20])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "garbage":
        path.write_bytes(random.Random(0).randbytes(4096))
    elif how == "pickle-scrambled":  # the zip stays valid, its pickle (data.pkl) does not
        start = data.index(b"data.pkl") + len(b"data.pkl")
        path.write_bytes(data[:start] + b"\x07" * 64 + data[start + 64 :])
    elif how == "not-a-checkpoint":  # a valid file that misses what a checkpoint holds
        torch.save({"step": 3, "model": {}}, path)
    elif how == "other-model":  # a checkpoint of another model size
        payload = load_checkpoint(path)
        payload["model"] = {k: torch.zeros(3) for k in payload["model"]}
        torch.save(payload, path)
    else:
        raise ValueError(how)


@pytest.mark.parametrize(
    "how",
    [
        "truncated-half",
        "truncated-tail",
        "empty",
        "garbage",
        "pickle-scrambled",
        "not-a-checkpoint",
        "other-model",
    ],
)
def test_damaged_checkpoint_on_resume_is_refused_and_nothing_changes(finished_run, tmp_path, how):
    """(A checkpoint that would run code: test_bad_input.py.)"""
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    path = run_dir / "checkpoints" / "latest.pt"
    _damage(path, how)
    before = snapshot(run_dir)

    code, output = cli(tmp_path, "--resume", str(run_dir))
    assert code == EXIT_USAGE, output
    assert str(path) in output.replace("\n", "")
    assert "Traceback" not in output
    assert snapshot(run_dir) == before


# ------------------------------------------------------------------------------------ NaN


def test_nan_loss_step_is_skipped_state_untouched_and_training_recovers(tmp_path, monkeypatch):
    _fault_runner.install("scale_loss:l1:3:nan", monkeypatch)
    trainer = trainer_for(
        tmp_path, "schedule.max_steps=6", "conductor.momentum_beta=0.9", "eval.every=100"
    )
    history = record_steps(trainer)
    assert trainer.run() == 0
    for step, (before, stats, after) in enumerate(history, start=1):
        assert all_finite(after), step
        if step == 3:
            assert stats["skipped"] == 1 and stats["nonfinite/l1"] == 1, stats
            assert stats["nonfinite/ssim"] == 0
            for part in ("model", "method", "optimizer", "scaler"):
                assert_tensors_equal(after[part], before[part], f"step 3 {part}")
        else:
            assert stats["skipped"] == 0, step
            assert weights_moved(before, after), step
    assert trainer.consecutive_skipped == 0
    # The conductor counts only applied steps; the skipped one is marked in metrics.jsonl.
    assert history[-1][1]["step"] == 5
    trainer.logger.close()
    train = [r for r in records(trainer.run_dir) if r["kind"] == "train"]
    skipped = [(r["step"], r["skipped"], r["loss/l1"]) for r in train]
    assert skipped[2] == (3, 1.0, None)
    assert all(s == 0.0 for _, s, _ in skipped[:2] + skipped[3:])


def test_nan_for_max_skipped_steps_stops_with_a_message_and_a_checkpoint(tmp_path, monkeypatch):
    code, output = cli(
        tmp_path,
        "schedule.max_steps=20",
        "checkpoint.every=2",
        "eval.every=2",
        "max_skipped_steps=3",
        *FAST,
        "--run-name",
        "nan",
        faults="scale_loss:ssim:3-:nan",
        monkeypatch=monkeypatch,
    )
    assert code == EXIT_FAILED, output
    assert "3 consecutive steps had non-finite gradients" in output
    assert "max_skipped_steps = 3" in output and "stopped at step 5" in output
    assert "step 3 skipped: non-finite gradients from ssim" in output
    assert "Traceback" not in output
    run_dir = tmp_path / "tiny" / "nan"
    stopped = checkpoint(run_dir)
    assert stopped["step"] == 5 and stopped["consecutive_skipped"] == 3
    # Every step the checkpoint holds is in the metrics, the skipped ones marked.
    train = [(r["step"], r["skipped"]) for r in records(run_dir) if r["kind"] == "train"]
    assert train == [(1, 0.0), (2, 0.0), (3, 1.0), (4, 1.0), (5, 1.0)]
    # The weights and the conductor state are those of step 2 (best.pt, the last good eval).
    good = checkpoint(run_dir, "best.pt")
    assert good["step"] == 2
    assert_tensors_equal(stopped["model"], good["model"], "model")
    assert_tensors_equal(stopped["method"], good["method"], "method")
    assert_nothing_half_written(run_dir)


# ------------------------------------------------------------------------------------ fp16


def test_fp16_overflow_backs_off_the_scale_and_never_reaches_the_weights(tmp_path, monkeypatch):
    # A loss 1e10 times too large overflows fp16 in the backward pass (a finite fp32 loss).
    _fault_runner.install("scale_loss:l1:4:1e10", monkeypatch)
    trainer = trainer_for(tmp_path, "precision=fp16", "schedule.max_steps=6", "eval.every=3")
    assert trainer.autocast_dtype == torch.float16 and trainer.scaler.is_enabled()
    history = record_steps(trainer)
    assert trainer.run() == 0
    for step, (before, stats, after) in enumerate(history, start=1):
        assert all_finite(after), f"non-finite weights after step {step}"
        scale_before, scale_after = before["scaler"]["scale"], after["scaler"]["scale"]
        if step == 4:
            assert stats["skipped"] == 1 and stats["nonfinite/l1"] == 1, stats
            assert math.isfinite(stats["loss/l1"])  # a finite loss: the gradient overflowed
            assert scale_after == scale_before * 0.5  # backed off
            assert_tensors_equal(after["model"], before["model"], "model")
            assert_tensors_equal(after["optimizer"], before["optimizer"], "optimizer")
            assert_tensors_equal(after["method"], before["method"], "method")
        else:
            assert stats["skipped"] == 0, (step, stats)
            assert weights_moved(before, after), step
    trainer.logger.close()


# ------------------------------------------------------------------------------------ signals


def test_sigint_and_sigterm_write_a_checkpoint_and_say_how_to_resume(tmp_path, forks):
    recipe = ["schedule.max_steps=12", "checkpoint.every=100", "eval.every=100", *FAST]
    runs = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        args = [f"log.runs_dir={tmp_path}", *recipe, "--run-name", sig.name]
        runs[sig] = forks.run(args, "slow_steps:0.3")
    for sig, proc in runs.items():
        run_dir = tmp_path / "tiny" / sig.name
        wait_for_step(proc, run_dir, 2)
        proc.send_signal(sig)
    for sig, proc in runs.items():
        run_dir = tmp_path / "tiny" / sig.name
        code, output = finish(proc)
        assert code == EXIT_INTERRUPTED, output
        assert f"stopped by {sig.name}" in output
        assert f"--resume {run_dir}" in output
        assert "Traceback" not in output
        stopped = checkpoint(run_dir)
        logged = [r["step"] for r in records(run_dir) if r["kind"] == "train"]
        assert 2 <= stopped["step"] < 12
        assert logged[-1] == stopped["step"]  # nothing was lost: every logged step is saved
        assert_nothing_half_written(run_dir)

        code, output = cli(tmp_path, "--resume", str(run_dir))
        assert code == 0, output
        assert f"at step {stopped['step']}" in output
        assert checkpoint(run_dir)["step"] == 12
        assert [r["step"] for r in records(run_dir) if r["kind"] == "train"] == list(range(1, 13))


# ------------------------------------------------------------------------------------ data


def test_a_data_provider_that_raises_is_named_with_the_step(tmp_path, monkeypatch):
    code, output = cli(
        tmp_path,
        "schedule.max_steps=6",
        "checkpoint.every=2",
        "eval.every=2",
        *FAST,
        "--run-name",
        "bad-data",
        faults="data_raises:4:2",
        monkeypatch=monkeypatch,
    )
    assert code == EXIT_FAILED, output
    flat = output.replace("\n", " ")
    assert "step 4" in flat
    assert "data provider" in flat and "DeviceDataProvider" in flat and "synthetic" in flat
    assert "simulated read error in micro-batch 2" in flat
    assert "Traceback" not in output
    run_dir = tmp_path / "tiny" / "bad-data"
    assert checkpoint(run_dir)["step"] == 2
    assert [r["step"] for r in records(run_dir) if r["kind"] == "train"] == [1, 2, 3]
    assert "Traceback" in (run_dir / "error.log").read_text()  # kept for a bug report
    assert_nothing_half_written(run_dir)
