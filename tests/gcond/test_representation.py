"""Per-step cost that does not grow with K: ``gradients_at="representation"`` and
``resolve_every`` (docs/algorithm.md, "Gradients at the representation", "Resolving every R
steps")."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from gcond import GradientConductor

K, N = 3, 3


class Counted(torch.autograd.Function):
    """The identity, counting the backwards that pass through it."""

    calls = 0

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        Counted.calls += 1
        return grad


class Heads(nn.Module):
    """One linear head per loss; column k of the output is loss k's."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.each = nn.ModuleList(nn.Linear(dim, 1) for _ in range(K))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.cat([head(z) for head in self.each], dim=1)


class SharedTrunk(nn.Module):
    """``model(x) == heads(trunk(x))``; the trunk ends in a backward counter."""

    def __init__(self, trunk: nn.Module, dim: int = 4) -> None:
        super().__init__()
        self.body, self.head = trunk, Heads(dim)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        return Counted.apply(self.body(x))

    def heads(self, z: torch.Tensor) -> torch.Tensor:
        return self.head(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads(self.trunk(x))


def column_fit(k: int) -> Any:
    return lambda out, y: ((out[:, k] - y[:, k]) ** 2).mean()


def loss_fns(poison_step: int | None = None, clock: list[int] | None = None) -> dict[str, Any]:
    def fit(k: int) -> Any:
        def loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            value = ((out[:, k] - y[:, k]) ** 2).mean()
            poisoned = k == 0 and clock is not None and clock[0] == poison_step
            return value * math.nan if poisoned else value

        return loss

    fns = {f"task{k}": fit(k) for k in range(K)}
    # A loss that pulls every output towards minus the first target: conflicts at the trunk.
    fns["task2"] = lambda out, y: ((out + y[:, :1]) ** 2).mean()
    return fns


LAMBDAS = {"task0": 1.0, "task1": 0.7, "task2": 0.4}


def provider(step: int) -> Any:
    g = torch.Generator().manual_seed(step)
    return lambda: (torch.randn(5, 4, generator=g), 2.0 * torch.randn(5, K, generator=g))


def build(trunk: nn.Module, gradients_at: str, **options: Any) -> tuple[nn.Module, Any, Any]:
    torch.manual_seed(0)
    model = SharedTrunk(trunk)
    split = (model.trunk, model.heads) if gradients_at == "representation" else None
    fns = options.pop("fns", loss_fns())
    conductor = GradientConductor(
        model, fns, LAMBDAS, N, gradients_at=gradients_at, split=split, **options
    )
    return model, conductor, torch.optim.SGD(model.parameters(), lr=0.05)


def train(model: nn.Module, conductor: Any, opt: Any, steps: range) -> list[dict[str, float]]:
    history = []
    for step in steps:
        opt.zero_grad(set_to_none=True)
        history.append(conductor.step(provider(step)))
        opt.step()
    return history


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 4), nn.Tanh())


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


# ---------------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("backward", ["batched", "sequential"])
def test_identity_trunk_with_one_head_per_loss_equals_full_mode_exactly(backward):
    """The per-loss parameter gradients are on disjoint heads (no conflict: full mode sums them),
    and the heads get their own exact gradients in representation mode: the same sum."""
    fns = {f"task{k}": column_fit(k) for k in range(K)}
    options = {"momentum_beta": 0.5, "per_loss_backward": backward, "fns": fns}
    full = build(nn.Identity(), "parameters", **dict(options))
    rep = build(nn.Identity(), "representation", **dict(options))
    train(*full, range(4))
    train(*rep, range(4))
    assert torch.equal(flat(full[0]), flat(rep[0]))


