"""GradientConductor end to end: exact per-loss gradients on models where they are known in
closed form, accumulation modes, precision, skipping, state (docs/algorithm.md)."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from gcond import ConductorConfig, GradientConductor

# ----------------------------------------------------------------------------- closed-form models


class Theta(nn.Module):
    """A bare parameter vector θ. With loss ⟨c_k, θ⟩ the gradient of loss k is exactly c_k."""

    def __init__(self, init: list[float]) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.tensor(init, dtype=torch.float32))

    def forward(self, x: torch.Tensor | None = None) -> torch.Tensor:
        return self.theta if x is None else self.theta * 0 + self.theta  # x unused on purpose


def dot(c: list[float]):
    vec = torch.tensor(c, dtype=torch.float32)
    return lambda out, target: (out * vec).sum()


def data_dot(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """⟨target, θ⟩: the gradient is the micro-batch's target vector."""
    return (out * target).sum()


def constant_provider():
    return lambda: (None, None)


def conductor_for(c1, c2, *, init=(0.0, 0.0, 0.0), names=("a", "b"), **kwargs):
    model = Theta(list(init))
    losses = {names[0]: dot(c1), names[1]: dot(c2)}
    lambdas = {names[0]: 1.0, names[1]: 1.0}
    kwargs.setdefault("accumulation_steps", 2)
    return model, GradientConductor(model, losses, lambdas, **kwargs)


def grad_of(model: Theta) -> list[float]:
    return model.theta.grad.tolist()


def assert_close_list(actual, expected, tol=1e-6):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        assert a == pytest.approx(e, abs=tol), (actual, expected)


# ----------------------------------------------------------------------------- usage


def test_seed_usage_snippet_runs_as_written():
    from pytorch_msssim import ssim

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.GELU(), nn.Conv2d(8, 3, 3, padding=1), nn.Sigmoid()
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    images = torch.rand(6, 3, 16, 16)

    def data_provider():
        idx = torch.randint(0, 6, (2,))
        noisy = (images[idx] + 0.1 * torch.randn(2, 3, 16, 16)).clamp(0, 1)
        return noisy, images[idx]

    def l1_fn(out, target):
        return (out - target).abs().mean()

    def ssim_fn(out, target):
        return 1 - ssim(out.float(), target.float(), data_range=1.0, win_size=7)

    conductor = GradientConductor(model=model, loss_fns={"l1": l1_fn, "ssim": ssim_fn},
                                  lambdas={"l1": 0.85, "ssim": 0.15},
                                  accumulation_steps=24, momentum_beta=0.9)  # fmt: skip
    first = None
    for _ in range(4):
        optimizer.zero_grad()
        stats = conductor.step(data_provider=data_provider)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        first = first if first is not None else stats["loss/total"]
    print(stats["final_grad_norm"], stats["min_cosine_sim"])
    assert math.isfinite(stats["final_grad_norm"]) and stats["final_grad_norm"] > 0
    assert -1.0 <= stats["min_cosine_sim"] <= 1.0
    assert stats["loss/total"] < first
    for key in ("cos/l1_vs_ssim", "conflicts/weak", "wins/l1", "raw_norm/ssim", "norm_ema/l1"):
        assert key in stats


# ----------------------------------------------------------------------------- zones, exact


def test_weak_conflict_symmetric_projection():
    # cos(a, b) = -3 / (3·√5) ≈ -0.447: weak zone. Simultaneous projections:
    # a' = a − (⟨a,b⟩/‖b‖²) b = (3,0,0) + 3/5·(−1,2,0) = (2.4, 1.2, 0)
    # b' = b − (⟨a,b⟩/‖a‖²) a = (−1,2,0) + 3/9·(3,0,0) = (0, 2, 0)
    model, cond = conductor_for([3, 0, 0], [-1, 2, 0])
    stats = cond.step(constant_provider())
    assert_close_list(grad_of(model), [2.4, 3.2, 0.0])
    assert stats["conflicts/weak"] == 1 and stats["conflicts/main"] == 0
    assert stats["cos/a_vs_b"] == pytest.approx(-1 / math.sqrt(5))
    assert stats["min_cosine_sim"] == pytest.approx(-1 / math.sqrt(5))
    assert stats["wins/a"] == 0 and stats["wins/b"] == 0  # no arbitration in the weak zone
    assert stats["proj_iters"] == 1
    assert stats["final_grad_norm"] == pytest.approx(4.0)


def test_main_conflict_projects_the_loser_only():
    # cos = -1/√2: main zone. First step: equal scores, the tie goes to "a" (listed first);
    # b' = b − (⟨b,a⟩/‖a‖²) a = (−2,2,0) + 2·(1,0,0) = (0,2,0); a untouched.
    model, cond = conductor_for([1, 0, 0], [-2, 2, 0])
    stats = cond.step(constant_provider())
    assert_close_list(grad_of(model), [1.0, 2.0, 0.0])
    assert stats["conflicts/main"] == 1 and stats["wins/a"] == 1 and stats["wins/b"] == 0


