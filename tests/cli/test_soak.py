"""Long runs: memory stays flat over many steps (issue 5).

The whole loop runs in this process (`Trainer.run`, with evaluation, checkpoints, metrics.jsonl,
TensorBoard and the console), and the process's resident memory (RSS) is sampled after every
step; on CUDA, `torch.cuda.memory_allocated` as well. Statistics, history, logging or TensorBoard
that kept something per step would show up as growth after warm-up.

CI runs a short version (`SHORT_STEPS`).
`GCOND_SOAK_STEPS=2000 pytest -m slow tests/cli/test_soak.py -s` runs the long one and prints
the figures.
"""

from __future__ import annotations

import os
from array import array
from pathlib import Path

import pytest
import torch

from gcond_cli.recipe import load_recipe
from gcond_cli.run.loop import Trainer
from tests.helpers import TINY

pytestmark = pytest.mark.slow  # integration: host memory over a run

SHORT_STEPS = 300
WARM_UP = 150  # allocator pools, first eval, first checkpoint, TensorBoard's writer thread
LONG_STEPS = int(os.environ.get("GCOND_SOAK_STEPS", "0"))
MB = 2**20

needs_proc = pytest.mark.skipif(
    not Path("/proc/self/statm").exists(), reason="reads RSS from /proc (Linux)"
)


def rss() -> int:
    """Resident set size of this process, in bytes (current, not peak)."""
    resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def soak(tmp_path: Path, steps: int, device: str = "cpu") -> dict[str, array]:
    """Train the tiny recipe for `steps` steps; memory after every step."""
    recipe = load_recipe(
        TINY,
        [
            f"device={device}",
            f"log.runs_dir={tmp_path}",
            f"schedule.max_steps={steps}",
            "eval.every=50",
            "checkpoint.every=100",
            "log.every=1",
            "log.tensorboard=true",
            "conductor.momentum_beta=0.9",
        ],
    )
    trainer = Trainer(recipe, tmp_path / "soak")
    samples = {"rss": array("q"), "cuda": array("q")}  # preallocated growth: 8 bytes a step
    original = trainer.train_step

    def train_step() -> dict[str, float]:
        stats = original()
        samples["rss"].append(rss())
        if device == "cuda":
            samples["cuda"].append(torch.cuda.memory_allocated())
        return stats

    trainer.train_step = train_step  # type: ignore[method-assign]
    trainer.logger.start(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny steps: one thread is faster, and steady on a busy machine
    try:
        assert trainer.run() == 0
    finally:
        torch.set_num_threads(threads)
        trainer.logger.close(trainer.summary())
    assert len(samples["rss"]) == steps
    return samples


def report(name: str, values: array, warm_up: int) -> str:
    return (
        f"{name}: start {values[0] / MB:.1f} MB, after warm-up (step {warm_up}) "
        f"{values[warm_up - 1] / MB:.1f} MB, end (step {len(values)}) {values[-1] / MB:.1f} MB, "
        f"max after warm-up {max(values[warm_up - 1 :]) / MB:.1f} MB"
    )


def growth(values: array, warm_up: int) -> float:
    """Largest rise above the post-warm-up level, in MB."""
    return (max(values[warm_up - 1 :]) - values[warm_up - 1]) / MB


@needs_proc
def test_host_memory_stays_flat(tmp_path):
    samples = soak(tmp_path, SHORT_STEPS)
    print(report("RSS", samples["rss"], WARM_UP))
    assert growth(samples["rss"], WARM_UP) < 3, report("RSS", samples["rss"], WARM_UP)


@pytest.mark.slow
@needs_proc
@pytest.mark.skipif(not LONG_STEPS, reason="set GCOND_SOAK_STEPS (e.g. 2000) to run it")
def test_host_memory_stays_flat_over_a_long_run(tmp_path):
    samples = soak(tmp_path, LONG_STEPS)
    warm_up = 200
    print(report("RSS", samples["rss"], warm_up))
    assert growth(samples["rss"], warm_up) < 4, report("RSS", samples["rss"], warm_up)


@pytest.mark.cuda
def test_cuda_memory_stays_flat(tmp_path):
    steps = LONG_STEPS or SHORT_STEPS
    samples = soak(tmp_path, steps, device="cuda")
    allocated = samples["cuda"]
    print(report("CUDA allocated", allocated, WARM_UP))
    if Path("/proc/self/statm").exists():
        print(report("RSS", samples["rss"], WARM_UP))
    # Every step allocates and frees the same tensors: the level after a step never moves.
    assert max(allocated[WARM_UP - 1 :]) - min(allocated[WARM_UP - 1 :]) < MB, report(
        "CUDA allocated", allocated, WARM_UP
    )
