"""Every Python example in docs/algorithm.md runs as written (each block stands alone)."""

from __future__ import annotations

import re

import pytest

from tests.helpers import REPO

ALGORITHM = REPO / "docs" / "algorithm.md"
BLOCKS = re.findall(r"```python\n(.*?)```", ALGORITHM.read_text(), flags=re.S)


def test_the_algorithm_page_has_python_examples():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("code", BLOCKS)
def test_algorithm_example_runs(code):
    exec(compile(code, str(ALGORITHM), "exec"), {})


def test_the_library_cites_only_documents_in_the_repository():
    root = ALGORITHM.parents[1]
    for path in [*(root / "gcond").glob("*.py"), ALGORITHM]:
        assert "SPEC" not in path.read_text(), path
