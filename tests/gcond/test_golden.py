"""Golden values of the library alone, bit for bit: ``state_dict()`` of conductors of several
configurations, written by the conductor before it was split into accumulate / resolve / update
(commit 883d53d), with the model's weights then and after 5 more steps
(``tests/data/conductor_states.pt``). Today's code must load the old states and continue exactly
as the old code did.

The models here use only the library's math and elementary operators (linear layers, tanh), so
their bits do not depend on which kernels torch picks on the machine; the bundled recipes'
golden runs, whose convolutions, attention and SSIM do, are in
``tests/cli/test_golden_recipes.py``, held to a stated tolerance. Regenerate with
``python -m tests.gcond.test_golden --states`` only for a change that is *meant* to change the
numbers.
"""

from __future__ import annotations

import sys
from typing import Any

import pytest
import torch
from torch import nn

from gcond import GradientConductor
from tests.helpers import DATA

STATES = DATA / "conductor_states.pt"


# ---------------------------------------------------------------------------------------------
# state_dict() checkpoints of the unsplit conductor

STATE_CASES: dict[str, dict[str, Any]] = {
    "full": {},
    "full-momentum": {"momentum_beta": 0.9},
    "stochastic-smooth": {"accumulation": "stochastic", "resolution": "smooth"},
    "lion-trust-ratio": {
        "momentum_beta": 0.8,
        "use_lion": True,
        "trust_ratio_coef": 0.05,
        "norm_cap": 1.0,
        "dominance_window": 2,
    },
}
STEPS_BEFORE, STEPS_AFTER = 6, 5


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def tiny_losses() -> tuple[dict[str, Any], dict[str, float]]:
    """Three losses that pull apart: toward a target, toward its negation (critical conflicts)
    and an L1 toward another."""
    fns = {
        "a": lambda out, y: (out - y).pow(2).mean(),
        "b": lambda out, y: (out + 0.5 * y).pow(2).mean(),
        "c": lambda out, y: (out - y.flip(1)).abs().mean(),
    }
    return fns, {"a": 1.0, "b": 0.5, "c": 0.3}


def tiny_provider(start: int):
    count = iter(range(start, 10**9))

    def provider() -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(next(count))
        return torch.randn(5, 6, generator=g), torch.randn(5, 3, generator=g)

    return provider


def tiny_run(steps: int, model: nn.Module, conductor: Any, start: int) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    provider = tiny_provider(start)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        conductor.step(provider)
        optimizer.step()


def tiny_conductor(model: nn.Module, config: dict[str, Any]) -> GradientConductor:
    fns, lambdas = tiny_losses()
    return GradientConductor(model, fns, lambdas, 4, **config)


@pytest.fixture(scope="module")
def states() -> dict[str, Any]:
    return torch.load(STATES, weights_only=True)


@pytest.mark.parametrize("name", list(STATE_CASES))
def test_a_state_written_by_the_unsplit_conductor_loads_and_continues_exactly(states, name):
    saved = states[name]
    model = tiny_model()
    model.load_state_dict(saved["model"])
    conductor = tiny_conductor(model, STATE_CASES[name])
    conductor.load_state_dict(saved["conductor"])
    tiny_run(STEPS_AFTER, model, conductor, start=1000)
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved["after"][key]), key


def _write_states() -> None:
    out = {}
    for name, config in STATE_CASES.items():
        model = tiny_model()
        conductor = tiny_conductor(model, config)
        tiny_run(STEPS_BEFORE, model, conductor, start=0)
        saved = {
            "model": {k: v.clone() for k, v in model.state_dict().items()},
            "conductor": conductor.state_dict(),
        }
        tiny_run(STEPS_AFTER, model, conductor, start=1000)
        saved["after"] = {k: v.clone() for k, v in model.state_dict().items()}
        out[name] = saved
    STATES.parent.mkdir(exist_ok=True)
    torch.save(out, STATES)


if __name__ == "__main__":
    if "--states" not in sys.argv:
        raise SystemExit("python -m tests.gcond.test_golden --states rewrites the golden states")
    _write_states()
