"""``gcond`` as torchrun launches it, with a fault injected on one rank (for the tests).

``GCOND_TEST_FAULT=raise:RANK:STEP`` makes that rank raise while computing optimizer step STEP;
``GCOND_TEST_FAULT=sigterm:RANK:STEP`` sends SIGTERM to that rank alone as step STEP starts.
Usage: ``torchrun --nproc-per-node 2 tests/cli/_faulty_train.py train RECIPE ...``.
"""

from __future__ import annotations

import os
import signal

from gcond_cli.app import main
from gcond_cli.run import loop as train


def inject(kind: str, rank: int, step: int) -> None:
    if int(os.environ.get("RANK", 0)) != rank:
        return
    original = train.Trainer.train_step

    def train_step(self: train.Trainer) -> dict[str, float]:
        if self.step + 1 == step:
            if kind == "raise":
                raise RuntimeError(f"injected failure on rank {rank} at step {step}")
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self)

    train.Trainer.train_step = train_step


if __name__ == "__main__":
    fault = os.environ.get("GCOND_TEST_FAULT")
    if fault:
        kind, rank, step = fault.split(":")
        inject(kind, int(rank), int(step))
    main()
