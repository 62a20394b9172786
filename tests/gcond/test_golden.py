"""Golden values written by the conductor before it was split into accumulate / resolve / update
(commit 883d53d): the same seed must still give the same weights, bit for bit.

* Every bundled recipe (and a few methods and settings on top of one) at a tiny size, 20
  optimizer steps on the recipe's own model, losses, conductor section and optimizer: a SHA-256
  of the final weights and one of every step's statistics.
* ``tests/data/conductor_states.pt``: ``state_dict()`` of conductors of several configurations
  after a few steps, with the model's weights then and after 5 more steps. Today's code must load
  the old states and continue exactly as the old code did.

The data are made here from a seeded generator (not by the harness's data provider), so these
values change only when the library, the models, the losses or the recipes do. Regenerate with
``python -m tests.gcond.test_golden`` only for a change that is *meant* to change the numbers.
"""

from __future__ import annotations

import hashlib
import json
import sys
from typing import Any

import pytest
import torch
from torch import nn

from gcond import GradientConductor
from gcond_cli.components import lookup
from gcond_cli.data import num_masked_patches, pixel_mask
from gcond_cli.methods import build_method, method_unavailable
from gcond_cli.recipe import load_recipe, recipes_dir
from tests.helpers import DATA

STATES = DATA / "conductor_states.pt"
STEPS = 20
TINY = (
    "data.image_size=16",
    "data.micro_batch_size=4",
    "data.mask.patch_size=4",
    "model.patch_size=4",
    "model.dim=32",
    "model.depth=1",
    "model.heads=2",
    "model.decoder_dim=32",
    "model.decoder_depth=1",
    "model.decoder_heads=2",
    "losses.ssim.win_size=7",
    "conductor.accumulation_steps=4",
)
# name -> (recipe file, overrides on top of TINY)
RECIPE_CASES: dict[str, tuple[str, tuple[str, ...]]] = {
    "mae_l1_ssim": ("mae_l1_ssim.yaml", ()),
    "mae_stl10": ("mae_stl10.yaml", ("data.dataset=synthetic",)),
    "multitask_rotation": ("multitask_rotation.yaml", ()),
    "multitask_rotation-stochastic": (
        "multitask_rotation.yaml",
        ("conductor.method=conductor-stochastic",),
    ),
    "multitask_rotation-smooth-lion": (
        "multitask_rotation.yaml",
        (
            "conductor.resolution=smooth",
            "conductor.momentum_beta=0.9",
            "conductor.use_lion=true",
            "conductor.trust_ratio_coef=0.02",
            "conductor.norm_cap=0.5",
            "optimizer.betas=[0.0,0.95]",
        ),
    ),
    "multitask_rotation-sequential": (
        "multitask_rotation.yaml",
        ("conductor.per_loss_backward=sequential", "conductor.momentum_beta=0.9"),
    ),
    "mae_l1_ssim-sum": ("mae_l1_ssim.yaml", ("conductor.method=sum",)),
    "multitask_rotation-pcgrad": ("multitask_rotation.yaml", ("conductor.method=pcgrad",)),
    "multitask_rotation-mgda": ("multitask_rotation.yaml", ("conductor.method=mgda",)),
}
# name -> (SHA-256 of the weights after STEPS steps, SHA-256 of every step's statistics)
EXPECTED: dict[str, tuple[str, str]] = {
    "mae_l1_ssim": (
        "748d428b9de61bbb0fa03886e9250b28baf1e0495771dcde01ec1c8f92a9a469",
        "645d2d26cea37797ba0869da64279c2558848c5d60efdda335328d7a8928935a",
    ),
    "mae_stl10": (
        "f2c9f67a8c7346651d911a5c7c8ed31d749a20f15d14230d8c7ce6e4aaa3be23",
        "79557f5e0776bce374354e130a6ddc9217edabe14610de9626a0f4f406ac352a",
    ),
    "multitask_rotation": (
        "f2cfc65c193d94bcf6775a147437af0718dde749d9f245956ac9858ead30fe85",
        "433d617aa9d49852fe054f3809daaf7777b5fce19a34b593c46489a941e1eefb",
    ),
    "multitask_rotation-stochastic": (
        "96f3e1ac36b7c187a5d4abcb7d18298cd8305389c3cc3fbbb356d61a1bd1f023",
        "4c5e60d456d377a3b38a45ff01494fc8f3e85519190432ad9a6e7c80dd4de123",
    ),
    "multitask_rotation-smooth-lion": (
        "7a1cf2a1ead5f9cefbea8b01de7fe63f43b9f5e673afa91cef0d03805c611af1",
        "91a1fd744e8eab9224ec9a597eb95f6c3a9197b180127427f9b81901be6ed917",
    ),
    "multitask_rotation-sequential": (
        "e25a359307a86841ab497cb52fb84f0333f01cb5c883e22700b1e6b6f640da97",
        "a87e7d5ecf4c9f7e0b9251d5251e691e2f2a486e2b325f1c4b9b67de8e55caa7",
    ),
    "mae_l1_ssim-sum": (
        "0f2cb472bb1c7c9c00d66658461239e8b582471d142880f7149b6ef79de3112a",
        "ca524b25d1cdd22bddc93f1e20075fd4cfed39176290144b6f9ed0fc39a4a6e0",
    ),
    # The TorchJD methods were re-recorded when TorchJD became a resolver (its weighting of the
    # Gram matrix, then the conductor's merge) instead of a side path (the aggregator applied to
    # the K×P stack): the two differ in float32 rounding (relative 1e-6 on random stacks).
    "multitask_rotation-pcgrad": (
        "30d3f86925795493b787737800ade9c96fd0405a28cac83a76dc9abad4f46cce",
        "0229e5d91809ddb96eeb98f166502e82869832f1d95d72da5ab1664065ed3c96",
    ),
    "multitask_rotation-mgda": (
        "da6f14ada5670533c9de51b4b5ea4683bfbf809d4d6bacaf253fc01be786088e",
        "22b6de377bf1cff92d6727e8c13c20b24f68f83c140e9f135705cc65aff43b53",
    ),
}


