import io
import socket

import pytest
import torch
import torch.nn.functional as F

from gcond_cli.data import (
    EMBEDDED_TRAIN_SOURCES,
    EMBEDDED_VAL_SOURCES,
    FACES,
    FACES_TRAIN,
    DatasetError,
    DeviceDataProvider,
    ImageSet,
    build_datasets,
    build_val_batches,
    num_masked_patches,
)
from gcond_cli.recipe import ImageDataConfig


def data_cfg(**overrides: object) -> ImageDataConfig:
    settings = {
        "dataset": "synthetic",
        "image_size": 16,
        "micro_batch_size": 8,
        "train_samples": 32,
        "val_samples": 12,
        "mask": {"ratio": 0.75, "patch_size": 4},
        "augment": {
            "hflip": 0.5,
            "vflip": 0.5,
            "brightness": 0.2,
            "contrast": 0.2,
            "saturation": 0.2,
            "hue": 0.05,
        },
    }
    settings.update(overrides)
    return ImageDataConfig.model_validate(settings)


@pytest.fixture(scope="module")
def synthetic() -> tuple[ImageSet, ImageSet]:
    return build_datasets(data_cfg(), seed=0)


def one_image_set() -> ImageSet:
    """A single textured image: any difference between samples comes from augmentation."""
    ramp = torch.linspace(0, 255, 32)
    image = torch.stack(
        [
            ramp.view(1, -1).expand(32, 32),
            ramp.view(-1, 1).expand(32, 32),
            (ramp.view(1, -1) * ramp.view(-1, 1) / 255).expand(32, 32),
        ]
    )
    return ImageSet(image.round().to(torch.uint8).unsqueeze(0), torch.zeros(1, dtype=torch.int64))


