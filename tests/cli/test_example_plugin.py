"""The example project's plugin file (examples/shapes/shapes.py) keeps the harness's contracts:
model, data provider (shapes, determinism, exact resume), losses, evaluate. It is imported by
file path, as the harness does with ``--plugin``."""

from __future__ import annotations

import importlib.util
import math
from types import ModuleType

import pytest
import torch
from torch import nn

from tests.helpers import REPO

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def shapes() -> ModuleType:
    path = REPO / "examples" / "shapes" / "shapes.py"
    spec = importlib.util.spec_from_file_location("example_shapes", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def small(shapes: ModuleType, seed: int = 0, **args: object):
    return shapes.make_data(seed, CPU, **{"micro_batch_size": 8, "image_size": 16, **args})


def assert_same_batch(a, b) -> None:
    assert torch.equal(a[0], b[0])
    assert a[1].keys() == b[1].keys()
    for key in a[1]:
        assert torch.equal(a[1][key], b[1][key]), key


def test_a_micro_batch_is_images_and_a_dict_of_targets(shapes: ModuleType) -> None:
    images, target = small(shapes).train()()
    assert images.shape == (8, 3, 16, 16) and images.dtype == torch.float32
    assert set(target) == {"shape", "size", "centre"}
    assert target["shape"].shape == (8,) and target["shape"].dtype == torch.int64
    assert target["shape"].min() >= 0 and target["shape"].max() < len(shapes.SHAPES)
    assert target["size"].shape == (8,) and target["size"].dtype == torch.float32
    assert (target["size"] > 0).all() and (target["size"] < 16).all()  # pixels, inside the image
    assert target["centre"].shape == (8, 2) and target["centre"].dtype == torch.float32
    assert (target["centre"] > 0).all() and (target["centre"] < 1).all()


def test_the_stream_is_a_function_of_the_seed(shapes: ModuleType) -> None:
    first, again, other = (
        small(shapes, 3).train(),
        small(shapes, 3).train(),
        small(shapes, 4).train(),
    )
    a, b = first(), first()
    assert_same_batch(a, again())
    assert_same_batch(b, again())
    assert not torch.equal(a[0], b[0])  # each call is a fresh micro-batch
    assert not torch.equal(a[0], other()[0])


def test_validation_is_fixed_and_the_same_for_every_seed(shapes: ModuleType) -> None:
    data = small(shapes, 0, val_samples=10, val_batch_size=4)
    val = data.val()
    assert [len(images) for images, _ in val] == [4, 4, 2]
    assert data.val() is val
    for a, b in zip(val, small(shapes, 1, val_samples=10, val_batch_size=4).val(), strict=True):
        assert_same_batch(a, b)


def test_state_dict_resumes_the_exact_stream(shapes: ModuleType) -> None:
    data = small(shapes, 5)
    provider = data.train()
    provider(), provider()
    state = data.state_dict()
    assert state == {"micro_batches_served": 2}
    expected = provider()

    resumed = small(shapes, 5)
    resumed.load_state_dict(state)
    assert_same_batch(resumed.train()(), expected)
    assert resumed.state_dict() == {"micro_batches_served": 3}


def test_each_outline_is_the_shape_it_names(shapes: ModuleType) -> None:
    # Signed distances at the centre: circumradius 6 -> circle 6, triangle's inradius 3,
    # square's half side 6·cos 45°, cross's half bar width 2.
    zero = torch.zeros(4, 1, 1)
    inside = shapes._inside(torch.arange(4), zero, zero, torch.full((4, 1, 1), 6.0))
    expected = torch.tensor([6.0, 3.0, 6 * math.cos(math.pi / 4), 2.0])
    torch.testing.assert_close(inside.flatten(), expected)
    # Areas on a fine grid, against the closed forms (circumradius 1).
    axis = torch.linspace(-1.2, 1.2, 801)
    v, u = torch.meshgrid(axis, axis, indexing="ij")
    pixel = (axis[1] - axis[0]) ** 2
    areas = [
        (shapes._inside(torch.tensor([k]), u[None], v[None], torch.ones(1, 1, 1)) > 0).sum() * pixel
        for k in range(4)
    ]
    closed = [math.pi, 3 * math.sqrt(3) / 4, 2.0, 20 / 9]  # circle, triangle, square, cross
    torch.testing.assert_close(torch.stack(areas), torch.tensor(closed), rtol=5e-3, atol=0)


def test_the_model_answers_every_head(shapes: ModuleType) -> None:
    torch.manual_seed(0)
    model = shapes.build_model(width=4, hidden=8)
    for side in (16, 32):
        output = model(torch.zeros(2, 3, side, side))
        assert {k: tuple(v.shape) for k, v in output.items()} == {
            "shape": (2, 4),
            "size": (2,),
            "centre": (2, 2),
        }


def test_losses_on_hand_made_outputs(shapes: ModuleType) -> None:
    output = {
        "shape": torch.zeros(2, 4),
        "size": torch.tensor([1.0, 2.0]),
        "centre": torch.tensor([[0.5, 0.5], [0.0, 1.0]]),
    }
    target = {
        "shape": torch.tensor([0, 3]),
        "size": torch.zeros(2),
        "centre": torch.tensor([[0.5, 0.5], [0.5, 0.5]]),
    }
    torch.testing.assert_close(shapes.shape_loss(output, target), torch.tensor(math.log(4)))
    torch.testing.assert_close(shapes.size_loss(output, target), torch.tensor(2.5))
    torch.testing.assert_close(shapes.centre_loss(output, target), torch.tensor(0.125))


def test_the_losses_start_at_clearly_different_scales(shapes: ModuleType) -> None:
    torch.manual_seed(0)
    model = shapes.build_model()
    images, target = shapes.make_data(0, CPU).train()()
    output = model(images)
    losses = {name: getattr(shapes, f"{name}_loss")(output, target) for name in target}
    assert all(loss.shape == () for loss in losses.values())
    assert losses["size"] > 30 * losses["shape"]
    assert losses["shape"] > 5 * losses["centre"]


class Fixed(nn.Module):
    """Always shape 0, size 10 px, centre in the middle."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Linear(1, 1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        count = images.shape[0]
        logits = torch.tensor([1.0, 0.0, 0.0, 0.0]).expand(count, 4)
        return {
            "shape": logits,
            "size": torch.full((count,), 10.0),
            "centre": torch.full((count, 2), 0.5),
        }


def test_evaluate_on_a_model_of_known_answers(shapes: ModuleType) -> None:
    images = torch.zeros(2, 3, 16, 16)
    batches = [
        (images, {"shape": torch.tensor([0, 1]), "size": torch.tensor([12.0, 7.0]),
                  "centre": torch.tensor([[0.5, 0.5], [0.5, 0.75]])}),
        (images[:1], {"shape": torch.tensor([0]), "size": torch.tensor([10.0]),
                      "centre": torch.tensor([[0.25, 0.5]])}),
    ]  # fmt: skip
    model = Fixed().train()
    metrics = shapes.evaluate(model, batches)
    # accuracy 2/3; size errors 2, 3, 0 px; centre distances 0, 0.25·16, 0.25·16 px.
    assert metrics == pytest.approx({"accuracy": 2 / 3, "size_mae": 5 / 3, "centre_mae": 8 / 3})
    assert all(type(value) is float for value in metrics.values())
    assert model.training  # evaluate puts the model back in the mode it found


def test_evaluate_returns_floats_on_the_real_model(shapes: ModuleType) -> None:
    torch.manual_seed(0)
    model = shapes.build_model(width=4, hidden=8)
    metrics = shapes.evaluate(model, small(shapes, val_samples=8, val_batch_size=8).val())
    assert set(metrics) == {"accuracy", "size_mae", "centre_mae"}
    assert all(type(value) is float and math.isfinite(value) for value in metrics.values())


def test_too_small_an_image_is_refused(shapes: ModuleType) -> None:
    with pytest.raises(ValueError, match=r"image_size: 8 .* use >= 16"):
        shapes.make_data(0, CPU, image_size=8)
