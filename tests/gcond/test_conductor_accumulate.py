"""The conductor's accumulation: exact per-loss gradients in full and stochastic mode, batched
or sequential backward, input forms, frozen parameters and batch norm (docs/algorithm.md)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from gcond import GradientConductor
from tests.gcond.conductor_models import (
    SmallNet,
    batches,
    l1,
    mse,
)

# ----------------------------------------------------------------------------- accumulation modes


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
