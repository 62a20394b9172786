"""What every test folder shares: the `cuda` mark skips cleanly where there is no GPU, and the
in-process command line."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from typer.testing import CliRunner, Result


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test marked `cuda` is skipped, with one reason, on a machine without CUDA."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def cli() -> Callable[..., Result]:
    """``cli("validate", RECIPE, ...)``: the real `gcond` command line, run in-process."""
    from gcond_cli.app import app

    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args])
