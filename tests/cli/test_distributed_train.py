"""``gcond train`` under torchrun: 2 CPU processes (gloo, loopback only) on the tiny recipe.

One run directory written by rank 0 alone, each rank its own data shard, a resumable
distributed run, and a failure or a signal on one rank that ends every rank instead of a hang.
The torchrun launches are the slow part (each process imports torch); the three independent
ones start together.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gcond_cli.data import DeviceDataProvider, build_datasets
from gcond_cli.errors import UsageError
from gcond_cli.recipe import load_recipe
from gcond_cli.run import distributed
from gcond_cli.run.loop import Trainer
from tests.helpers import TINY

FSDP = "distributed.strategy=fsdp"
FAULTY = Path(__file__).parent / "_faulty_train.py"  # gcond with a fault injected on one rank
TIMEOUT_S = 240  # far above a normal launch: reaching it means the ranks hung


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Launch:
    """``torchrun --nproc-per-node 2 ... train tiny.yaml`` in the background; output to a file."""

    def __init__(
        self, root: Path, name: str, *args: str, fault: str | None = None, nproc: int = 2
    ) -> None:
        self.runs = root / name
        self.runs.mkdir(parents=True)
        self.log = root / f"{name}.log"
        entry = [str(FAULTY)] if fault else ["-m", "gcond_cli"]
        command = [
            sys.executable, "-m", "torch.distributed.run",  # = torchrun, this interpreter's
            "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
            "--master-port", str(free_port()),
            *entry, "train", str(TINY), f"log.runs_dir={self.runs}", *args,
        ]  # fmt: skip
        env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
        if fault:
            env["GCOND_TEST_FAULT"] = fault
        with open(self.log, "w") as out:
            self.process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        self.result: tuple[int, str] | None = None

    def wait(self) -> tuple[int, str]:
        """Exit code and output, failing the test on a hang."""
        if self.result is None:
            try:
                code = self.process.wait(TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.kill()
                pytest.fail(f"torchrun hung for {TIMEOUT_S} s:\n{self.log.read_text()}")
            self.result = code, self.log.read_text()
        return self.result

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)  # torchrun and its workers
            self.process.wait()


def run_dirs(launch: Launch) -> list[Path]:
    return sorted((launch.runs / "tiny").iterdir())


def checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)


def train_steps(run_dir: Path) -> list[int]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if r["kind"] == "train"]


@pytest.fixture(scope="module")
def launches(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("torchrun")
    started = {
        "full": Launch(root, "full", "--run-name", "full"),
        "crash": Launch(root, "crash", "--run-name", "crash", fault="raise:1:3"),
        "stop": Launch(root, "stop", "--run-name", "stop", fault="sigterm:0:3"),
        "fsdp": Launch(root, "fsdp", "--run-name", "fsdp", FSDP),
        "fsdp_crash": Launch(root, "fsdp_crash", "--run-name", "c", FSDP, fault="raise:1:3"),
    }
    yield root, started
    for launch in started.values():
        launch.kill()


# ------------------------------------------------------------------------------ under torchrun


@pytest.mark.slow
def test_torchrun_writes_one_run_directory_from_rank_0(launches):
    _, started = launches
    code, output = started["full"].wait()
    assert code == 0, output
    [run_dir] = run_dirs(started["full"])
    assert run_dir.name == "full"
    for name in ("recipe.yaml", "summary.json", "checkpoints/latest.pt", "checkpoints/best.pt"):
        assert (run_dir / name).is_file(), name
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
    assert train_steps(run_dir) == [1, 2, 3, 4]  # one writer: no step twice
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4
    # Rank 0 alone prints.
    assert output.count("step 1/4") == 1
    assert output.count("done: 4 steps") == 1


@pytest.mark.slow
def test_a_failure_on_one_rank_ends_every_rank_with_its_message(launches):
    _, started = launches
    code, output = started["crash"].wait()  # within TIMEOUT_S: no hang
    assert code != 0
    assert "error: [rank 1] training failed at step 3: RuntimeError: injected failure" in output
    [run_dir] = run_dirs(started["crash"])
    assert checkpoint(run_dir)["step"] == 2  # checkpoint.every: 2, written before the failure


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step(launches):
    _, started = launches
    code, output = started["stop"].wait()
    assert code != 0  # the workers exit 130 (stopped), which torchrun reports as a failure
    assert output.count("stopped by SIGTERM after step 3; checkpoint written") == 1
    [run_dir] = run_dirs(started["stop"])
    assert checkpoint(run_dir)["step"] == 3
    assert train_steps(run_dir) == [1, 2, 3]


@pytest.mark.slow
def test_resumed_distributed_run_ends_with_the_uninterrupted_weights(launches):
    root, started = launches
    started["crash"].wait()
    [crashed] = run_dirs(started["crash"])
    resumed = Launch(root, "resume", "--resume", str(crashed))
    code, output = resumed.wait()
    assert code == 0, output
    assert f"resuming {crashed} at step 2" in output
    assert train_steps(crashed) == [1, 2, 3, 4]
    started["full"].wait()
    [full] = run_dirs(started["full"])
    final, reference = checkpoint(crashed), checkpoint(full)
    assert final["step"] == reference["step"] == 4
    for key, value in reference["model"].items():
        assert torch.equal(final["model"][key], value), key


def sharded_model(run_dir: Path) -> dict[str, torch.Tensor]:
    """The model of a sharded run's latest checkpoint, gathered from its DCP directory."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    path = run_dir / "gathered.pt"
    dcp_to_torch_save(run_dir / "checkpoints" / "latest.dcp", path)
    return torch.load(path, weights_only=True)["model"]


