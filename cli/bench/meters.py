"""The meters of ``gcond bench``: named marks within a step (`Clock`), peak memory
(`MemoryMeter`, exact live tensor bytes on the CPU with `LiveTensorBytes`), and resolution timed
on made-up conflicting gradients (`conflict_timing`).
"""

from __future__ import annotations

import functools
import gc
import statistics
import time
import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

CONFLICT_COSINE = -0.7  # of the made-up gradients resolution is also timed on


class Clock:
    """Named marks within one step: CUDA events (GPU timeline, no sync) or perf_counter."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: dict[str, Any] = {}

    def mark(self, name: str) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks[name] = event
        else:
            self.marks[name] = time.perf_counter()

    def seconds(self, start: str, end: str) -> float:
        """Seconds between two marks; call after the device was synchronised."""
        a, b = self.marks[start], self.marks[end]
        return a.elapsed_time(b) / 1000 if self.cuda else b - a


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of tensor storage alive on ``device`` among the storages created while active, and
    their peak: exact where no allocator statistics exist (the CPU). Every operator's outputs pass
    through here (forward, autograd's backward, optimizer); a storage counts once however many
    views share it, and stops counting when it is freed."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.current = self.peak = 0
        self._live: dict[int, tuple[weakref.ref, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # An output sharing an input's storage (a view, an in-place or out= op) is no new
        # allocation: counted only if that storage already is (one made before entering is not).
        inputs = {id(s) for s in map(_storage, tree_leaves((args, kwargs))) if s is not None}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device == self.device:
                self._track(t, inputs)
        return out

    def _track(self, t: torch.Tensor, inputs: set[int]) -> None:
        storage = _storage(t)
        if storage is None:
            return
        key, size = id(storage), storage.nbytes()
        entry = self._live.get(key)
        if entry is None or entry[0]() is not storage:  # not counted yet
            if key in inputs:
                return
            self._live[key] = (weakref.ref(storage, functools.partial(self._freed, key)), size)
            self.current += size
        elif entry[1] != size:  # resized in place
            self._live[key] = (entry[0], size)
            self.current += size - entry[1]
        self.peak = max(self.peak, self.current)

    def _freed(self, key: int, ref: weakref.ref) -> None:
        entry = self._live.get(key)
        if entry is not None and entry[0] is ref:
            del self._live[key]
            self.current -= entry[1]


def _storage(t: Any) -> torch.UntypedStorage | None:
    if not isinstance(t, torch.Tensor):
        return None
    t = getattr(t, "_local_tensor", t)  # a DTensor (FSDP): its shard on this rank
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse and other storage-less layouts
        return None


class MemoryMeter:
    """Peak memory from the model's construction through the warm-up steps (CPU) or through every
    step (CUDA), above the level at ``start()``.

    CUDA: ``max_memory_allocated``. CPU: :class:`LiveTensorBytes` (exact tensor bytes; it costs
    Python time on every operator, so it watches only the untimed warm-up steps)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = (
            "cuda max_memory_allocated"
            if device.type == "cuda"
            else "peak bytes of live tensor storage (exact), over model build and warm-up"
        )
        self._tracker: LiveTensorBytes | None = None
        self._watching = False
        self._base = 0

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._tracker = LiveTensorBytes(self.device)
            self._tracker.__enter__()
            self._watching = True

    def end_warmup(self) -> None:
        """CPU: stop watching, so the timed steps run without the tracker's overhead (also
        called on the way out of an error)."""
        if self._watching and self._tracker is not None:
            self._watching = False
            self._tracker.__exit__(None, None, None)

    def stop(self) -> int | None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self._base
        if self._tracker is None:
            return None
        self.end_warmup()
        peak, self._tracker = self._tracker.peak, None
        return peak


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def conflict_timing(method: Any, device: torch.device, repeats: int) -> dict[str, float]:
    """Median seconds of the Gram read + resolution + write-back on gradients that conflict: row
    0 random, every other row at cosine ≈ CONFLICT_COSINE with it (and +0.5 with each other),
    written into the conductor's accumulators."""
    k, p = method.accumulator.stack.shape  # P/world under FSDP
    generator = torch.Generator(device=device).manual_seed(0)
    base = torch.randn(k, p, device=device, generator=generator)
    grads = base.clone()
    a = -CONFLICT_COSINE  # g_k = -a·b_0 + sqrt(1 - a²)·b_k: cos(g_0, g_k) = -a
    grads[1:] = -a * base[0] + (1 - a * a) ** 0.5 * base[1:]
    del base
    times, stats = [], {}
    for _ in range(repeats + 1):  # the first one warms up
        method.accumulator.stack.copy_(grads)
        sync(device)
        start = time.perf_counter()
        stats = method.finish(method.accumulator.summarize())
        sync(device)
        times.append(time.perf_counter() - start)
    return {
        "seconds": statistics.median(times[1:]),
        "proj_iters": stats.get("proj_iters", 0.0),
        "min_cosine_sim": stats.get("min_cosine_sim", float("nan")),
    }