def test_embedded_loads_offline_with_disjoint_real_sources(monkeypatch: pytest.MonkeyPatch):
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("the embedded dataset tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    cfg = data_cfg(dataset="embedded", train_samples=len(EMBEDDED_TRAIN_SOURCES), val_samples=8)
    train, val = build_datasets(cfg, seed=0)

    assert not set(EMBEDDED_TRAIN_SOURCES) & set(EMBEDDED_VAL_SOURCES)
    assert train.images.shape == (len(EMBEDDED_TRAIN_SOURCES), 3, 32, 32)
    assert val.images.shape == (8, 3, 32, 32)
    assert train.images.dtype == val.images.dtype == torch.uint8
    assert train.labels is None and val.labels is None
    # Real photographs: every crop has texture, and crops are not duplicates of each other.
    for images in (train.images, val.images):
        assert (images.float().flatten(1).std(1) > 2).all()
        assert len({tuple(image.flatten().tolist()) for image in images}) == len(images)
    again, _ = build_datasets(cfg, seed=0)
    other, _ = build_datasets(cfg, seed=1)
    assert torch.equal(train.images, again.images)
    assert not torch.equal(train.images, other.images)


def test_embedded_has_no_class_labels():
    with pytest.raises(DatasetError, match="labels"):
        build_datasets(data_cfg(dataset="embedded", labels="class", train_samples=2), seed=0)


def test_faces_are_the_bundled_lfw_faces_split_and_cycled(monkeypatch: pytest.MonkeyPatch):
    import skimage.data

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("the faces dataset tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    cfg = data_cfg(dataset="faces", image_size=16, val_samples=60)
    train, val = build_datasets(cfg, seed=0)

    # The 100 faces, grey in all three channels, resized from 25 px to the pool side (2·16).
    faces = torch.from_numpy(skimage.data.lfw_subset()[:FACES]).float().mul(255).round()
    expected = F.interpolate(
        faces.unsqueeze(1), size=32, mode="bilinear", align_corners=False, antialias=True
    )
    expected = expected.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1)
    assert (FACES, FACES_TRAIN) == (100, 75)
    assert train.images.shape == (75, 3, 32, 32) and val.images.shape == (60, 3, 32, 32)
    assert train.images.dtype == val.images.dtype == torch.uint8
    assert train.labels is None and val.labels is None
    assert torch.equal(train.images, expected[:75])
    # Validation: the 25 held-out faces, then the same mirrored, then the first 10 again.
    assert torch.equal(val.images[:25], expected[75:])
    assert torch.equal(val.images[25:50], expected[75:].flip(-1))
    assert torch.equal(val.images[50:], expected[75:85])
    again, again_val = build_datasets(cfg, seed=1)  # the same for every seed
    assert torch.equal(train.images, again.images) and torch.equal(val.images, again_val.images)


def test_synthetic_sets(synthetic: tuple[ImageSet, ImageSet]):
    train, val = synthetic
    assert train.images.shape == (32, 3, 32, 32) and val.images.shape == (12, 3, 32, 32)
    assert train.labels.dtype == torch.int64 and train.num_classes == 4
    assert set(train.labels.tolist()) <= {0, 1, 2, 3}
    assert not torch.equal(train.images[:12], val.images)


def test_imagefolder_errors_are_clear(tmp_path):
    with pytest.raises(DatasetError, match=r"data\.root"):
        build_datasets(data_cfg(dataset="imagefolder", root=str(tmp_path)), seed=0)
    with pytest.raises(DatasetError, match="does not exist"):
        build_datasets(data_cfg(dataset="imagefolder", root=str(tmp_path / "missing")), seed=0)


def test_imagefolder_loads_classes_and_holds_out_validation(tmp_path):
    from PIL import Image

    for label, name in enumerate(["cats", "dogs"]):
        (tmp_path / name).mkdir()
        for i in range(5):
            colour = (40 * i, 200 * label, 90)
            Image.new("RGB", (40 + 7 * i, 30), colour).save(tmp_path / name / f"{i}.png")
    train, val = build_datasets(
        data_cfg(dataset="imagefolder", root=str(tmp_path), val_samples=3, micro_batch_size=4),
        seed=0,
    )
    assert train.images.shape == (7, 3, 32, 32) and val.images.shape == (3, 3, 32, 32)
    assert train.num_classes == 2
    assert sorted(train.labels.tolist() + val.labels.tolist()) == [0] * 5 + [1] * 5


def test_cifar10_missing_tells_the_user_what_to_set(tmp_path):
    with pytest.raises(DatasetError, match=r"data\.download: true"):
        build_datasets(data_cfg(dataset="cifar10", root=str(tmp_path)), seed=0)


def test_batch_shapes_dtypes_and_ranges(synthetic: tuple[ImageSet, ImageSet]):
    cfg = data_cfg(labels="class")
    (images, patch_mask), target = DeviceDataProvider(synthetic[0], cfg, "cpu", seed=0)()
    assert images.shape == (8, 3, 16, 16) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    assert patch_mask.shape == (8, 4, 4) and patch_mask.dtype == torch.bool
    assert target["image"] is images
    assert target["mask"].shape == (8, 1, 16, 16) and target["mask"].dtype == torch.float32
    assert torch.equal(target["mask"][:, 0, ::4, ::4], patch_mask.float())
    assert target["label"].dtype == torch.int64 and target["label"].shape == (8,)


def test_no_label_key_without_labels(synthetic: tuple[ImageSet, ImageSet]):
    _, target = DeviceDataProvider(synthetic[0], data_cfg(), "cpu", seed=0)()
    assert "label" not in target


def test_augmentation_is_drawn_per_sample():
    provider = DeviceDataProvider(one_image_set(), data_cfg(micro_batch_size=16), "cpu", seed=0)
    (images, _), _ = provider()
    flat = images.flatten(1)
    assert (torch.cdist(flat, flat) + torch.eye(16) > 1e-3).all()  # every pair differs


def test_full_crop_without_jitter_reproduces_the_image():
    image_set = one_image_set()
    cfg = data_cfg(
        image_size=32,
        micro_batch_size=2,
        augment={"crop_scale": (1.0, 1.0), "crop_ratio": (1.0, 1.0), "hflip": 0.0},
    )
    (images, _), _ = DeviceDataProvider(image_set, cfg, "cpu", seed=0)()
    expected = image_set.images.float() / 255
    torch.testing.assert_close(images, expected.expand(2, -1, -1, -1), atol=1e-5, rtol=0)


def test_hue_and_saturation_keep_grey_images_grey():
    grey = ImageSet(one_image_set().images[:, :1].expand(1, 3, 32, 32).contiguous(), None)
    cfg = data_cfg(
        image_size=32,
        micro_batch_size=4,
        augment={
            "crop_scale": (1.0, 1.0),
            "crop_ratio": (1.0, 1.0),
            "hflip": 0.0,
            "saturation": 0.9,
            "hue": 0.5,
        },
    )
    (images, _), _ = DeviceDataProvider(grey, cfg, "cpu", seed=0)()
    expected = grey.images.float() / 255
    torch.testing.assert_close(images, expected.expand(4, -1, -1, -1), atol=1e-4, rtol=0)


def test_rotation_labels_match_the_rotation():
    image_set = one_image_set()
    cfg = data_cfg(
        image_size=32,
        micro_batch_size=16,
        labels="rotation",
        augment={"crop_scale": (1.0, 1.0), "crop_ratio": (1.0, 1.0), "hflip": 0.0},
    )
    (images, _), target = DeviceDataProvider(image_set, cfg, "cpu", seed=0)()
    upright = image_set.images[0].float() / 255
    assert set(target["label"].tolist()) == {0, 1, 2, 3}
    for image, k in zip(images, target["label"].tolist(), strict=True):
        torch.testing.assert_close(image, torch.rot90(upright, k, dims=(-2, -1)), atol=1e-5, rtol=0)


def test_masks_have_exact_count_and_differ(synthetic: tuple[ImageSet, ImageSet]):
    cfg = data_cfg(micro_batch_size=16, mask={"ratio": 0.6, "patch_size": 4})
    (_, patch_mask), _ = DeviceDataProvider(synthetic[0], cfg, "cpu", seed=0)()
    expected = num_masked_patches(0.6, 16)
    assert expected == round(0.6 * 16)
    assert (patch_mask.flatten(1).sum(1) == expected).all()
    assert len({tuple(m.flatten().tolist()) for m in patch_mask}) > 1


def batches(provider: DeviceDataProvider, count: int) -> list[torch.Tensor]:
    out = []
    for _ in range(count):
        (images, patch_mask), target = provider()
        out.append((images, patch_mask, target.get("label")))
    return out


def assert_same(first: list, second: list) -> None:
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert (a[2] is None and b[2] is None) or torch.equal(a[2], b[2])


def test_stream_is_reproducible_from_the_seed(synthetic: tuple[ImageSet, ImageSet]):
    cfg = data_cfg(labels="rotation")
    first = batches(DeviceDataProvider(synthetic[0], cfg, "cpu", seed=3), 6)  # spans epochs
    assert_same(first, batches(DeviceDataProvider(synthetic[0], cfg, "cpu", seed=3), 6))
    other = batches(DeviceDataProvider(synthetic[0], cfg, "cpu", seed=4), 1)
    assert not torch.equal(first[0][0], other[0][0])


def test_epochs_visit_every_sample_once(synthetic: tuple[ImageSet, ImageSet]):
    provider = DeviceDataProvider(synthetic[0], data_cfg(micro_batch_size=8), "cpu", seed=0)
    seen = torch.cat([provider._next_indices(8) for _ in range(4)])
    assert sorted(seen.tolist()) == list(range(32))
    assert provider.epoch == 0 and provider.position == 32


@pytest.mark.parametrize("through_file", [False, True])
def test_state_dict_round_trip(synthetic: tuple[ImageSet, ImageSet], through_file: bool):
    cfg = data_cfg(micro_batch_size=12, labels="rotation")  # 12 ∤ 32: batches cross epochs
    provider = DeviceDataProvider(synthetic[0], cfg, "cpu", seed=0)
    batches(provider, 3)
    state = provider.state_dict()
    if through_file:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        state = torch.load(buffer, weights_only=True)
    expected = batches(provider, 2)

    resumed = DeviceDataProvider(synthetic[0], cfg, "cpu", seed=0)
    resumed.load_state_dict(state)
    assert resumed.micro_batches_served == 3
    assert_same(expected, batches(resumed, 2))


def test_state_dict_rejects_another_dataset(synthetic: tuple[ImageSet, ImageSet]):
    state = DeviceDataProvider(synthetic[0], data_cfg(), "cpu", seed=0).state_dict()
    small = ImageSet(synthetic[0].images[:10], synthetic[0].labels[:10])
    with pytest.raises(ValueError, match="same data settings"):
        DeviceDataProvider(small, data_cfg(), "cpu", seed=0).load_state_dict(state)


def test_ranks_draw_disjoint_shards(synthetic: tuple[ImageSet, ImageSet]):
    cfg = data_cfg()
    shards = [
        DeviceDataProvider(synthetic[0], cfg, "cpu", seed=0, rank=rank, world_size=2)
        for rank in range(2)
    ]
    first, second = (torch.cat([p._next_indices(8) for _ in range(2)]) for p in shards)
    assert not set(first.tolist()) & set(second.tolist())
    (images_0, mask_0), _ = shards[0]()
    (images_1, mask_1), _ = shards[1]()
    assert not torch.equal(images_0, images_1) and not torch.equal(mask_0, mask_1)


def test_val_batches_are_fixed(synthetic: tuple[ImageSet, ImageSet]):
    cfg = data_cfg(labels="rotation")
    first = build_val_batches(synthetic[1], cfg, "cpu", seed=0, batch_size=5)
    second = build_val_batches(synthetic[1], cfg, "cpu", seed=0, batch_size=5)
    assert [x[0].shape[0] for x, _ in first] == [5, 5, 2]
    for (x, target), (y, other) in zip(first, second, strict=True):
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])
        assert torch.equal(target["label"], other["label"])
        assert (x[1].flatten(1).sum(1) == num_masked_patches(0.75, 16)).all()
        assert x[0].dtype == torch.float32 and x[0].min() >= 0 and x[0].max() <= 1


def test_val_class_labels(synthetic: tuple[ImageSet, ImageSet]):
    batches = build_val_batches(synthetic[1], data_cfg(labels="class"), "cpu", 0, batch_size=64)
    assert torch.equal(batches[0][1]["label"], synthetic[1].labels)
