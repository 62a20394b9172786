"""A run directory's files and their readers (`gcond_cli.run.files`), and the checksum of a
micro-batch that compare records per run."""

import json
from pathlib import Path

from gcond_cli.run import files
from gcond_cli.run.parts import FirstBatchRecorder, batch_checksum


def test_records_skip_damaged_lines(tmp_path: Path) -> None:
    path = tmp_path / files.METRICS_FILE
    good = [{"kind": "train", "step": 1}, {"kind": "eval", "step": 1, "eval/l1": 0.5}]
    path.write_text("\n".join([json.dumps(good[0]), '{"kind": "tra', json.dumps(good[1]), "[1]"]))
    assert files.read_metrics(tmp_path) == good
    assert files.read_metrics(tmp_path / "missing") == []


def test_statistics_keys_are_read_here() -> None:
    stats = {"nonfinite/l1": 1.0, "nonfinite/ssim": 0.0, "min_cosine_sim": -0.5}
    assert files.nonfinite_losses(stats) == ["l1"]
    assert files.min_cosine(stats) == -0.5 and files.min_cosine({}) is None
    assert files.norm_ratio({"raw_norm/a": 2.0, "raw_norm/b": 0.5}) == 4.0
    assert files.norm_ratio({"raw_norm/a": 2.0}) is None


def test_first_batch_is_recorded_once(tmp_path: Path) -> None:
    import torch

    batches = iter([(torch.ones(2), torch.zeros(2)), (torch.zeros(2), torch.ones(2))])
    recorder = FirstBatchRecorder(lambda: next(batches), tmp_path / files.FIRST_BATCH_FILE)
    first = recorder()
    recorder()
    assert files.read_first_batch(tmp_path) == batch_checksum(first)
    assert files.read_first_batch(tmp_path / "missing") is None


def test_batch_checksum_sees_images_masks_and_targets() -> None:
    import torch

    images = torch.rand(2, 3, 4, 4)
    mask = torch.tensor([[True, False], [False, True]])
    batch = ((images, mask), {"image": images, "mask": mask.float()})
    same = ((images.clone(), mask.clone()), {"mask": mask.float(), "image": images.clone()})
    assert batch_checksum(batch) == batch_checksum(same)
    flipped = ((images, ~mask), {"image": images, "mask": mask.float()})
    assert batch_checksum(flipped) != batch_checksum(batch)
