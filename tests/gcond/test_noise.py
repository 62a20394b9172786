"""Signal and noise from the step's micro-batches, and ``conflicts="significant"``
(docs/algorithm.md, "Signal and noise").

A one-layer model ``output = θ · x`` with ``x = 1`` and losses ``L_k = ⟨output, c_k⟩`` has
gradient ``c_k`` on every micro-batch: each micro-batch's per-loss gradients are whatever the
data says, so every estimate can be checked against its hand-computed value.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from gcond import ConductorConfig, GradientConductor
from gcond._noise import MicroBatchNoise

P = 16


class Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(P))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.theta * x


def loss_fns(k: int) -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    def loss(j: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        return lambda out, c: (out * c[j]).sum()

    return {f"l{j}": loss(j) for j in range(k)}


def conductor(k: int, n: int, lambdas: list[float] | None = None, **options: Any):
    lambdas = lambdas or [1.0] * k
    names = list(loss_fns(k))
    return GradientConductor(
        Linear(), loss_fns(k), dict(zip(names, lambdas, strict=True)), n, **options
    )


def feeding(batches: torch.Tensor) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    """A data provider handing out ``batches[n]`` (K×P: the per-loss gradients) in turn."""
    it = itertools.cycle(range(len(batches)))
    return lambda: (torch.ones(P), batches[next(it)].float())


def cross_term_mean(h: torch.Tensor) -> torch.Tensor:
    """The mean of ⟨h_{i,n}, h_{j,m}⟩ over the N(N−1) pairs n ≠ m, by hand."""
    n, k, _ = h.shape
    total = torch.zeros(k, k, dtype=torch.float64)
    for a, b in itertools.product(range(n), repeat=2):
        if a != b:
            total += h[a] @ h[b].T
    return total / (n * (n - 1))


# ------------------------------------------------------------------------ the estimates


@pytest.mark.parametrize("backward", ["batched", "sequential"])
def test_debiased_gram_is_the_cross_term_mean_and_the_noise_the_sample_variance(backward):
    torch.manual_seed(0)
    n, k, lambdas = 5, 3, [1.0, 2.0, 0.5]
    c = torch.randn(n, k, P, dtype=torch.float64)
    cond = conductor(k, n, lambdas, noise_statistics=True, per_loss_backward=backward)
    grads = cond.accumulate(feeding(c))
    h = c * torch.tensor(lambdas, dtype=torch.float64)[None, :, None]  # λ_k c_k per micro-batch
    torch.testing.assert_close(
        grads.noise.debiased(grads.gram), cross_term_mean(h), atol=2e-5, rtol=1e-5
    )
    variance = h.var(dim=0, correction=1).sum(dim=-1)  # tr Σ_k
    torch.testing.assert_close(grads.noise.noise_traces(grads.gram), variance, atol=2e-5, rtol=1e-5)
    signal = cross_term_mean(h).diagonal()
    expected = [
        v / s if s > 0 else math.inf
        for v, s in zip(variance.tolist(), signal.tolist(), strict=True)
    ]
    assert grads.noise.noise_scales(grads.gram) == pytest.approx(expected, rel=1e-4)
    # The per-micro-batch harm of the plain sum, (H_n 1)_k, and its standard error by hand.
    per_batch = torch.stack([h[i] @ h[i].sum(dim=0) for i in range(n)])  # N×K
    errors = per_batch.std(dim=0, correction=1) / math.sqrt(n)
    plain = torch.ones(k, dtype=torch.float64)
    torch.testing.assert_close(grads.noise.harm_errors(plain), errors, atol=1e-5, rtol=1e-5)
    harms = cross_term_mean(h) @ plain
    torch.testing.assert_close(grads.noise.harms(plain, grads.gram), harms, atol=2e-5, rtol=1e-5)


def test_identical_micro_batches_have_no_noise():
    c = torch.randn(1, 2, P).expand(4, 2, P).contiguous()
    cond = conductor(2, 4, noise_statistics=True)
    grads = cond.accumulate(feeding(c))
    scale = float(grads.gram.diagonal().max())
    assert grads.noise.noise_traces(grads.gram).abs().max() <= 1e-6 * scale
    torch.testing.assert_close(
        grads.noise.debiased(grads.gram), grads.gram, atol=1e-6 * scale, rtol=0
    )
    assert grads.noise.harm_errors(torch.ones(2)).abs().max() <= 1e-6 * scale
    assert grads.noise.noise_scales(grads.gram) == pytest.approx([0.0, 0.0], abs=1e-6)


def test_noise_scale_is_the_batch_above_which_the_mean_is_mostly_signal():
    """Pure signal plus noise of known size: tr Σ / ‖μ‖² in micro-batches."""
    gen = torch.Generator().manual_seed(1)
    mu = torch.zeros(2, P)
    mu[:, 0] = 1.0
    noise = 0.5 * torch.randn(400, 2, P, generator=gen)  # tr Σ = 0.25 · P = 4
    cond = conductor(2, 400, noise_statistics=True)
    stats = cond.step(feeding(mu + noise))
    for name in ("l0", "l1"):
        assert stats[f"noise_scale/{name}"] == pytest.approx(4.0, rel=0.15)
        assert stats[f"noise_share/{name}"] == pytest.approx(4.0 / (4.0 + 400), rel=0.2)
    assert stats["signal_cos/l0_vs_l1"] == pytest.approx(1.0, abs=0.1)


def test_the_statistics_are_nan_where_a_step_is_skipped():
    poisoned = {"now": False}
    fns = loss_fns(2)
    fns["l0"] = lambda out, c: (out * c[0]).sum() * (math.nan if poisoned["now"] else 1.0)
    cond = GradientConductor(Linear(), fns, {"l0": 1.0, "l1": 1.0}, 3, conflicts="significant")
    c = OPPOSED[0][None] + 0.1 * torch.randn(3, 2, P)
    first = cond.step(feeding(c))
    poisoned["now"] = True
    second = cond.step(feeding(c))
    keys = [k for k in first if k.startswith(("harm_z/", "noise_scale/", "signal_cos/"))]
    assert len(keys) == 5 and all(math.isfinite(first[k]) for k in keys)
    assert second["skipped"] == 1.0 and all(math.isnan(second[k]) for k in keys)


# ------------------------------------------------------------------------ significant conflicts


def resolved_share(
    conflicts: str, mean: torch.Tensor, spread: torch.Tensor | float, steps: int = 100, **options
) -> float:
    """Share of steps that projected, on fresh micro-batches ``mean + spread · noise``."""
    gen = torch.Generator().manual_seed(0)
    cond = conductor(2, 8, conflicts=conflicts, **options)

    def data() -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ones(P), mean + spread * torch.randn(2, P, generator=gen)

    return sum(cond.step(data)["proj_iters"] > 0 for _ in range(steps)) / steps


PURE_NOISE = (torch.zeros(2, P), torch.tensor([[1.0], [30.0]]))  # zero mean, 30× apart
OPPOSED = (
    torch.zeros(2, P).index_put_(
        (torch.tensor([0, 1]), torch.tensor([0, 0])), torch.tensor([1.0, -2.0])
    ),
    0.25,
)


def test_pure_noise_is_almost_never_resolved_under_significant():
    """Two zero-mean losses 30× apart: the larger one's noise makes the plain sum look harmful to
    the smaller on most steps; only ``significant`` sees that it is noise."""
    assert resolved_share("all", *PURE_NOISE) > 0.4
    assert resolved_share("harmful", *PURE_NOISE) > 0.3
    assert resolved_share("significant", *PURE_NOISE) <= 0.02


def test_a_real_opposition_under_noise_is_resolved_on_most_steps():
    """μ_1 = e, μ_2 = −2e: the plain sum raises loss 1 on every step, seen through noise."""
    assert resolved_share("significant", *OPPOSED) >= 0.9
    assert resolved_share("significant", *OPPOSED, resolution="smooth") >= 0.9


def test_a_higher_significance_resolves_less():
    shares = [
        resolved_share("significant", OPPOSED[0], 0.35, significance=z) for z in (1.0, 2.0, 3.0)
    ]
    assert shares[0] > shares[1] > shares[2]


def test_the_standard_error_is_what_keeps_noise_unresolved(monkeypatch):
    """Without the standard error the test is the debiased harm's sign: noise resolves often."""
    monkeypatch.setattr(MicroBatchNoise, "harm_errors", lambda self, w: torch.zeros(len(w)))
    assert resolved_share("significant", *PURE_NOISE) > 0.3


