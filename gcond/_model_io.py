"""How the conductor talks to a model: calling it, and BatchNorm during accumulation."""

from __future__ import annotations

import contextlib
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