def test_representation_mode_merges_representation_gradients_into_the_trunk():
    """One micro-batch, one conflicting pair: the trunk's gradient is the backward of the merged
    representation gradient, the heads' the sum of their exact gradients."""
    model, conductor, _ = build(mlp(), "representation", fns=loss_fns())
    x, y = provider(0)()
    conductor = GradientConductor(
        model,
        loss_fns(),
        LAMBDAS,
        1,
        gradients_at="representation",
        split=(model.trunk, model.heads),
    )
    stats = conductor.step(lambda: (x, y))
    z = model.body(x)
    cut = z.detach().requires_grad_(True)
    out = model.heads(cut)
    losses = [LAMBDAS[n] * fn(out, y) for n, fn in loss_fns().items()]
    reps = torch.stack([torch.autograd.grad(v, cut, retain_graph=True)[0] for v in losses])
    flat_reps = reps.reshape(K, -1).double()
    gram = flat_reps @ flat_reps.T
    weights = conductor.resolver.decide(gram).weights  # the state did not change decisions
    merged = torch.tensordot(weights.float(), reps, dims=1)
    trunk = torch.autograd.grad(z, list(model.body.parameters()), merged)
    heads = torch.autograd.grad(sum(losses), list(model.head.parameters()))
    for p, g in zip(
        [*model.body.parameters(), *model.head.parameters()], [*trunk, *heads], strict=True
    ):
        torch.testing.assert_close(p.grad, g, rtol=1e-6, atol=1e-7)
    assert stats["proj_iters"] > 0  # the losses did conflict at the representation
    assert stats["raw_norm/task0"] == pytest.approx(math.sqrt(gram[0, 0]))


# ---------------------------------------------------------------------------------- resolve_every


def test_resolve_every_one_is_the_default_and_adds_no_statistic():
    a, b = build(mlp(), "parameters"), build(mlp(), "parameters", resolve_every=1)
    stats_a, stats_b = train(*a, range(3)), train(*b, range(3))
    assert torch.equal(flat(a[0]), flat(b[0]))
    assert stats_a == stats_b and "full_step" not in stats_a[0]


@pytest.mark.parametrize("every", [3, 4])
def test_resolve_every_r_takes_one_backward_per_micro_batch_between_full_steps(every):
    model, conductor, opt = build(
        mlp(), "parameters", per_loss_backward="sequential", resolve_every=every
    )
    counts, history = [], []
    for step in range(2 * every):
        Counted.calls = 0
        history += train(model, conductor, opt, range(step, step + 1))
        counts.append(Counted.calls)
    cycle = [K * N] + [N] * (every - 1)  # K backwards per micro-batch, then one
    assert counts == cycle * 2
    assert [s["full_step"] for s in history] == [float(c == K * N) for c in cycle * 2]
    between = history[1]
    assert math.isnan(between["min_cosine_sim"]) and math.isnan(between["raw_norm/task0"])
    assert math.isnan(between["conflicts/main"]) and math.isfinite(between["loss/task0"])
    assert math.isfinite(between["final_grad_norm"])


def test_a_step_between_full_ones_applies_the_last_full_steps_weights():
    model, conductor, opt = build(mlp(), "parameters", resolve_every=2)
    train(model, conductor, opt, range(1))
    weights = conductor.last_weights.clone()
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad(set_to_none=True)
    conductor.step(provider(1))
    # The reference: Σ_k w_k λ_k L_k / N, one backward per micro-batch.
    reference = [torch.zeros_like(p) for p in before]
    fns, data = loss_fns(), provider(1)
    for _ in range(N):
        x, y = data()
        out = model(x)
        total = sum(
            float(w) * LAMBDAS[n] / N * fn(out, y)
            for w, (n, fn) in zip(weights, fns.items(), strict=True)
        )
        for r, g in zip(
            reference, torch.autograd.grad(total, list(model.parameters())), strict=True
        ):
            r += g
    for p, r in zip(model.parameters(), reference, strict=True):
        torch.testing.assert_close(p.grad, r, rtol=1e-5, atol=1e-7)


def test_representation_mode_takes_one_trunk_backward_per_micro_batch():
    model, conductor, opt = build(mlp(), "representation", resolve_every=2)
    counts = []
    for step in range(4):
        Counted.calls = 0
        train(model, conductor, opt, range(step, step + 1))
        counts.append(Counted.calls)
    assert counts == [N] * 4


# ---------------------------------------------------------------------------------- state


