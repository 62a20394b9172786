"""Paths every test folder uses, defined once."""

from pathlib import Path

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
TINY = TESTS / "recipes" / "tiny.yaml"  # synthetic data, a one-block ViT, a handful of steps
DATA = TESTS / "data"