def test_significant_counts_the_conflicts_it_left_to_noise():
    cond = conductor(2, 8, conflicts="significant")
    gen = torch.Generator().manual_seed(3)
    left = [
        cond.step(lambda: (torch.ones(P), PURE_NOISE[1] * torch.randn(2, P, generator=gen)))
        for _ in range(40)
    ]
    noise = [s["conflicts/noise"] for s in left]
    below_weak = [s["min_cosine_sim"] < 0 for s in left]
    assert noise == [float(b) for b in below_weak]  # every conflict was left to noise
    assert sum(noise) > 10


def test_resolve_every_measures_and_decides_on_full_steps_only():
    cond = conductor(2, 4, conflicts="significant", resolve_every=2)
    c = OPPOSED[0][None] + 0.1 * torch.randn(4, 2, P)
    stats = [cond.step(feeding(c)) for _ in range(4)]
    assert [s["full_step"] for s in stats] == [1.0, 0.0, 1.0, 0.0]
    assert [math.isnan(s["harm_z/l0"]) for s in stats] == [False, True, False, True]
    assert stats[0]["proj_iters"] > 0 and stats[2]["proj_iters"] > 0


def test_at_the_representation_a_step_is_resolved_after_a_significant_one():
    """One micro-batch has no spread to judge by: the previous full step's significance opens
    resolution, so the first step merges plainly and the next resolves."""

    def split(model: Linear):
        return (lambda x: model.theta * x, lambda z: z)

    def run(mean: torch.Tensor, spread: Any) -> list[float]:
        model = Linear()
        cond = GradientConductor(
            model,
            loss_fns(2),
            {"l0": 1.0, "l1": 1.0},
            4,
            conflicts="significant",
            gradients_at="representation",
            split=split(model),
        )
        gen = torch.Generator().manual_seed(0)
        data = lambda: (torch.ones(P), mean + spread * torch.randn(2, P, generator=gen))  # noqa: E731
        return [cond.step(data)["proj_iters"] for _ in range(6)]

    opposed = run(OPPOSED[0], 0.1)
    assert opposed[0] == 0 and all(p > 0 for p in opposed[1:])
    assert run(*PURE_NOISE) == [0.0] * 6


