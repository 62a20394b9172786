"""The integration examples of docs/integrations.md run and do what the page says: Lightning
(manual optimization, fp16 GradScaler) and Accelerate. Each test skips cleanly when its package
is not installed (``pip install -e ".[integrations]"``)."""

from __future__ import annotations

import copy
import importlib.util
import re
import textwrap
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from gcond import WeightingResolver
from tests.helpers import REPO

EXAMPLES = REPO / "examples" / "integrations"
PAGE = REPO / "docs" / "integrations.md"
STEPS = 30


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sum_resolver() -> WeightingResolver:
    """Merge weights (1, 1): the conductor writes Σ_k g_k, plain accumulation's gradient."""
    return WeightingResolver(lambda gram: torch.ones(2, dtype=gram.dtype))


def _expected_grads(example: ModuleType, net: torch.nn.Module, batch: list, n: int) -> list:
    """Mean over the n micro-batches of ∇ Σ_k λ_k L_k: what summing the losses and
    accumulating would give (the batch cut here, not by the example's provider)."""
    net = copy.deepcopy(net)
    net.zero_grad()
    x, reg, cls = batch
    size = len(x) // n
    for i in range(0, len(x), size):
        target = {"reg": reg[i : i + size], "cls": cls[i : i + size]}
        out = net(x[i : i + size])
        total = sum(example.LAMBDAS[k] * fn(out, target) for k, fn in example.LOSS_FNS.items())
        (total / n).backward()
    return [p.grad.clone() for p in net.parameters()]


def _norm(tensors: Any) -> float:
    return float(torch.linalg.vector_norm(torch.cat([t.flatten() for t in tensors])))


def _check_statistics(history: list[dict[str, float]], steps: int) -> None:
    assert len(history) == steps
    assert [s["step"] for s in history] == [float(i) for i in range(1, steps + 1)]
    for stats in history:
        assert stats["skipped"] == 0.0
        assert -1.0 <= stats["cos/reg_vs_cls"] <= 1.0
        assert stats["min_cosine_sim"] == stats["cos/reg_vs_cls"]
        assert stats["final_grad_norm"] > 0.0
        assert stats["loss/total"] == pytest.approx(0.5 * stats["loss/reg"] + stats["loss/cls"])


# ---------------------------------------------------------------------------------- Lightning


@pytest.fixture
def lightning_example() -> ModuleType:
    pytest.importorskip("lightning")
    return _load("lightning_conductor")


def _trainer(**options: Any) -> Any:
    import lightning as L

    if "plugins" not in options:
        options.setdefault("precision", "32-true")
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **options,
    )


def _recording(example: ModuleType) -> type:
    """The example's module, also keeping each step's batch, its statistics and ``p.grad`` as
    the optimizer receives it (after unscaling, before clipping)."""

    class Recording(example.ConductedModule):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.batches: list = []
            self.grads: list = []
            self.clipped_norms: list = []
            self.weights: list = []

        def training_step(self, batch: list, batch_idx: int) -> None:
            self.batches.append([t.clone() for t in batch])
            self.weights.append([p.detach().clone() for p in self.parameters()])
            super().training_step(batch, batch_idx)

        def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
            self.grads.append([p.grad.clone() for p in self.parameters()])
            super().on_before_optimizer_step(optimizer)
            self.clipped_norms.append(_norm(p.grad for p in self.parameters()))

    return Recording


def test_lightning_example_trains(lightning_example):
    torch.manual_seed(0)
    before = lightning_example.validation_loss(lightning_example.ConductedModule())
    module = lightning_example.main(
        max_steps=STEPS, max_epochs=1, accelerator="cpu", precision="32-true"
    )
    _check_statistics(module.history, STEPS)
    after = lightning_example.validation_loss(module)
    print(f"lightning: validation loss {before:.4f} -> {after:.4f} in {STEPS} steps")
    assert after < 0.8 * before
    # The scheduler was stepped by hand: its warm-up reached the full learning rate.
    assert module.trainer.optimizers[0].param_groups[0]["lr"] == 1e-2
    assert module.conductor.autocast_dtype is None and module.conductor.scaler is None


