"""The measured tables of the README and docs/algorithm.md are what the committed
``summary.json`` files say.

A table made by ``docs/tables.py`` is preceded by its arguments in an HTML comment
(``<!-- tables: entries --metric ... docs/quality/x/*/summary.json -->``); this test remakes
every such table from the committed files and compares it with the page's, line for line.
``python docs/tables.py refresh README.md docs/algorithm.md`` remakes them all.
"""

from __future__ import annotations

import importlib.util
import shlex

import pytest

from tests.helpers import REPO

PAGES = [REPO / "README.md", REPO / "docs" / "algorithm.md"]


def _tables_module():
    spec = importlib.util.spec_from_file_location("docs_tables", REPO / "docs" / "tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tables = _tables_module()
MARKED = [found for page in PAGES for found in tables.MARKED.findall(page.read_text())]


def test_the_pages_mark_their_measured_tables():
    assert len(MARKED) >= 6


@pytest.mark.parametrize(("args", "table"), MARKED, ids=[a[:70] for a, _ in MARKED])
def test_a_measured_table_is_what_its_summaries_say(args: str, table: str, monkeypatch):
    monkeypatch.chdir(REPO)
    assert tables.table(shlex.split(args)).splitlines() == table.strip().splitlines()
