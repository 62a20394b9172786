"""GradientConductor inside a Hugging Face Accelerate training loop.

Run: ``python examples/integrations/accelerate_conductor.py`` (CPU, a few seconds), or on
several processes: ``accelerate launch --num_processes 2 --cpu
examples/integrations/accelerate_conductor.py``. A shared trunk with two heads, a regression and a
classification whose losses differ in scale, trained on data generated here. Each loader batch is
split into ``accumulation_steps`` micro-batches that the conductor runs one by one on the
prepared model; it writes ``p.grad``, and the prepared optimizer steps (through the GradScaler
under fp16). The pattern and its pitfalls are described in ``docs/integrations.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gcond

FEATURES, CLASSES = 16, 3
LOSS_FNS = {
    "reg": lambda out, target: F.mse_loss(out["reg"], target["reg"]),
    "cls": lambda out, target: F.cross_entropy(out["cls"], target["cls"]),
}
LAMBDAS = {"reg": 0.5, "cls": 1.0}
# Accelerate's mixed_precision -> the dtype the conductor's forwards autocast to.
AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class TwoTaskNet(nn.Module):
    """A shared trunk and two heads: ``reg`` (B,) and ``cls`` (B, CLASSES) logits."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(FEATURES, hidden), nn.Tanh())
        self.reg = nn.Linear(hidden, 1)
        self.cls = nn.Linear(hidden, CLASSES)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(x)
        return {"reg": self.reg(h).squeeze(-1), "cls": self.cls(h)}


def make_dataset(n: int = 2048, seed: int = 0) -> TensorDataset:
    """Inputs (n, FEATURES); a regression target of scale ~3 and a 3-class label."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, FEATURES, generator=g)
    w = torch.randn(FEATURES, generator=g) / FEATURES**0.5
    return TensorDataset(x, 3.0 * torch.sin(2.0 * x @ w), x[:, :CLASSES].argmax(-1))


def micro_batches(batch: list[torch.Tensor], n: int) -> Callable[[], Any]:
    """A data provider for ``conductor.step``: the loader's batch cut into ``n`` equal
    micro-batches, handed out one per call as ``(input, target)``."""
    x, reg, cls = batch
    if len(x) % n:
        raise ValueError(
            f"a batch of {len(x)} does not split into {n} equal micro-batches: make the "
            "loader's batch_size a multiple of accumulation_steps, with drop_last=True"
        )
    pieces = iter(list(zip(x.chunk(n), reg.chunk(n), cls.chunk(n), strict=True)))

    def provider() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        xi, reg_i, cls_i = next(pieces)
        return xi, {"reg": reg_i, "cls": cls_i}

    return provider


def build_conductor(
    accelerator: Accelerator, model: nn.Module, accumulation_steps: int, **options: Any
) -> gcond.GradientConductor:
    """The conductor on the *prepared* model (a DDP wrapper on several processes: the conductor
    makes the one all-reduce per step that ``ddp_sync`` asks for, over its process group)."""
    return gcond.GradientConductor(
        model,
        LOSS_FNS,
        LAMBDAS,
        accumulation_steps,
        # accelerator.autocast() around step() does not reach the conductor's forwards: name it.
        autocast_dtype=AUTOCAST_DTYPES.get(accelerator.mixed_precision)
        if accelerator.native_amp
        else None,
        scaler=accelerator.scaler,  # a GradScaler under fp16 on a GPU, else None
        **options,
    )


def train_step(
    accelerator: Accelerator,
    conductor: gcond.GradientConductor,
    optimizer: Any,
    scheduler: Any,
    batch: list[torch.Tensor],
    clip_grad_norm: float = 1.0,
) -> dict[str, float]:
    """One optimizer step on one loader batch; returns the conductor's statistics."""
    optimizer.zero_grad()
    stats = conductor.step(micro_batches(batch, conductor.config.accumulation_steps))
    accelerator.clip_grad_norm_(conductor.model.parameters(), clip_grad_norm)  # unscales first
    optimizer.step()  # scaler.step + scaler.update under fp16: skips a non-finite step
    scheduler.step()
    return stats


def validation_loss(accelerator: Accelerator, model: nn.Module, seed: int = 1) -> float:
    """Σ λ·loss on held-out data, under the accelerator's autocast."""
    x, reg, cls = (t.to(accelerator.device) for t in make_dataset(n=512, seed=seed).tensors)
    with torch.no_grad(), accelerator.autocast():
        out = model(x)
        target = {"reg": reg, "cls": cls}
        return float(sum(LAMBDAS[k] * fn(out, target).float() for k, fn in LOSS_FNS.items()))


def main(
    steps: int = 60,
    accumulation_steps: int = 4,
    micro_batch: int = 16,
    seed: int = 0,
    accelerator: Accelerator | None = None,
    **conductor_options: Any,
) -> dict[str, Any]:
    """Train for ``steps`` optimizer steps; returns the accelerator, the prepared model, the
    statistics of every step and the validation loss before and after."""
    accelerator = accelerator or Accelerator(
        mixed_precision="fp16" if torch.cuda.is_available() else "no"
    )
    set_seed(seed)
    model = TwoTaskNet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 10))
    loader = DataLoader(
        make_dataset(seed=seed),
        batch_size=accumulation_steps * micro_batch,  # per process: one optimizer step
        shuffle=True,
        drop_last=True,
    )
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    conductor = build_conductor(accelerator, model, accumulation_steps, **conductor_options)
    before = validation_loss(accelerator, model)
    history: list[dict[str, float]] = []
    while len(history) < steps:
        for batch in loader:
            history.append(train_step(accelerator, conductor, optimizer, scheduler, batch))
            if len(history) == steps:
                break
    after = validation_loss(accelerator, model)
    return {
        "accelerator": accelerator,
        "model": model,
        "history": history,
        "before": before,
        "after": after,
    }


if __name__ == "__main__":
    result = main()
    last = result["history"][-1]
    result["accelerator"].print(  # on the main process only
        f"{len(result['history'])} steps: validation loss {result['before']:.3f} -> "
        f"{result['after']:.3f}; last step min cosine {last['min_cosine_sim']:+.3f}, "
        f"final grad norm {last['final_grad_norm']:.3f}"
    )