def test_lightning_gradient_is_the_mean_of_micro_batch_gradients(lightning_example):
    torch.manual_seed(0)
    module = _recording(lightning_example)(resolver=_sum_resolver(), clip_grad_norm=1e9)
    initial = copy.deepcopy(module.net)
    _trainer(max_steps=2).fit(module, lightning_example.make_loader(4))
    for step in range(2):
        net = copy.deepcopy(initial)
        for p, w in zip(net.parameters(), module.weights[step], strict=True):
            p.data.copy_(w)
        expected = _expected_grads(lightning_example, net, module.batches[step], 4)
        for got, want in zip(module.grads[step], expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    # The optimizer moved the weights after each step.
    assert not torch.equal(module.weights[1][0], module.weights[0][0])


def test_lightning_conductor_state_travels_in_the_checkpoint(lightning_example):
    module = lightning_example.ConductedModule()
    _trainer(max_steps=2).fit(module, lightning_example.make_loader(4))
    checkpoint: dict[str, Any] = {}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["gcond"]["step"] == 2
    resumed = lightning_example.ConductedModule()
    resumed.on_load_checkpoint(checkpoint)
    _trainer(max_steps=1).fit(resumed, lightning_example.make_loader(4))
    assert resumed.history[0]["step"] == 3.0  # continued from the saved conductor


def test_lightning_fp16_scaler_is_wired(lightning_example):
    """The precision plugin's GradScaler (fp16 autocast, here on the CPU) reaches the conductor:
    the optimizer sees the unscaled gradient, and a non-finite step is skipped by the scaler,
    which backs off its scale."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    torch.manual_seed(0)
    module = _recording(lightning_example)(clip_grad_norm=0.5)
    x, reg, cls = lightning_example.make_dataset(n=3 * 64).tensors
    x[64 + 5, 0] = float("nan")  # the second step's batch
    loader = DataLoader(TensorDataset(x, reg, cls), batch_size=64)
    trainer = _trainer(max_steps=3, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    trainer.fit(module, loader)

    assert module.conductor.scaler is scaler
    assert module.conductor.autocast_dtype is torch.float16
    assert [s["skipped"] for s in module.history] == [0.0, 1.0, 0.0]
    for step in (0, 2):  # what the optimizer got is what the conductor wrote, unscaled
        written = module.history[step]["final_grad_norm"]
        assert _norm(module.grads[step]) == pytest.approx(written, rel=1e-5)
        # ... and the unscaled gradient was clipped, at 0.5
        assert module.clipped_norms[step] == pytest.approx(min(written, 0.5), rel=1e-5)
    for before, after in zip(module.weights[1], module.weights[2], strict=True):
        assert torch.equal(before, after)  # the skipped step left the weights alone
    assert scaler.get_scale() == 2.0**9  # backed off once


# ---------------------------------------------------------------------------------- Accelerate


@pytest.fixture
def accelerate_example() -> Any:
    pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)  # each test picks its own mixed precision
    yield _load("accelerate_conductor")
    AcceleratorState._reset_state(True)


def test_accelerate_example_trains(accelerate_example):
    from accelerate import Accelerator

    result = accelerate_example.main(steps=STEPS, accelerator=Accelerator(cpu=True))
    _check_statistics(result["history"], STEPS)
    print(f"accelerate: validation loss {result['before']:.4f} -> {result['after']:.4f}")
    assert result["after"] < 0.8 * result["before"]
    conductor_model = result["model"]
    assert conductor_model.trunk[0].weight.grad is not None


def test_accelerate_gradient_is_the_mean_of_micro_batch_gradients(accelerate_example):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = accelerate_example.TwoTaskNet()
    initial = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    conductor = accelerate_example.build_conductor(accelerator, model, 4, resolver=_sum_resolver())
    batch = list(accelerate_example.make_dataset(n=64).tensors)
    stats = accelerate_example.train_step(
        accelerator, conductor, optimizer, scheduler, batch, clip_grad_norm=1e9
    )
    expected = _expected_grads(accelerate_example, initial, batch, 4)
    for p, want in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, want, rtol=1e-5, atol=1e-7)
    assert stats["final_grad_norm"] == pytest.approx(_norm(expected), rel=1e-5)
    assert not torch.equal(model.trunk[0].weight, initial.trunk[0].weight)


def test_accelerate_bf16_reaches_the_conductor(accelerate_example):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    result = accelerate_example.main(steps=3, accelerator=accelerator)
    assert len(result["history"]) == 3
    conductor = accelerate_example.build_conductor(accelerator, result["model"], 4)
    assert conductor.autocast_dtype is torch.bfloat16 and conductor.scaler is None


# ---------------------------------------------------------------------------------- the page

EXCERPT = re.compile(r"<!-- excerpt: (\S+) -->\n```python\n(.*?)```", flags=re.S)


def test_the_page_quotes_the_examples_literally():
    """Every block marked as an excerpt appears in its file as written (at some indentation)."""
    page = PAGE.read_text()
    excerpts = EXCERPT.findall(page)
    assert {Path(path).name for path, _ in excerpts} == {
        "lightning_conductor.py",
        "accelerate_conductor.py",
    }
    for path, code in excerpts:
        source = (REPO / path).read_text()
        assert any(textwrap.indent(code, " " * i) in source for i in range(0, 17, 4)), (
            f"docs/integrations.md quotes {path} out of date:\n{code}"
        )
