"""Run a function on a group of local processes, one per rank, and fail (not hang) on a timeout.

The ranks are forked from a fork server that has imported torch and the worker module once: a
fresh interpreter per rank would import torch again, seconds each on a small machine. The server
itself has run no torch op, so forking it is safe.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import torch.multiprocessing as mp


def run_ranks(
    fn: Callable[..., None], args: tuple[Any, ...], world: int, *, timeout_s: float, what: str
) -> None:
    """``fn(rank, *args)`` on ``world`` processes; ``what`` names them in a timeout's message."""
    mp.set_forkserver_preload(["torch", fn.__module__])
    context = mp.start_processes(fn, args=args, nprocs=world, join=False, start_method="forkserver")
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{what} did not finish within {timeout_s} s (a hang)")
