"""GradientConductor under DistributedDataParallel: the three ``ddp_sync`` modes (see docs).

Two CPU processes in a gloo group (loopback only) run every scenario of ``_ddp_worker`` once;
the tests compare the ranks with each other and with single-process references built here from
the same model, losses and micro-batches.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.gcond import _ddp_worker as w
from tests.gcond._ranks import run_ranks

pytestmark = pytest.mark.slow  # integration: two gloo processes

K = len(w.LAMBDAS)
TIMEOUT_S = 180  # a hang (ranks waiting in mismatched collectives) fails instead of blocking


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("ddp")
    run_ranks(
        w.run, (str(out),), w.WORLD_SIZE, timeout_s=TIMEOUT_S, what=f"the {w.WORLD_SIZE} ranks"
    )
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(w.WORLD_SIZE)]


def num_params() -> int:
    return sum(p.numel() for p in w.make_model().parameters())


def single_process(
    batches_of_step,
    steps: int,
    ddp_sync: str = "grads",
    accumulation_steps: int = w.MICRO_BATCHES,
    representation: bool = False,
    **extra: Any,
) -> tuple[list[torch.Tensor], list[dict[str, float]]]:
    """One process, no process group: parameters and stats after each step."""
    model = w.make_model()
    options = w.representation(model) if representation else {}
    cond = w.conductor(model, ddp_sync, accumulation_steps, **options, **extra)
    opt = torch.optim.SGD(model.parameters(), lr=w.LR)
    params, stats = [], []
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        stats.append(cond.step(w.provider(batches_of_step(step))))
        opt.step()
        params.append(w.flat_params(model))
    return params, stats


def union_reference(
    steps: int, representation: bool = False, **extra: Any
) -> tuple[list[torch.Tensor], list[dict[str, float]]]:
    """One process fed both ranks' micro-batches: N·world micro-batches per step."""
    return single_process(
        lambda step: w.rank_batches(0, step) + w.rank_batches(1, step),
        steps,
        accumulation_steps=w.MICRO_BATCHES * w.WORLD_SIZE,
        representation=representation,
        **extra,
    )


def assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------- grads


def test_grads_mode_equals_one_process_that_saw_every_micro_batch(ranks):
    r0, r1 = ranks[0]["grads"], ranks[1]["grads"]
    ref_params, ref_stats = union_reference(w.STEPS)
    for step in range(w.STEPS):
        assert torch.equal(r0["params"][step], r1["params"][step]), f"ranks differ at {step}"
        assert_close(r0["params"][step], ref_params[step])
        for key, value in ref_stats[step].items():
            assert r0["stats"][step][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
            assert r1["stats"][step][key] == r0["stats"][step][key], key
    # The losses do conflict, so resolution (and the arbitrator) ran on the global gradients.
    zones = [s[f"conflicts/{z}"] for s in r0["stats"] for z in ("weak", "main", "critical")]
    assert sum(zones) > 0
    assert any(s["min_cosine_sim"] < 0 for s in r0["stats"])


def test_grads_mode_makes_one_flat_all_reduce_and_ddp_none(ranks):
    p = num_params()
    for rank in ranks:
        result = rank["grads"]
        for shapes in result["all_reduce"]:
            # The K×P accumulators in one collective (not one per parameter tensor), and the K
            # loss sums for the statistics.
            assert shapes == [(K, p), (K,)]
        assert result["ddp_buckets_during_conductor"] == []
        assert result["ddp_buckets_plain_backward"] > 0  # the hook does see DDP's all-reduce


def test_grads_mode_state_is_identical_across_ranks_and_restores_every_rank(ranks):
    s0, s1 = ranks[0]["grads"]["state"], ranks[1]["grads"]["state"]
    flat0, flat1 = _flatten(s0), _flatten(s1)
    assert flat0.keys() == flat1.keys()
    for key, value in flat0.items():
        other = flat1[key]
        same = torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other
        assert same, key
    ref_params, _ = union_reference(w.STEPS + w.MORE_STEPS)
    for rank in ranks:
        result = rank["grads"]
        for continued, restored, ref in zip(
            result["continued"], result["restored"], ref_params[w.STEPS :], strict=True
        ):
            assert torch.equal(continued, restored)
            assert_close(continued, ref)
    for a, b in zip(ranks[0]["grads"]["restored"], ranks[1]["grads"]["restored"], strict=True):
        assert torch.equal(a, b)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix: tree}


# ---------------------------------------------------------------------------------- update


def test_update_mode_ranks_are_identical_after_each_step(ranks):
    r0, r1 = ranks[0]["update"], ranks[1]["update"]
    # Reference: two local conductors (own data, own state) whose final updates are averaged.
    models = [w.make_model() for _ in range(w.WORLD_SIZE)]
    conds = [w.conductor(m, "update") for m in models]
    opts = [torch.optim.SGD(m.parameters(), lr=w.LR) for m in models]
    for step in range(w.STEPS):
        assert torch.equal(r0["params"][step], r1["params"][step]), f"ranks differ at {step}"
        for rank, (cond, opt) in enumerate(zip(conds, opts, strict=True)):
            opt.zero_grad(set_to_none=True)
            cond.step(w.provider(w.rank_batches(rank, step)))
        grads = [
            (a.grad + b.grad) / 2
            for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True)
        ]
        for model, opt in zip(models, opts, strict=True):
            for param, grad in zip(model.parameters(), grads, strict=True):
                param.grad = grad.clone()
            opt.step()
        assert_close(r0["params"][step], w.flat_params(models[0]))
    p = num_params()
    for rank in ranks:
        result = rank["update"]
        # One P-sized collective of the final update (and the K non-finite flags before it).
        assert all(shapes == [(K,), (p,)] for shapes in result["all_reduce"])
        assert result["ddp_buckets_during_conductor"] == []