def test_main_conflict_tie_goes_to_the_loss_listed_first():
    model, cond = conductor_for([1, 0, 0], [-2, 2, 0], names=("b", "a"))
    stats = cond.step(constant_provider())
    assert stats["wins/b"] == 1  # "b" is listed first now
    assert_close_list(grad_of(model), [1.0, 2.0, 0.0])


def test_critical_conflict_winner_takes_all():
    # cos = -3/√10 ≈ -0.949 < -0.8: the loser is zeroed.
    model, cond = conductor_for([1, 0, 0], [-3, 1, 0])
    stats = cond.step(constant_provider())
    assert_close_list(grad_of(model), [1.0, 0.0, 0.0])
    assert stats["conflicts/critical"] == 1 and stats["wins/a"] == 1


@pytest.mark.parametrize("c2", [[0.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
def test_no_action_at_or_above_weak(c2):
    model, cond = conductor_for([1, 0, 0], c2)
    stats = cond.step(constant_provider())
    assert_close_list(grad_of(model), [1 + c2[0], c2[1], 0.0])
    assert stats["proj_iters"] == 0
    assert stats["conflicts/weak"] + stats["conflicts/main"] + stats["conflicts/critical"] == 0


def test_three_losses_several_iterations():
    # a=(1,0,0), b=(-1,1,0) [cos -0.707, main], c=(-1,-1,0) [cos(a,c) -0.707, cos(b,c)=0].
    # Iteration 1: lowest pair (a,b) (ties broken by order), main: a wins, b ← (0,1,0).
    # Iteration 2: (a,c) main: a wins (dominance not yet), c ← (0,-1,0).
    # Iteration 3: (b,c) now cos -1 → critical: tie on scores → b (listed first) wins, c ← 0.
    model = Theta([0.0, 0.0, 0.0])
    losses = {"a": dot([1, 0, 0]), "b": dot([-1, 1, 0]), "c": dot([-1, -1, 0])}
    cond = GradientConductor(model, losses, dict.fromkeys(losses, 1.0), 1, dominance_window=0)
    stats = cond.step(constant_provider())
    assert stats["proj_iters"] == 3
    assert (stats["conflicts/main"], stats["conflicts/critical"]) == (2, 1)
    assert (stats["wins/a"], stats["wins/b"], stats["wins/c"]) == (2, 1, 0)
    assert_close_list(grad_of(model), [1.0, 1.0, 0.0])


def test_projection_max_iters_is_respected():
    model = Theta([0.0, 0.0, 0.0])
    losses = {"a": dot([1, 0, 0]), "b": dot([-1, 1, 0]), "c": dot([-1, -1, 0])}
    cond = GradientConductor(
        model, losses, dict.fromkeys(losses, 1.0), 1, projection_max_iters=1, dominance_window=0
    )
    stats = cond.step(constant_provider())
    assert stats["proj_iters"] == 1
    # Only (a, b) was resolved: a + (0,1,0) + c.
    assert_close_list(grad_of(model), [0.0, 0.0, 0.0])


def test_smooth_resolution_at_main_threshold_projects_both():
    # cos exactly -0.5 = main: α = π/2, so both sides are fully projected (sin α = 1).
    # a=(2,0,0), b=(-1,√3,0): d = -2; a' = a − d/‖b‖²·b = (2,0,0) + 0.5·(−1,√3,0)
    # b' = b − d/‖a‖²·a = (−1,√3,0) + 0.5·(2,0,0) = (0,√3,0)
    s3 = math.sqrt(3.0)
    model, cond = conductor_for([2, 0, 0], [-1, s3, 0], resolution="smooth")
    cond.step(constant_provider())
    assert_close_list(grad_of(model), [1.5, 0.5 * s3 + s3, 0.0], tol=1e-5)


def test_smooth_resolution_below_critical_spares_the_winner():
    # cos < critical: α = π, sin α = 0 for the winner, full projection for the loser.
    model, cond = conductor_for([1, 0, 0], [-3, 1, 0], resolution="smooth")
    stats = cond.step(constant_provider())
    assert stats["wins/a"] == 1
    assert_close_list(grad_of(model), [1.0, 1.0, 0.0])


# ----------------------------------------------------------------------------- statistics, norms


def series_provider(vectors: list[list[float]]):
    """Micro-batch i yields target vectors[i]: with data_dot the gradient is that vector."""
    it = iter([torch.tensor(v, dtype=torch.float32) for v in vectors])
    return lambda: (None, next(it))


def test_norm_ema_starts_at_first_norm_then_follows_beta():
    model = Theta([0.0, 0.0])
    cond = GradientConductor(model, {"a": data_dot}, {"a": 1.0}, 1, norm_ema_beta=0.9)
    provider = series_provider([[3.0, 4.0], [0.0, 1.0]])
    s1 = cond.step(provider)
    assert s1["raw_norm/a"] == pytest.approx(5.0) and s1["norm_ema/a"] == pytest.approx(5.0)
    s2 = cond.step(provider)
    assert s2["norm_ema/a"] == pytest.approx(0.9 * 5.0 + 0.1 * 1.0)
    assert s2["min_cosine_sim"] == 1.0  # one loss


def test_norm_cap_rescales_before_resolution_but_reports_raw():
    model, cond = conductor_for([3, 0, 0], [0, 0.5, 0], norm_cap=1.0)
    stats = cond.step(constant_provider())
    assert stats["raw_norm/a"] == pytest.approx(3.0)
    assert_close_list(grad_of(model), [1.0, 0.5, 0.0])


def test_norm_equalization_writes_the_equalised_sum_and_reports_raw_norms():
    # g_a = (1, 0, 0), g_b = (0, 4, 3): norms 1 and 5, orthogonal. First step: s = (5, 1), so
    # p.grad = 5·g_a + g_b = (5, 4, 3). Second step, same gradients: the EMAs stay (1, 5).
    model, cond = conductor_for([1, 0, 0], [0, 4, 3], norm_equalization="max")
    stats = cond.step(constant_provider())
    assert stats["raw_norm/a"] == 1.0 and stats["norm_scale/a"] == 5.0
    assert stats["norm_scale/b"] == 1.0
    assert grad_of(model) == [5.0, 4.0, 3.0]
    cond.step(constant_provider())
    assert grad_of(model) == [5.0, 4.0, 3.0]


def test_loss_statistics_are_unweighted_means_and_total_is_weighted():
    model = Theta([1.0, 2.0])
    cond = GradientConductor(model, {"a": data_dot, "b": dot([1.0, 0.0])}, {"a": 0.5, "b": 2.0}, 2)
    stats = cond.step(series_provider([[1.0, 0.0], [0.0, 1.0]]))
    # loss a: ⟨(1,0),θ⟩=1, ⟨(0,1),θ⟩=2 → mean 1.5; loss b: θ_0 = 1 on both.
    assert stats["loss/a"] == pytest.approx(1.5) and stats["loss/b"] == pytest.approx(1.0)
    assert stats["loss/total"] == pytest.approx(0.5 * 1.5 + 2.0 * 1.0)
    # g_a = 0.5 · mean((1,0),(0,1)) = (0.25, 0.25); g_b = 2·(1,0)
    assert_close_list(grad_of(model), [2.25, 0.25])


# ----------------------------------------------------------------------------- momentum & friends


def test_momentum_with_bias_correction():
    model = Theta([0.0, 0.0])
    cond = GradientConductor(model, {"a": data_dot}, {"a": 1.0}, 1, momentum_beta=0.9)
    provider = series_provider([[1.0, 0.0], [0.0, 2.0]])
    cond.step(provider)
    assert_close_list(grad_of(model), [1.0, 0.0])  # m̂_1 = g_1
    stats = cond.step(provider)
    # m_2 = 0.9·0.1·g1 + 0.1·g2 = (0.09, 0.2); m̂_2 = m_2 / (1 − 0.81)
    expected = [0.09 / 0.19, 0.2 / 0.19]
    assert_close_list(grad_of(model), expected)
    assert stats["final_grad_norm"] == pytest.approx(math.hypot(*expected), rel=1e-6)


def test_momentum_zero_writes_the_resolved_gradient_itself():
    model = Theta([0.0, 0.0])
    cond = GradientConductor(model, {"a": data_dot}, {"a": 1.0}, 1, momentum_beta=0.0)
    provider = series_provider([[1.0, 0.0], [0.0, 2.0]])
    cond.step(provider)
    cond.step(provider)
    assert_close_list(grad_of(model), [0.0, 2.0])


def test_lion_writes_the_sign_of_the_momentum():
    model = Theta([0.0, 0.0, 0.0])
    cond = GradientConductor(
        model, {"a": data_dot}, {"a": 1.0}, 1, momentum_beta=0.9, use_lion=True
    )
    provider = series_provider([[0.5, -3.0, 0.0], [-1.0, 1.0, 0.0]])
    cond.step(provider)
    assert grad_of(model) == [1.0, -1.0, 0.0]
    cond.step(provider)
    # m_2 = (0.045 − 0.1, −0.27 + 0.1, 0) → signs (−1, −1, 0)
    assert grad_of(model) == [-1.0, -1.0, 0.0]


def test_return_raw_grad_skips_momentum():
    model = Theta([0.0, 0.0])
    cond = GradientConductor(
        model, {"a": data_dot}, {"a": 1.0}, 1, momentum_beta=0.9, return_raw_grad=True
    )
    provider = series_provider([[1.0, 0.0], [0.0, 2.0]])
    cond.step(provider)
    cond.step(provider)
    assert_close_list(grad_of(model), [0.0, 2.0])
    assert cond.state_dict()["momentum"].abs().sum() == 0  # never updated


class TwoTensors(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([3.0, 4.0]))  # ‖w‖ = 5
        self.z = nn.Parameter(torch.zeros(2))  # ‖z‖ = 0 → ratio 1

    def forward(self, x=None):
        return torch.cat([self.w, self.z])


@pytest.mark.parametrize(("coef", "clip", "expected_w_norm"), [(0.1, 10.0, 0.5), (5.0, 2.0, 2.0)])
def test_trust_ratio_per_parameter_tensor(coef, clip, expected_w_norm):
    model = TwoTensors()
    cond = GradientConductor(
        model,
        {"a": dot([0.6, 0.8, 0.3, 0.4])},
        {"a": 1.0},
        1,
        trust_ratio_coef=coef,
        trust_ratio_clip=clip,
    )
    stats = cond.step(constant_provider())
    # w: ‖u‖ = 1, ratio = coef·5 clipped at clip; z: ‖z‖ = 0 → untouched.
    assert model.w.grad.norm().item() == pytest.approx(expected_w_norm, rel=1e-6)
    assert_close_list(model.w.grad.tolist(), [0.6 * expected_w_norm, 0.8 * expected_w_norm])
    assert_close_list(model.z.grad.tolist(), [0.3, 0.4])
    assert stats["final_grad_norm"] == pytest.approx(math.hypot(expected_w_norm, 0.5), rel=1e-6)


# ----------------------------------------------------------------------------- accumulation modes


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))

    def forward(self, x):
        return self.net(x)


def mse(out, target):
    return ((out - target) ** 2).mean()


def l1(out, target):
    return (out - target).abs().mean()


def batches(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 5, generator=g), torch.randn(4, 3, generator=g)) for _ in range(n)]