@pytest.mark.parametrize(
    ("gradients_at", "options"),
    [
        ("parameters", {"resolve_every": 3, "momentum_beta": 0.5}),
        ("representation", {"momentum_beta": 0.5}),
        ("representation", {"resolve_every": 2, "use_lion": True, "momentum_beta": 0.9}),
        ("representation", {"trust_ratio_coef": 0.1, "norm_cap": 0.5, "dominance_window": 1}),
    ],
)
def test_state_dict_round_trip_continues_bit_for_bit(gradients_at, options):
    model, conductor, opt = build(mlp(), gradients_at, **options)
    train(model, conductor, opt, range(4))
    saved = {
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "opt": opt.state_dict(),
        "conductor": conductor.state_dict(),
    }
    saved = _through_bytes(saved)
    continued = train(model, conductor, opt, range(4, 8))
    fresh, fresh_conductor, fresh_opt = build(mlp(), gradients_at, **options)
    fresh.load_state_dict(saved["model"])
    fresh_opt.load_state_dict(saved["opt"])
    fresh_conductor.load_state_dict(saved["conductor"])
    restored = train(fresh, fresh_conductor, fresh_opt, range(4, 8))
    assert torch.equal(flat(model), flat(fresh))
    assert _same(continued, restored)


def _through_bytes(state: dict[str, Any]) -> dict[str, Any]:
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _same(a: list[dict[str, float]], b: list[dict[str, float]]) -> bool:
    return all(
        x.keys() == y.keys()
        and all((math.isnan(x[k]) and math.isnan(y[k])) or x[k] == y[k] for k in x)
        for x, y in zip(a, b, strict=True)
    )


def test_a_state_of_the_other_mode_is_refused():
    _, conductor, _ = build(mlp(), "parameters")
    _, other, _ = build(mlp(), "representation")
    with pytest.raises(ValueError, match="gradients_at='parameters'"):
        other.load_state_dict(conductor.state_dict())


# ---------------------------------------------------------------------------------- bad numbers


def test_a_non_finite_loss_skips_the_step_in_representation_mode():
    clock = [0]
    model, conductor, opt = build(mlp(), "representation", fns=loss_fns(1, clock))
    params, skipped = [], []
    for step in range(3):
        clock[0] = step
        skipped.append(train(model, conductor, opt, range(step, step + 1))[0]["skipped"])
        params.append(flat(model))
    assert skipped == [0.0, 1.0, 0.0]
    assert torch.equal(params[0], params[1]) and torch.isfinite(params[2]).all()
    assert conductor.state_dict()["step"] == 2


def test_grad_scaler_in_representation_mode_writes_the_scaled_update():
    model, conductor, _ = build(mlp(), "representation")
    scaled_model, scaled, _ = build(
        mlp(), "representation", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**8)
    )
    conductor.step(provider(0))
    scaled.step(provider(0))
    for p, q in zip(model.parameters(), scaled_model.parameters(), strict=True):
        torch.testing.assert_close(q.grad / 2.0**8, p.grad, rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------------------------- errors


def test_representation_mode_without_a_split_says_what_to_pass():
    with pytest.raises(ValueError, match=r"needs split=\(trunk, heads\)"):
        GradientConductor(mlp(), loss_fns(), LAMBDAS, gradients_at="representation")


def test_a_split_in_parameters_mode_is_refused():
    model = SharedTrunk(mlp())
    with pytest.raises(ValueError, match="gradients_at='representation' with it"):
        GradientConductor(model, loss_fns(), LAMBDAS, split=(model.trunk, model.heads))


def test_a_split_that_is_not_two_callables_is_refused():
    with pytest.raises(TypeError, match="pair of callables"):
        GradientConductor(mlp(), loss_fns(), LAMBDAS, gradients_at="representation", split=(1, 2))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"resolve_every": 0}, "resolve_every must be an integer >= 1, got 0"),
        ({"resolve_every": 2.0}, "resolve_every must be an integer, got 2.0"),
        ({"gradients_at": "trunk"}, "gradients_at must be one of 'parameters', 'representation'"),
        (
            {"gradients_at": "representation", "accumulation": "stochastic"},
            "accumulation must be 'full' with gradients_at='representation'",
        ),
    ],
)
def test_bad_values_name_the_field(options, message):
    from gcond import ConductorConfig

    with pytest.raises((TypeError, ValueError), match=message.replace("(", r"\(")):
        ConductorConfig(accumulation_steps=4, **options)
