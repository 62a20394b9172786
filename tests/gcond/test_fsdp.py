"""GradientConductor under FSDP2 (``fully_shard``): sharded end to end (docs/algorithm.md,
"Sharded models").

Gloo groups of 2 and 4 CPU processes run every scenario of ``_fsdp_worker``; the tests compare
the gathered ``p.grad`` and weights with one process (no group, no sharding) fed the union of
the ranks' data, check each rank's storage, the errors for what is not supported, and resume a
2-rank run's ``torch.distributed.checkpoint`` on 1 and on 2 ranks.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.gcond import _fsdp_worker as w
from tests.gcond._ranks import run_ranks

pytestmark = pytest.mark.slow  # integration: groups of gloo processes

TIMEOUT_S = 300  # a hang (ranks waiting in mismatched collectives) fails instead of blocking


def launch(job: str, world: int, out: Path) -> list[dict[str, Any]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_ranks(
        w.run,
        (world, job, str(out), port),
        world,
        timeout_s=TIMEOUT_S,
        what=f"{job} on {world} ranks",
    )
    results = [torch.load(out / f"{job}{world}_rank{r}.pt") for r in range(world)]
    for r, result in enumerate(results):
        assert "error" not in result, f"rank {r}:\n{result['error']}"
    return results


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    two, four = tmp_path_factory.mktemp("fsdp2"), tmp_path_factory.mktemp("fsdp4")
    return {
        "2": launch("scenarios", 2, two),
        "4": launch("scenarios", 4, four),
        # The 2-rank run's checkpoint, resumed on 1 and on 2 ranks.
        "resume1": launch("resume", 1, two),
        "resume2": launch("resume", 2, two),
    }


def reference(name: str) -> dict[str, list[Any]]:
    """One process, unsharded, fed the whole of every global micro-batch."""
    model = w.make_model()
    cond = w.conductor(model, **w.SCENARIOS[name])
    return w.train(model, cond, range(w.STEPS), poison=name == "nan")


def assert_close(a: torch.Tensor, b: torch.Tensor, scale: float = 1.0) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * scale)


def num_params() -> int:
    return sum(p.numel() for p in w.make_model().parameters())


@pytest.mark.parametrize("world", ["2", "4"])
@pytest.mark.parametrize("name", list(w.SCENARIOS))
def test_sharded_equals_one_process_over_the_union_of_the_data(runs, world, name):
    ranks, ref = runs[world], reference(name)
    scale = w.SCALE if w.SCENARIOS[name].get("scaler") else 1.0  # p.grad is scaled
    for step in range(w.STEPS):
        for rank in ranks:
            assert_close(rank[name]["grads"][step], ref["grads"][step], scale)
            assert_close(rank[name]["params"][step], ref["params"][step])
            assert torch.equal(rank[name]["params"][step], ranks[0][name]["params"][step])
            for key, value in ref["stats"][step].items():
                got = rank[name]["stats"][step][key]
                if key.startswith("noise_scale/"):  # counted in micro-batches of one rank
                    value *= int(world)
                assert got == pytest.approx(value, rel=1e-4, abs=1e-6, nan_ok=True), key
                assert got == pytest.approx(ranks[0][name]["stats"][step][key], nan_ok=True)
        skipped = name == "nan" and step == w.POISON_STEP
        assert ref["stats"][step]["skipped"] == float(skipped)
        if not skipped:  # every step has a conflict to resolve
            assert ref["stats"][step]["min_cosine_sim"] < 0
    if name == "zones":  # and each zone is met
        for zone in ("weak", "main", "critical"):
            assert sum(s[f"conflicts/{zone}"] for s in ref["stats"]) > 0, zone


def test_nan_on_one_rank_skips_the_step_on_every_rank(runs):
    for world in ("2", "4"):
        for rank in runs[world]:
            stats = rank["nan"]["stats"][w.POISON_STEP]
            assert stats["skipped"] == 1.0
            assert stats["nonfinite/fit"] == 1.0
            assert stats["nonfinite/flip"] == 0.0
        # Only the last rank saw the NaN; no rank moved.
        steps = runs[world][0]["nan"]["params"]
        assert torch.equal(steps[w.POISON_STEP], steps[w.POISON_STEP - 1])


def local_numels(world: int) -> list[int]:
    """FSDP2's Shard(0): each tensor's rows in ``torch.chunk`` pieces, missing pieces empty."""
    sizes = [0] * world
    for p in w.make_model().parameters():
        rows = [len(c) for c in torch.arange(p.shape[0]).chunk(world)]
        for r, n in enumerate(rows):
            sizes[r] += n * (p.numel() // p.shape[0])
    return sizes


@pytest.mark.parametrize("world", [2, 4])
def test_each_rank_stores_its_shard_only(runs, world):
    expected = local_numels(world)
    assert sum(expected) == num_params()
    assert max(expected) < num_params() // 2 + 20  # P/world-sized, not P
    for rank, numel in zip(runs[str(world)], expected, strict=True):
        storage = rank["storage"]
        assert storage["local_numel"] == numel
        assert storage["stack_bytes"] == 2 * w.K * numel * 4  # two K×P/world fp32 stacks
        assert storage["update_bytes"] == numel * 4
        assert storage["backward_mode"] == "sequential"


def test_unsupported_inputs_say_what_to_do_on_every_rank(runs):
    for rank in runs["2"]:
        errors = rank["errors"]
        assert "not sharded by fully_shard" in errors["mixed"]
        assert "fully_shard(model)" in errors["mixed"]
        assert "leave ddp_sync unset" in errors["ddp_sync"]
        assert "per_loss_backward='batched' cannot run under fully_shard" in errors["batched"]


@pytest.mark.parametrize("world", ["1", "2"])
def test_a_2_rank_checkpoint_resumes_on_1_and_2_ranks(runs, world):
    never_stopped = runs["2"][0]["never_stopped"][w.RESUME_AT :]
    for rank in runs[f"resume{world}"]:
        assert len(rank["resumed"]) == len(never_stopped)
        for got, want in zip(rank["resumed"], never_stopped, strict=True):
            assert_close(got, want)