def _digest(parts: list[bytes]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
    return h.hexdigest()


def weights_digest(model: nn.Module) -> str:
    return _digest(
        [name.encode() + t.detach().contiguous().numpy().tobytes() for name, t in _items(model)]
    )


def _items(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return sorted(model.state_dict().items())


def stats_digest(history: list[dict[str, float]]) -> str:
    return _digest([json.dumps(sorted(s.items())).encode() for s in history])


def _batches(recipe: Any, count: int) -> list[tuple[Any, dict[str, torch.Tensor]]]:
    """``count`` micro-batches in the data provider's format, from a seeded generator."""
    data = recipe.data
    generator = torch.Generator().manual_seed(1234)
    size, batch, patch = data.image_size, data.micro_batch_size, data.mask.patch_size
    grid = size // patch
    masked = num_masked_patches(data.mask.ratio, grid * grid)
    out = []
    for _ in range(count):
        images = torch.rand(batch, 3, size, size, generator=generator)
        order = torch.rand(batch, grid * grid, generator=generator).argsort(dim=1)
        patch_mask = torch.zeros(batch, grid * grid, dtype=torch.bool)
        patch_mask.scatter_(1, order[:, :masked], True)
        patch_mask = patch_mask.view(batch, grid, grid)
        target = {"image": images, "mask": pixel_mask(patch_mask, patch)}
        target["label"] = torch.randint(0, 4, (batch,), generator=generator)
        out.append(((images, patch_mask), target))
    return out


def run_recipe(name: str) -> tuple[str, str]:
    """STEPS optimizer steps of the case ``name``; (weights digest, statistics digest)."""
    file, overrides = RECIPE_CASES[name]
    recipe = load_recipe(recipes_dir() / file, [*TINY, *overrides])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same reduction order on any machine
    try:
        torch.manual_seed(recipe.seed)
        model = lookup("model", recipe.model.name).builder()(recipe.model, recipe)
        loss_fns = {
            n: lookup("loss", c.kind).builder()(n, c, recipe) for n, c in recipe.losses.items()
        }
        lambdas = {n: c.weight for n, c in recipe.losses.items()}
        method = build_method(
            recipe.conductor, model, loss_fns, lambdas, autocast_dtype=None, scaler=None
        )
        opt = recipe.optimizer
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=opt.lr, betas=opt.betas, weight_decay=opt.weight_decay
        )
        pool = _batches(recipe, 6)
        served = iter(range(10**9))
        history = []
        for _ in range(STEPS):
            optimizer.zero_grad(set_to_none=True)
            history.append(method.step(lambda: pool[next(served) % len(pool)]))
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.clip_grad_norm)
            optimizer.step()
        return weights_digest(model), stats_digest(history)
    finally:
        torch.set_num_threads(threads)


def _unavailable(name: str) -> str | None:
    """Why the case's method cannot run here (TorchJD missing), or None."""
    methods = [o.split("=")[1] for o in RECIPE_CASES[name][1] if o.startswith("conductor.method=")]
    return method_unavailable(methods[0]) if methods else None


@pytest.mark.parametrize("name", list(RECIPE_CASES))
def test_bundled_recipes_train_bit_identically_to_the_unsplit_conductor(name):
    reason = _unavailable(name)
    if reason:
        pytest.skip(reason)
    weights, stats = run_recipe(name)
    assert (weights, stats) == EXPECTED[name]


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
    if "--states" in sys.argv:
        _write_states()
    for case in RECIPE_CASES:
        print(f"    {case!r}: {_unavailable(case) or run_recipe(case)!r},")