def test_the_state_round_trip_continues_bit_for_bit():
    torch.manual_seed(0)
    c = OPPOSED[0][None] + 0.3 * torch.randn(6, 4, 2, P)

    def steps(cond, model, opt, range_):
        for i in range_:
            opt.zero_grad()
            cond.step(feeding(c[i]))
            opt.step()
        return model.theta.detach().clone()

    def fresh():
        model = Linear()
        cond = GradientConductor(
            model,
            loss_fns(2),
            {"l0": 1.0, "l1": 1.0},
            4,
            conflicts="significant",
            momentum_beta=0.5,
        )
        return cond, model, torch.optim.SGD(model.parameters(), lr=0.1)

    cond, model, opt = fresh()
    steps(cond, model, opt, range(3))
    saved = copy.deepcopy((cond.state_dict(), model.state_dict(), opt.state_dict()))
    straight = steps(cond, model, opt, range(3, 6))
    cond2, model2, opt2 = fresh()
    cond2.load_state_dict(saved[0])
    model2.load_state_dict(saved[1])
    opt2.load_state_dict(saved[2])
    assert torch.equal(steps(cond2, model2, opt2, range(3, 6)), straight)


# ------------------------------------------------------------------------ configuration


@pytest.mark.parametrize("options", [{"conflicts": "significant"}, {"noise_statistics": True}])
def test_one_micro_batch_is_refused_with_what_to_set(options):
    with pytest.raises(
        ValueError, match=r"accumulation_steps must be at least 2 with .* set accumulation_steps"
    ):
        ConductorConfig(accumulation_steps=1, **options)


def test_stochastic_accumulation_is_refused():
    with pytest.raises(
        ValueError, match="accumulation must be 'full' with conflicts='significant'"
    ):
        ConductorConfig(accumulation_steps=4, accumulation="stochastic", conflicts="significant")


def test_significance_is_a_non_negative_number():
    with pytest.raises(ValueError, match="significance must be a number in"):
        ConductorConfig(accumulation_steps=4, conflicts="significant", significance=-1)
    assert ConductorConfig(accumulation_steps=4, conflicts="significant").significance == 2.0


def test_without_noise_statistics_no_key_and_no_micro_batch_gram_is_kept():
    cond = conductor(2, 4)
    stats = cond.step(feeding(torch.randn(4, 2, P)))
    assert not any(k.startswith(("harm_z/", "noise_", "signal_cos/")) for k in stats)
    assert cond.accumulator._micro_grams == []


def test_a_grad_scaler_s_overflow_skips_and_the_next_step_measures_again():
    """fp16-style loss scaling: a scale that overflows makes the gradients (and the micro-batch
    Gram matrices) infinite; the step is skipped with NaN statistics, the scaler backs off, and
    the next step's statistics are those of the unscaled gradients."""
    model = Linear()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, backoff_factor=2.0**-100)
    cond = GradientConductor(
        model, loss_fns(2), {"l0": 1.0, "l1": 1.0}, 4, conflicts="significant", scaler=scaler
    )
    plain = conductor(2, 4, conflicts="significant")
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    gen = torch.Generator().manual_seed(0)
    c = 100.0 * (OPPOSED[0][None] + 0.3 * torch.randn(4, 2, P, generator=gen))  # 2^127·c: inf
    seen = []
    for _ in range(2):
        opt.zero_grad()
        seen.append(cond.step(feeding(c)))
        scaler.step(opt)
        scaler.update()
    assert seen[0]["skipped"] == 1.0 and math.isnan(seen[0]["harm_z/l0"])
    assert seen[1]["skipped"] == 0.0
    reference = plain.step(feeding(c))
    for key in ("harm_z/l0", "harm_z/l1", "noise_scale/l0", "signal_cos/l0_vs_l1"):
        assert seen[1][key] == pytest.approx(reference[key], rel=1e-4), key