# ---------------------------------------------------------------------------------- none


def test_none_mode_synchronises_nothing(ranks):
    for r, rank in enumerate(ranks):
        result = rank["none"]
        assert all(shapes == [] for shapes in result["all_reduce"])
        assert result["ddp_buckets_during_conductor"] == []
        own, _ = single_process(lambda step, r=r: w.rank_batches(r, step), w.STEPS, "none")
        for step in range(w.STEPS):
            assert torch.equal(result["params"][step], own[step])
    assert not torch.equal(ranks[0]["none"]["params"][-1], ranks[1]["none"]["params"][-1])


# ---------------------------------------------------------------------------------- bad numbers


@pytest.mark.parametrize("mode", ["grads", "update"])
def test_a_non_finite_loss_on_one_rank_skips_the_step_on_every_rank(ranks, mode):
    r0, r1 = ranks[0][f"nan_{mode}"], ranks[1][f"nan_{mode}"]
    for result in (r0, r1):
        assert result["skipped"] == [0.0, 1.0, 0.0]
        assert torch.equal(result["params"][1], result["params"][0])  # nothing applied
        assert result["state_step"] == w.STEPS - 1  # the skipped step left the state alone
        assert torch.isfinite(result["params"][-1]).all()
    for a, b in zip(r0["params"], r1["params"], strict=True):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------- backward


def test_benchmark_backward_is_decided_together_by_every_rank(ranks):
    p = num_params()
    for rank in ranks:
        result = rank["benchmark"]
        # Summed over the ranks: batched 1 + 4, sequential 3 + 1 seconds: sequential everywhere.
        assert result["mode"] == "sequential"
        assert result["timings"] == {"batched": 5.0, "sequential": 4.0}
        # One extra collective of two numbers, on the first step only.
        assert result["all_reduce"] == [[(2,), (K, p), (K,)], [(K, p), (K,)]]
    assert torch.equal(ranks[0]["benchmark"]["params"][1], ranks[1]["benchmark"]["params"][1])


# ---------------------------------------------------------------------------------- representation


def test_representation_mode_equals_one_process_that_saw_every_micro_batch(ranks):
    """Micro-batch decisions read the arbitrator as it stood at the step's start, and it moves
    once a step on totals summed over the ranks: every rank keeps the same state, and the run
    equals one process fed the union (full steps and the ones between, resolve_every=2)."""
    r0, r1 = ranks[0]["representation"], ranks[1]["representation"]
    steps = w.STEPS + 1
    ref_params, ref_stats = union_reference(steps, representation=True)
    for step in range(steps):
        assert torch.equal(r0["params"][step], r1["params"][step]), f"ranks differ at {step}"
        assert_close(r0["params"][step], ref_params[step])
        for key, value in ref_stats[step].items():
            if value != value:  # NaN: not computed between full steps
                assert r0["stats"][step][key] != r0["stats"][step][key], key
                continue
            assert r0["stats"][step][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
            assert r1["stats"][step][key] == r0["stats"][step][key], key
    assert [s["full_step"] for s in r0["stats"]] == [1.0, 0.0, 1.0, 0.0]
    assert sum(s["proj_iters"] for s in r0["stats"][::2]) > 0  # resolution did act
    flat0, flat1 = _flatten(r0["state"]), _flatten(r1["state"])
    for key, value in flat0.items():
        other = flat1[key]
        same = torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other
        assert same, key
    p = num_params()
    # Full steps: the step's K×K summary, then the merged P-sized gradient and the loss sums; steps
    # between: the P-sized gradient and the loss sums. DDP's own all-reduce never fires.
    k = K
    assert r0["all_reduce"][0] == [(k * k + 2 * k + 5,), (p,), (k,)]
    assert r0["all_reduce"][1] == [(p,), (k,)]
    assert r0["ddp_buckets_during_conductor"] == []


# ---------------------------------------------------------------------------------- significance


@pytest.mark.parametrize("name", ["significant", "significant_representation"])
def test_significance_is_decided_on_every_rank_s_micro_batches(ranks, name):
    """The noise is estimated from all ranks' micro-batches (their Gram matrices gathered in the
    small collective with the loss sums): the run, its noise statistics and its decisions equal
    one process fed the union, and every rank holds the same state."""
    r0, r1 = ranks[0][name], ranks[1][name]
    steps = w.STEPS + 1
    at_representation = name.endswith("representation")
    ref_params, ref_stats = union_reference(steps, at_representation, **w.SIGNIFICANT)
    for step in range(steps):
        assert torch.equal(r0["params"][step], r1["params"][step]), f"ranks differ at {step}"
        assert_close(r0["params"][step], ref_params[step])
        for key, value in ref_stats[step].items():
            if value != value:
                assert r0["stats"][step][key] != r0["stats"][step][key], key
                continue
            assert r0["stats"][step][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
            assert r1["stats"][step][key] == r0["stats"][step][key], key
    noise_keys = [key for key in ref_stats[0] if key.startswith("harm_z/")]
    assert len(noise_keys) == K
    if not at_representation:
        # One step's plain sum harmed `flip` beyond half a standard error: resolved, the rest not.
        assert [s["proj_iters"] > 0 for s in r0["stats"]] == [False, False, True, False]
        assert [s["conflicts/noise"] for s in r0["stats"]] == [1.0, 1.0, 0.0, 1.0]
        p, n = num_params(), w.MICRO_BATCHES
        for shapes in r0["all_reduce"]:
            assert shapes == [(K, p), (K + w.WORLD_SIZE * n * K * K,)]
    assert _flatten(r0["state"]).keys() == _flatten(r1["state"]).keys()
