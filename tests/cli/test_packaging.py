"""The bundled recipes ship inside the package: installed from a wheel (not editable), from any
directory, `gcond recipes` lists them and `gcond train mae_l1_ssim` runs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The project installed from a freshly built wheel into a folder of its own."""
    root = tmp_path_factory.mktemp("wheel")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", root / "dist", REPO],
        check=True,
    )
    (wheel,) = (root / "dist").glob("gcond-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", root / "site", wheel], check=True)
    return root / "site"


def _gcond(site, cwd, *args, timeout=600):
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run(
        [sys.executable, "-m", "gcond_cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_recipes_are_listed_from_the_installed_package(installed, tmp_path):
    where = subprocess.run(
        [sys.executable, "-c", "import gcond_cli; print(gcond_cli.__file__)"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(installed)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert where.stdout.startswith(str(installed))  # not the repository's editable copy
    result = _gcond(installed, tmp_path, "recipes")
    assert result.returncode == 0, result.stderr
    for name in ("mae_l1_ssim", "multitask_rotation", "conflict_lab", "mae_stl10"):
        assert name in result.stdout
    assert (installed / "gcond_cli" / "recipes" / "mae_l1_ssim.yaml").is_file()


def test_a_bundled_recipe_trains_by_name_from_any_directory(installed, tmp_path):
    result = _gcond(
        installed,
        tmp_path,
        "train",
        "mae_l1_ssim",
        "--run-name",
        "smoke",
        "schedule.max_steps=1",
        "schedule.warmup_steps=0",
        "data.train_samples=64",
        "data.val_samples=8",
        "model.dim=32",
        "model.depth=1",
        "model.decoder_dim=32",
        "model.decoder_depth=1",
        "conductor.accumulation_steps=2",
        "log.tensorboard=false",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "runs" / "mae_l1_ssim" / "smoke" / "checkpoints" / "latest.pt").is_file()
