"""GradientConductor inside a PyTorch Lightning ``LightningModule`` (manual optimization).

Run: ``python examples/integrations/lightning_conductor.py`` (CPU, a few seconds; fp16 with a
GradScaler on a GPU). A shared trunk with two heads, a regression and a classification whose
losses differ in scale, trained on data generated here. Each loader batch is split into
``accumulation_steps`` micro-batches that the conductor runs one by one; it writes ``p.grad``,
and the optimizer steps through Lightning, so the precision plugin's GradScaler unscales and
skips as usual. The pattern and its pitfalls are described in ``docs/integrations.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gcond

FEATURES, CLASSES = 16, 3
LOSS_FNS = {
    "reg": lambda out, target: F.mse_loss(out["reg"], target["reg"]),
    "cls": lambda out, target: F.cross_entropy(out["cls"], target["cls"]),
}
LAMBDAS = {"reg": 0.5, "cls": 1.0}
# Lightning's precision flag -> the dtype the conductor's forwards autocast to.
AUTOCAST_DTYPES = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}


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


class ConductedModule(L.LightningModule):
    """Manual optimization: the conductor replaces ``manual_backward`` and accumulation.

    ``conductor_options`` are :class:`gcond.ConductorConfig` fields (or ``resolver=``).
    """

    def __init__(
        self,
        accumulation_steps: int = 4,
        lr: float = 1e-2,
        clip_grad_norm: float = 1.0,
        **conductor_options: Any,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False  # the conductor writes p.grad; we call opt.step()
        self.net = TwoTaskNet()
        self.accumulation_steps, self.lr, self.clip = accumulation_steps, lr, clip_grad_norm
        self.conductor_options = conductor_options
        self.conductor: gcond.GradientConductor | None = None
        self.history: list[dict[str, float]] = []  # the conductor's statistics, one per step
        self._conductor_state: dict[str, Any] | None = None

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.net(x)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 10))
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def on_fit_start(self) -> None:
        # Built here: the model is on its device, and the precision plugin owns its scaler.
        self.conductor = gcond.GradientConductor(
            self.trainer.strategy.model,  # under DDP the wrapper, whose process group it syncs
            LOSS_FNS,
            LAMBDAS,
            self.accumulation_steps,
            # Lightning's autocast does not reach the conductor's forwards: name the dtype.
            autocast_dtype=AUTOCAST_DTYPES.get(str(self.trainer.precision)),
            # "16-mixed": the plugin's GradScaler; None for fp32 and bf16.
            scaler=getattr(self.trainer.precision_plugin, "scaler", None),
            **self.conductor_options,
        )
        if self._conductor_state is not None:
            self.conductor.load_state_dict(self._conductor_state)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        optimizer = self.optimizers()
        optimizer.zero_grad()
        stats = self.conductor.step(micro_batches(batch, self.accumulation_steps))
        optimizer.step()  # unscales p.grad, calls on_before_optimizer_step, steps or skips
        self.lr_schedulers().step()
        self.history.append(stats)
        self.log_dict({k: stats[k] for k in ("loss/total", "min_cosine_sim", "skipped")})

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Clip here, not in training_step: under "16-mixed" p.grad is unscaled by now.
        self.clip_gradients(optimizer, gradient_clip_val=self.clip, gradient_clip_algorithm="norm")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["gcond"] = self.conductor.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._conductor_state = checkpoint["gcond"]  # loaded in on_fit_start


def make_loader(accumulation_steps: int = 4, micro_batch: int = 16, seed: int = 0) -> DataLoader:
    """Each batch is one optimizer step: ``accumulation_steps`` micro-batches."""
    return DataLoader(
        make_dataset(seed=seed),
        batch_size=accumulation_steps * micro_batch,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )


def validation_loss(module: ConductedModule, seed: int = 1) -> float:
    """Σ λ·loss on held-out data, in fp32."""
    x, reg, cls = make_dataset(n=512, seed=seed).tensors
    with torch.no_grad():
        out = module.net.to("cpu")(x)
        target = {"reg": reg, "cls": cls}
        return float(sum(LAMBDAS[k] * fn(out, target) for k, fn in LOSS_FNS.items()))


def main(max_steps: int = 60, seed: int = 0, **trainer_options: Any) -> ConductedModule:
    """Train for ``max_steps`` optimizer steps; returns the trained module."""
    torch.manual_seed(seed)  # the initial weights; the loader has its own generator
    module = ConductedModule()
    trainer_options.setdefault("precision", "16-mixed" if torch.cuda.is_available() else "32-true")
    trainer = L.Trainer(
        max_steps=max_steps,
        # gradient_clip_val and accumulate_grad_batches stay unset: the conductor accumulates,
        # on_before_optimizer_step clips (Lightning refuses both under manual optimization).
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_options,
    )
    trainer.fit(module, make_loader(module.accumulation_steps, seed=seed))
    return module


if __name__ == "__main__":
    torch.manual_seed(0)
    before = validation_loss(ConductedModule())  # main() starts from these same weights
    trained = main()
    last = trained.history[-1]
    print(
        f"{len(trained.history)} steps: validation loss {before:.3f} -> "
        f"{validation_loss(trained):.3f}; last step min cosine {last['min_cosine_sim']:+.3f}, "
        f"final grad norm {last['final_grad_norm']:.3f}"
    )