def reference_grads(model, fn, data, scale):
    """Σ_i scale · ∇fn(model(x_i), y_i), with a separate forward and backward per micro-batch."""
    total = [torch.zeros_like(p) for p in model.parameters()]
    for x, y in data:
        grads = torch.autograd.grad(fn(model(x), y) * scale, list(model.parameters()))
        total = [t + g for t, g in zip(total, grads, strict=True)]
    return torch.cat([t.flatten() for t in total])


class TransposedUse(nn.Module):
    """``z`` enters transposed, so autograd hands back its gradient non-contiguous."""

    def __init__(self) -> None:
        super().__init__()
        self.net = SmallNet()
        self.z = nn.Parameter(torch.randn(3, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * self.z.t()


@pytest.mark.parametrize(
    ("per_loss_backward", "mode"),
    [
        ("batched", "batched"),
        ("sequential", "sequential"),
        ("auto", "batched"),
        ("benchmark", None),
    ],
)
@pytest.mark.parametrize("net", ["SmallNet", "TransposedUse"])
def test_full_mode_per_loss_gradients_match_separate_backwards(per_loss_backward, mode, net):
    torch.manual_seed(0)
    model = {"SmallNet": SmallNet, "TransposedUse": TransposedUse}[net]()
    data = batches(3)
    it = iter(data)
    cond = GradientConductor(
        model,
        {"mse": mse, "l1": l1},
        {"mse": 0.7, "l1": 0.3},
        3,
        per_loss_backward=per_loss_backward,
    )
    calls = []
    cond.step(lambda: calls.append(1) or next(it))
    assert len(calls) == 3  # one forward per micro-batch serves both losses
    raw = cond.state_dict()["prev_grads"]
    torch.testing.assert_close(raw[0], reference_grads(model, mse, data, 0.7 / 3))
    torch.testing.assert_close(raw[1], reference_grads(model, l1, data, 0.3 / 3))
    assert cond.backward_mode == (mode or cond.backward_mode)
    assert cond.backward_mode in ("batched", "sequential")


class SkippablePart(nn.Module):
    """⟨pa, x[:3]⟩ + ⟨pb, x[3:]⟩, the second term only while ``use_pb`` (a skipped branch)."""

    def __init__(self) -> None:
        super().__init__()
        self.pa = nn.Parameter(torch.zeros(3))
        self.pb = nn.Parameter(torch.zeros(2))
        self.use_pb = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = (self.pa * x[:3]).sum()
        return out + (self.pb * x[3:]).sum() if self.use_pb else out


@pytest.mark.parametrize("accumulation", ["full", "stochastic"])
@pytest.mark.parametrize("per_loss_backward", ["batched", "sequential"])
def test_a_parameter_no_loss_reaches_this_step_gets_exactly_zero_gradient(
    accumulation, per_loss_backward
):
    # The two accumulator stacks take turns, so step 2 reuses step 0's: once the model skips pb,
    # the accumulators must hold 0 there, not what they held two steps before.
    model = SkippablePart()
    cond = GradientConductor(
        model,
        {"a": lambda out, t: out, "b": lambda out, t: 2 * out},
        {"a": 1.0, "b": 1.0},
        2,
        accumulation=accumulation,
        per_loss_backward=per_loss_backward,
    )
    for step in range(4):
        model.use_pb = step < 2
        x = torch.arange(1.0, 6.0) * (step + 1)
        cond.step(lambda x=x: (x, None))
        raw = cond.state_dict()["prev_grads"]  # each loss: the mean over its micro-batches
        expected = x.clone()
        if not model.use_pb:
            expected[3:] = 0.0
        assert raw[0].tolist() == expected.tolist()
        assert raw[1].tolist() == (2 * expected).tolist()


class FakeClock:
    """Stands in for the accumulator's clock: each timed backward takes ``seconds[way]``."""

    def __init__(self, cond: GradientConductor, seconds: dict[str, float]) -> None:
        self.now, self.seconds, self.calls = 0.0, seconds, 0
        acc = cond.accumulator
        self.batched = acc._batched_grads
        self.sequential = acc._backward_sequential
        acc._batched_grads = self.timed(self.batched, "batched")
        acc._backward_sequential = self.timed(self.sequential, "sequential")
        acc._clock = self.clock

    def timed(self, fn, way):
        def run(*args, **kwargs):
            self.now += self.seconds[way]
            return fn(*args, **kwargs)

        return run

    def clock(self) -> float:
        self.calls += 1
        return self.now


@pytest.mark.parametrize(
    ("seconds", "chosen"),
    [
        ({"batched": 1.0, "sequential": 2.0}, "batched"),
        ({"batched": 2.0, "sequential": 1.0}, "sequential"),
    ],
)
def test_benchmark_backward_times_both_ways_once_and_keeps_the_faster(seconds, chosen):
    torch.manual_seed(0)
    model = SmallNet()
    data = batches(6)
    it = iter(data)
    cond = GradientConductor(
        model, {"mse": mse, "l1": l1}, {"mse": 0.7, "l1": 0.3}, 3, per_loss_backward="benchmark"
    )
    assert cond.backward_mode == "benchmark" and cond.backward_timings is None
    clock = FakeClock(cond, seconds)
    cond.step(lambda: next(it))
    assert cond.backward_mode == chosen
    assert cond.backward_timings == seconds
    assert clock.calls == 8  # two runs each way, start and end, on the first micro-batch only
    # The timed micro-batch is accumulated exactly once, whichever way wins.
    raw = cond.state_dict()["prev_grads"]
    torch.testing.assert_close(raw[0], reference_grads(model, mse, data[:3], 0.7 / 3))
    torch.testing.assert_close(raw[1], reference_grads(model, l1, data[:3], 0.3 / 3))
    cond.step(lambda: next(it))
    assert clock.calls == 8  # decided for good
    # The decision is part of the state, so a resumed run does not time again.
    restored = GradientConductor(
        SmallNet(),
        {"mse": mse, "l1": l1},
        {"mse": 0.7, "l1": 0.3},
        3,
        per_loss_backward="benchmark",
    )
    restored.load_state_dict(cond.state_dict())
    assert restored.backward_mode == chosen and restored.backward_timings == seconds


class NoBatchedBackward(torch.autograd.Function):
    """Identity whose backward reads a value on the host: batched backward cannot run it."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * (1.0 + 0.0 * float(grad.sum().item()))


class NoBatchedModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = SmallNet()

    def forward(self, x):
        return NoBatchedBackward.apply(self.net(x))


@pytest.mark.parametrize("per_loss_backward", ["auto", "benchmark"])
def test_backward_falls_back_to_sequential_when_batched_backward_raises(per_loss_backward):
    torch.manual_seed(0)
    model = NoBatchedModel()
    data = batches(2)
    it = iter(data)
    losses, lambdas = {"mse": mse, "l1": l1}, {"mse": 1.0, "l1": 1.0}
    cond = GradientConductor(model, losses, lambdas, 2, per_loss_backward=per_loss_backward)
    assert cond.backward_mode == per_loss_backward
    cond.step(lambda: next(it))
    assert cond.backward_mode == "sequential"
    timings = cond.backward_timings
    assert timings is None if per_loss_backward == "auto" else timings["batched"] == math.inf
    raw = cond.state_dict()["prev_grads"]  # the micro-batch that failed batched is not lost
    torch.testing.assert_close(raw[0], reference_grads(model, mse, data, 1.0 / 2))
    torch.testing.assert_close(raw[1], reference_grads(model, l1, data, 1.0 / 2))
    with pytest.raises(RuntimeError):  # asked for explicitly, the error is not hidden
        batched = GradientConductor(model, losses, lambdas, 2, per_loss_backward="batched")
        batched.step(lambda: data[0])


def test_stochastic_mode_serves_each_loss_its_own_micro_batches():
    torch.manual_seed(0)
    model = SmallNet()
    data = batches(5)
    it = iter(data)
    cond = GradientConductor(
        model, {"mse": mse, "l1": l1}, {"mse": 0.7, "l1": 0.3}, 5, accumulation="stochastic"
    )
    stats = cond.step(lambda: next(it))
    raw = cond.state_dict()["prev_grads"]
    # Round robin: mse gets micro-batches 0, 2, 4; l1 gets 1, 3; each averaged over its own.
    torch.testing.assert_close(raw[0], reference_grads(model, mse, data[0::2], 0.7 / 3))
    torch.testing.assert_close(raw[1], reference_grads(model, l1, data[1::2], 0.3 / 2))
    # Loss values are still recorded for every loss on every micro-batch.
    with torch.no_grad():
        expected_l1 = sum(l1(model(x), y) for x, y in data) / 5
    assert stats["loss/l1"] == pytest.approx(float(expected_l1), rel=1e-6)


def test_stochastic_mode_records_a_graph_only_for_the_served_loss():
    calls = []

    def recording(fn, name):
        def loss(out, target):
            calls.append((name, torch.is_grad_enabled()))
            return fn(out, target)

        return loss

    data = iter(batches(4))
    cond = GradientConductor(
        SmallNet(),
        {"mse": recording(mse, "mse"), "l1": recording(l1, "l1")},
        {"mse": 1.0, "l1": 1.0},
        4,
        accumulation="stochastic",
    )
    cond.step(lambda: next(data))
    # Micro-batches 0 and 2 serve mse, 1 and 3 serve l1; every loss is still computed on each.
    assert calls == [("mse", True), ("l1", False), ("mse", False), ("l1", True)] * 2


def test_one_loss_without_momentum_equals_plain_accumulation():
    torch.manual_seed(0)
    model = SmallNet()
    twin = copy.deepcopy(model)
    data = batches(4)
    it = iter(data)
    GradientConductor(model, {"mse": mse}, {"mse": 1.0}, 4).step(lambda: next(it))
    for x, y in data:
        (mse(twin(x), y) / 4).backward()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)


def test_input_forms_tuple_and_mapping():
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 1)

        def forward(self, a, b):
            return self.lin(a) + b

    model = Two()
    cond = GradientConductor(model, {"m": mse}, {"m": 1.0}, 1)
    x = torch.randn(3, 2)
    cond.step(lambda: ((x, 1.0), torch.zeros(3, 1)))
    cond.step(lambda: ({"a": x, "b": 1.0}, torch.zeros(3, 1)))
    assert model.lin.weight.grad is not None


def test_frozen_parameters_are_never_touched():
    model = SmallNet()
    model.net[0].weight.requires_grad_(False)
    cond = GradientConductor(model, {"mse": mse}, {"mse": 1.0}, 1)
    data = iter(batches(1))
    cond.step(lambda: next(data))
    assert model.net[0].weight.grad is None
    assert model.net[2].weight.grad is not None


# ----------------------------------------------------------------------------- batch norm


class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(5)
        self.drop = nn.Dropout(0.5)
        self.lin = nn.Linear(5, 3)
        self.seen: list[tuple[bool, bool]] = []

    def forward(self, x):
        self.seen.append((self.bn.training, self.drop.training))
        return self.lin(self.drop(self.bn(x)))


def test_freeze_bn_keeps_running_stats_and_restores_mode():
    torch.manual_seed(0)
    model = BNNet().train()
    before = (model.bn.running_mean.clone(), model.bn.running_var.clone())
    data = iter(batches(3))
    GradientConductor(model, {"mse": mse, "l1": l1}, {"mse": 1.0, "l1": 1.0}, 3).step(
        lambda: next(data)
    )
    assert torch.equal(model.bn.running_mean, before[0])
    assert torch.equal(model.bn.running_var, before[1])
    assert model.bn.training and model.drop.training  # restored
    assert model.seen == [(False, True)] * 3  # BN in eval, dropout still active


def test_freeze_bn_false_updates_running_stats():
    model = BNNet().train()
    before = model.bn.running_mean.clone()
    data = iter(batches(1))
    GradientConductor(model, {"mse": mse}, {"mse": 1.0}, 1, freeze_bn=False).step(
        lambda: next(data)
    )
    assert not torch.equal(model.bn.running_mean, before)


# ----------------------------------------------------------------------------- bad numbers


def nan_at(step_to_fail: int):
    """data_dot whose micro-batches of optimizer step ``step_to_fail`` give NaN."""
    state = {"step": 0}

    def provider():
        value = math.nan if state["step"] == step_to_fail else 1.0
        return None, torch.tensor([value, 2.0])

    return state, provider


def test_nan_loss_skips_the_step_and_leaves_state_untouched():
    model = Theta([0.5, 0.5])
    cond = GradientConductor(
        model, {"a": data_dot, "b": dot([-1.0, 0.2])}, {"a": 1.0, "b": 1.0}, 2, momentum_beta=0.9
    )
    state, provider = nan_at(1)
    cond.step(provider)
    saved = copy.deepcopy(cond.state_dict())
    state["step"] = 1
    stats = cond.step(provider)
    assert stats["skipped"] == 1 and stats["nonfinite/a"] == 1 and stats["nonfinite/b"] == 0
    assert model.theta.grad is None  # the optimizer cannot change the weights
    assert_states_equal(cond.state_dict(), saved)
    state["step"] = 2
    stats = cond.step(provider)
    assert stats["skipped"] == 0 and stats["step"] == 2  # skipped steps are not counted


def assert_states_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        elif isinstance(a[key], dict):
            assert_states_equal(a[key], b[key])
        else:
            assert a[key] == b[key], key


def test_fp16_scaler_overflow_is_skipped_by_scaler_step_and_scale_backs_off():
    model = Theta([0.5, 0.5])
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    cond = GradientConductor(
        model,
        {"a": data_dot, "b": dot([-1.0, 0.25])},
        {"a": 1.0, "b": 1.0},
        2,
        autocast_dtype=torch.float16,
        scaler=scaler,
    )
    state, provider = nan_at(1)
    optimizer.zero_grad()
    stats = cond.step(provider)
    scaler.step(optimizer)
    scaler.update()
    # Step 0: g_a = (1, 2), g_b = (−1, 0.25): cos < 0 → weak zone, resolved in unscaled units:
    # the weights moved by exactly the (unscaled) resolved gradient.
    assert stats["skipped"] == 0 and stats["conflicts/weak"] == 1
    moved = (torch.tensor([0.5, 0.5]) - model.theta.detach()).tolist()
    assert math.hypot(*moved) == pytest.approx(stats["final_grad_norm"], rel=1e-3)
    assert scaler.get_scale() == 1024.0

    weights = model.theta.detach().clone()
    saved = copy.deepcopy(cond.state_dict())
    state["step"] = 1
    optimizer.zero_grad()
    stats = cond.step(provider)
    scaler.step(optimizer)
    scaler.update()
    assert stats["skipped"] == 1
    assert torch.equal(model.theta.detach(), weights)  # scaler.step refused the update
    assert scaler.get_scale() == 512.0  # backed off
    assert_states_equal(cond.state_dict(), saved)


# ----------------------------------------------------------------------------- state


def run_steps(model, cond, optimizer, data, start, count):
    grads = []
    for s in range(start, start + count):
        it = iter(data[s])
        optimizer.zero_grad()
        cond.step(lambda it=it: next(it))
        grads.append([p.grad.clone() for p in model.parameters()])
        optimizer.step()
    return grads


def make_stateful(seed=0, **options):
    torch.manual_seed(seed)
    model = SmallNet()
    cond = GradientConductor(
        model, {"mse": mse, "l1": l1}, {"mse": 0.5, "l1": 0.5}, 2, momentum_beta=0.9, **options
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.0, 0.95))
    return model, cond, optimizer


@pytest.mark.parametrize(
    "options",
    [{}, {"norm_equalization": "max", "dominance_rule": "bounded", "dominance_window": 1}],
    ids=["default", "equalized-bounded"],
)
def test_state_dict_round_trip_is_bit_identical(options):
    data = [batches(2, seed=s) for s in range(5)]
    model, cond, optimizer = make_stateful(**options)
    run_steps(model, cond, optimizer, data, 0, 3)
    buffer = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "opt": optimizer.state_dict(), "cond": cond.state_dict()},
        buffer,
    )
    uninterrupted = run_steps(model, cond, optimizer, data, 3, 2)

    model2, cond2, optimizer2 = make_stateful(seed=1, **options)  # other init: all must load
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model2.load_state_dict(saved["model"])
    optimizer2.load_state_dict(saved["opt"])
    cond2.load_state_dict(saved["cond"])
    resumed = run_steps(model2, cond2, optimizer2, data, 3, 2)
    for a, b in zip(uninterrupted, resumed, strict=True):
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)


def test_load_state_dict_refuses_other_losses_and_shapes():
    _, cond, _ = make_stateful()
    state = cond.state_dict()
    other = GradientConductor(SmallNet(), {"mse": mse, "ssim": l1}, {"mse": 1.0, "ssim": 1.0}, 2)
    with pytest.raises(ValueError, match=r"losses \['mse', 'l1'\].*\['mse', 'ssim'\]"):
        other.load_state_dict(state)
    bigger = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    wrong = GradientConductor(bigger, {"mse": mse, "l1": l1}, {"mse": 1.0, "l1": 1.0}, 2)
    with pytest.raises(ValueError, match="other parameters"):
        wrong.load_state_dict(state)


# ----------------------------------------------------------------------------- validation


def _good_kwargs():
    return {
        "model": SmallNet(),
        "loss_fns": {"mse": mse, "l1": l1},
        "lambdas": {"mse": 1.0, "l1": 1.0},
        "accumulation_steps": 2,
    }


@pytest.mark.parametrize(
    ("key", "value", "error"),
    [
        ("model", "not a module", TypeError),
        ("loss_fns", {}, ValueError),
        ("loss_fns", {"mse": 3, "l1": l1}, TypeError),
        ("lambdas", {"mse": 1.0}, ValueError),
        ("lambdas", {"mse": -1.0, "l1": 1.0}, ValueError),
        ("lambdas", {"mse": math.nan, "l1": 1.0}, ValueError),
        ("lambdas", {"mse": "1", "l1": 1.0}, TypeError),
        ("accumulation_steps", 0, ValueError),
        ("accumulation_steps", 2.0, TypeError),
        ("accumulation", "partial", ValueError),
        ("resolution", "pcgrad", ValueError),
        ("conflict_thresholds", (-0.5, -0.8, 0.0), ValueError),
        ("conflict_thresholds", (-1.5, -0.5, 0.0), ValueError),
        ("conflict_thresholds", (-0.8, 0.0), TypeError),
        ("projection_max_iters", -1, ValueError),
        ("dominance_window", -2, ValueError),
        ("tie_breaking_weights", (0.0, 0.0), ValueError),
        ("tie_breaking_weights", (-1.0, 2.0), ValueError),
        ("norm_ema_beta", 1.0, ValueError),
        ("norm_cap", 0.0, ValueError),
        ("norm_equalization", "mean", ValueError),
        ("norm_equalization_beta", 1.0, ValueError),
        ("dominance_rule", "none", ValueError),
        ("momentum_beta", 1.0, ValueError),
        ("momentum_beta", -0.1, ValueError),
        ("use_lion", True, ValueError),  # needs momentum_beta > 0
        ("use_lion", "yes", TypeError),
        ("trust_ratio_coef", -1.0, ValueError),
        ("trust_ratio_clip", 0.0, ValueError),
        ("remap_power", 0.0, ValueError),
        ("return_raw_grad", 1, TypeError),
        ("freeze_bn", None, TypeError),
        ("autocast_dtype", torch.int8, ValueError),
        ("scaler", object(), TypeError),
        ("grad_dtype", torch.int32, ValueError),
        ("ddp_sync", "all", ValueError),
        ("eps", 0.0, ValueError),
        ("eps", math.inf, ValueError),
    ],
)
def test_constructor_rejects_bad_values_naming_the_parameter(key, value, error):
    kwargs = _good_kwargs()
    kwargs[key] = value
    with pytest.raises(error, match=key):
        GradientConductor(**kwargs)


def test_stochastic_needs_as_many_micro_batches_as_losses():
    kwargs = _good_kwargs() | {"accumulation_steps": 1, "accumulation": "stochastic"}
    with pytest.raises(ValueError, match="accumulation_steps"):
        GradientConductor(**kwargs)


def test_model_without_trainable_parameters_is_refused():
    model = SmallNet().requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        GradientConductor(model, {"mse": mse}, {"mse": 1.0}, 1)


def test_non_scalar_loss_is_named():
    cond = GradientConductor(
        SmallNet(), {"per_sample": lambda o, t: (o - t).abs()}, {"per_sample": 1.0}, 1
    )
    data = iter(batches(1))
    with pytest.raises(TypeError, match="per_sample"):
        cond.step(lambda: next(data))


def test_bad_data_provider_output_is_named():
    cond = GradientConductor(SmallNet(), {"mse": mse}, {"mse": 1.0}, 1)
    with pytest.raises(TypeError, match="data_provider"):
        cond.step(lambda: torch.zeros(3))
    with pytest.raises(TypeError, match="data_provider"):
        cond.step("not callable")  # type: ignore[arg-type]


def test_repr_shows_every_constructor_argument():
    import inspect

    text = repr(GradientConductor(**_good_kwargs()))
    for name, parameter in inspect.signature(GradientConductor).parameters.items():
        if parameter.kind != parameter.VAR_KEYWORD:  # **options: the config's fields
            assert f"{name}=" in text
    for name in inspect.signature(ConductorConfig).parameters:
        assert f"{name}=" in text
