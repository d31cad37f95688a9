"""Generated benchmark docs: each command rewrites only its own section, atomically, and refuses a broken file."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.errors import FedsiloError
from simulations.docs import HEADER, update_section


def test_sections_are_added_then_replaced_in_place(tmp_path: Path) -> None:
    doc = tmp_path / "docs" / "benchmarks.md"
    update_section(doc, "bench", "bench v1")
    update_section(doc, "study", "study v1")
    update_section(doc, "bench", "bench v2")
    text = doc.read_text()
    assert text.startswith(HEADER.splitlines()[0])
    assert "bench v1" not in text and "bench v2" in text and "study v1" in text
    assert text.index("bench v2") < text.index("study v1")  # replaced where it was
    assert text.count("<!-- fedsilo:bench:start -->") == 1


def test_hand_written_text_outside_sections_is_kept(tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# mine\n\nnotes\n")
    update_section(doc, "bench", "figures")
    assert doc.read_text().startswith("# mine\n\nnotes\n")


def test_a_start_marker_without_end_is_refused_and_the_file_kept(tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    broken = "x\n<!-- fedsilo:bench:start -->\nold\n"
    doc.write_text(broken)
    with pytest.raises(FedsiloError, match="no end marker"):
        update_section(doc, "bench", "new")
    assert doc.read_text() == broken