@pytest.mark.slow
def test_fsdp_run_checkpoints_its_shards_and_resumes(launches):
    """The harness's side of a sharded run (the library's resume on 1 and on 2 ranks is in
    tests/gcond/test_fsdp.py): shards in latest.dcp, and a resumed run ends as if never stopped."""
    root, started = launches
    code, output = started["fsdp"].wait()
    assert code == 0, output
    assert "per-loss gradients: sequential" in output
    [full] = run_dirs(started["fsdp"])
    assert checkpoint(full)["sharded"] is True
    assert "model" not in checkpoint(full)  # in latest.dcp, sharded
    started["fsdp_crash"].wait()
    [crashed] = run_dirs(started["fsdp_crash"])
    assert checkpoint(crashed)["step"] == 2
    resumed = Launch(root, "fsdp_resume", "--resume", str(crashed))
    code, output = resumed.wait()
    assert code == 0, output
    assert f"resuming {crashed} at step 2" in output
    final, reference = sharded_model(crashed), sharded_model(full)
    assert final.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(final[key], value), key


# ------------------------------------------------------------------------------ in this process


def test_each_rank_draws_its_own_deterministic_shard():
    cfg = load_recipe(TINY).data
    train_set, _ = build_datasets(cfg, seed=0)

    def provider(rank: int) -> DeviceDataProvider:
        return DeviceDataProvider(train_set, cfg, "cpu", seed=0, rank=rank, world_size=2)

    p0, p1, again = provider(0), provider(1), provider(0)
    for _ in range(3):
        (x0, _), (x1, _), (y0, _) = p0(), p1(), again()
        assert not torch.equal(x0[0], x1[0])
        assert torch.equal(x0[0], y0[0])  # a function of (seed, rank, position)
    # Disjoint samples within an epoch, like DistributedSampler; one position for all ranks.
    shard0, shard1 = set(p0._shard_of_epoch(0).tolist()), set(p1._shard_of_epoch(0).tolist())
    assert not shard0 & shard1 and len(shard0) == len(shard1) == len(train_set) // 2
    assert p0.state_dict() == p1.state_dict()


def test_outside_torchrun_the_helpers_are_no_ops(monkeypatch, capsys):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    ctx = distributed.context()
    assert (ctx.rank, ctx.world_size, ctx.active) == (0, 1, False)
    model = torch.nn.Linear(2, 2)
    assert distributed.wrap(model, ctx) is model
    assert distributed.from_rank0(lambda: "value", ctx) == "value"
    assert distributed.any_rank(True, ctx, torch.device("cpu")) is True
    distributed.report_error(ctx, "rank 0 reports through its logger")
    distributed.abort(ctx)  # returns: nothing to abort
    assert capsys.readouterr().err == ""


def test_ddp_sync_none_is_refused_with_several_processes(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    recipe = load_recipe(TINY, ["conductor.ddp_sync=none"])
    with pytest.raises(UsageError, match=r"conductor\.ddp_sync: 'none'"):
        Trainer(recipe, tmp_path / "run")
