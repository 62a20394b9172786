"""How the conductor talks to a model: calling it, and BatchNorm during accumulation."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn


def call_model(model: nn.Module, x: Any) -> Any:
    """``model(x)``; ``model(*x)`` for a tuple/list; ``model(**x)`` for a mapping."""
    if isinstance(x, Mapping):
        return model(**x)
    if isinstance(x, (tuple, list)):
        return model(*x)
    return model(x)


def autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    """``torch.autocast`` to ``dtype`` on ``device``'s type; a no-op when ``dtype`` is None, so
    fp32, bf16 and fp16 share one code path."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


@contextlib.contextmanager
def frozen_batchnorm(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Every BatchNorm layer (SyncBatchNorm included) in eval mode inside the block, so its
    running statistics do not move; modes are restored after it. Dropout is left alone."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    modes = [m.training for m in bns]
    if enabled:
        for m in bns:
            m.eval()
    try:
        yield
    finally:
        for m, mode in zip(bns, modes, strict=True):
            m.train(mode)


# What torch.utils.checkpoint says when a reentrant checkpoint's inputs need no gradient: the
# parameters inside it then get none, silently, whatever backward follows.
_REENTRANT_NO_GRAD = "None of the inputs have requires_grad=True"
REENTRANT_MESSAGE = (
    "the model uses torch.utils.checkpoint with use_reentrant=True{where}: {why}. The conductor "
    "takes each loss's gradient with torch.autograd.grad, which reentrant checkpointing does "
    "not support; pass use_reentrant=False to torch.utils.checkpoint.checkpoint (or "
    "checkpoint_sequential), which gives the same memory saving and exact gradients"
)


@contextlib.contextmanager
def reentrant_checkpoint_check(active: bool) -> Iterator[None]:
    """Inside the block (when ``active``: the conductor's first forward), a reentrant
    checkpoint whose inputs need no gradient is refused with :data:`REENTRANT_MESSAGE` instead of
    training its parameters on no gradient. Other warnings are passed on as they came."""
    if not active:
        yield
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        if _REENTRANT_NO_GRAD in str(w.message):
            raise ValueError(
                REENTRANT_MESSAGE.format(
                    where=" on inputs that need no gradient",
                    why="the parameters inside such a checkpoint get no gradient at all",
                )
            )
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)


def is_reentrant_checkpoint_error(exc: BaseException) -> bool:
    """Whether ``exc`` is torch's refusal of ``autograd.grad`` through a reentrant checkpoint."""
    text = str(exc)
    return "use_reentrant=True" in text and "checkpoint" in text and ".grad()" in text
