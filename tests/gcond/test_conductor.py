"""GradientConductor as a whole: the documented usage, a step that goes non-finite, its state,
and the checks of its arguments (docs/algorithm.md). Its stages: test_conductor_accumulate.py,
test_conductor_resolve.py, test_conductor_update.py."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from gcond import ConductorConfig, GradientConductor
from tests.gcond.conductor_models import (
    SmallNet,
    Theta,
    batches,
    data_dot,
    dot,
    l1,
    mse,
)

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
        ("conflicts", "some", ValueError),
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
