"""A user's plugin, as the tests use it: two regression tasks on a shared linear trunk, data
generated from the seed. The `fail_*` arguments make a component break its contract on purpose,
so the tests can check the harness names it."""

from __future__ import annotations

import os

import torch
from torch import nn

# The tests read this to see whether the module was ever imported (it must not be, unless
# trusted).
IMPORTED_MARK = os.environ.get("GCOND_TEST_IMPORTED_MARK")
if IMPORTED_MARK:
    with open(IMPORTED_MARK, "a") as mark:
        mark.write(__name__ + "\n")


class TwoHeads(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.trunk = nn.Linear(4, width)
        self.heads = nn.ModuleList([nn.Linear(width, 1), nn.Linear(width, 1)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.tanh(self.trunk(x))
        return torch.cat([head(z) for head in self.heads], dim=1)


def build_model(width: int = 8, fail: bool = False) -> nn.Module:
    if fail:
        return {"not": "a module"}  # type: ignore[return-value]
    return TwoHeads(width)


class Data:
    """Counter-based: micro-batch i is a function of (seed, i), so its state is one integer."""

    def __init__(self, seed: int, device: torch.device, batch: int, stateful: bool, fail: str):
        self.seed, self.device, self.batch, self.fail = seed, device, batch, fail
        self.served = 0
        if not stateful:
            self.state_dict = None  # type: ignore[assignment]

    def _batch(self, key: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + key)
        x = torch.randn(self.batch, 4, generator=generator)
        y = torch.stack([x[:, 0] + x[:, 1], 10 * (x[:, 2] - x[:, 3])], dim=1)
        return x.to(self.device), y.to(self.device)

    def provide(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.served += 1
        if self.fail == "provider" and self.served > 6:
            return self._batch(self.served)[0]  # type: ignore[return-value]
        return self._batch(self.served)

    def train(self):
        return self.provide

    def val(self):
        return [self._batch(-1 - i) for i in range(2)]

    def state_dict(self) -> dict[str, int]:
        return {"served": self.served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.served = int(state["served"])


def make_data(
    seed: int, device: torch.device, batch: int = 8, stateful: bool = True, fail: str = "none"
) -> Data:
    return Data(seed, device, batch, stateful, fail)


_calls = {"count": 0}


def task_loss(output: torch.Tensor, target: torch.Tensor, task: int = 0, fail_after: int = 0):
    _calls["count"] += 1
    error = (output[:, task] - target[:, task]).square()
    if fail_after and _calls["count"] > fail_after:
        return error  # one value per sample: not a scalar
    return error.mean()


def evaluate(model: nn.Module, batches, fail: bool = False) -> dict[str, float]:
    errors = [(model(x) - y).abs().mean(0) for x, y in batches]
    mean = torch.stack(errors).mean(0)
    if fail:
        return {"mae_a": "low"}  # type: ignore[dict-item]
    return {"mae_a": float(mean[0]), "mae_b": float(mean[1]), "score": float(-mean.sum())}


NOT_CALLABLE = 3
