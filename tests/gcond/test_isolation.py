"""``gcond/`` must stay copyable into another project: it imports only torch and the stdlib."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import gcond

PACKAGE = Path(gcond.__file__).resolve().parent


def test_source_imports_only_torch_and_the_standard_library():
    allowed = set(sys.stdlib_module_names) | {"torch", "__future__"}
    for path in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = [node.module.split(".")[0]]
            else:
                continue
            for root in roots:
                assert root in allowed, f"{path.name} imports {root}"


@pytest.mark.slow  # a fresh interpreter
def test_importing_gcond_loads_nothing_beyond_torch_and_the_standard_library():
    # Import torch first, then gcond, in a fresh interpreter, and list what gcond added.
    code = (
        "import sys, torch\n"
        "before = set(sys.modules)\n"
        f"sys.path.insert(0, {str(PACKAGE.parent)!r})\n"
        "import gcond\n"
        "added = {m.split('.')[0] for m in set(sys.modules) - before}\n"
        "print(sorted(added - set(sys.stdlib_module_names) - {'gcond', 'torch'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
