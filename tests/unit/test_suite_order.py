"""The order `make test` runs the test modules in (tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import LONGEST_FIRST

TESTS = Path(__file__).resolve().parents[1]


def test_the_longest_modules_named_for_ordering_exist() -> None:
    """They are started first; a module renamed or removed would silently lose its place."""
    assert [name for name in LONGEST_FIRST if not (TESTS / name).is_file()] == []
