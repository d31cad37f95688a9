"""docs/configuration.md is generated from the help text declared with each config field, and kept current."""

from __future__ import annotations

from pathlib import Path

from client.policy import SitePolicy
from client.site import SiteConfig
from common.config import JobConfig, SimulationConfig
from common.settings import settings_fields
from simulations.docs import CONFIGURATION_MD, configuration_markdown, main


def test_configuration_docs_are_current() -> None:
    assert CONFIGURATION_MD.read_text(encoding="utf-8") == configuration_markdown(), (
        "docs/configuration.md is stale: run `python -m simulations.docs`")


def test_the_docs_show_every_key_with_its_help() -> None:
    text = configuration_markdown()
    for cls in (JobConfig, SimulationConfig, SiteConfig, SitePolicy):
        for f in settings_fields(cls):
            assert f"| `{f.key}` |" in text, f.key
            assert f.spec.help.replace("|", "\\|") in text, f.key
    assert "| `batch-size` | int | `64` | positive | expected (Poisson) batch size of DP-SGD |" in text
    assert "| `epsilon` | float | *required* | positive |" in text


def test_check_mode_reports_a_stale_file(tmp_path: Path) -> None:
    path = tmp_path / "configuration.md"
    assert main(["--check", str(path)]) == 1  # missing
    assert main([str(path)]) == 0
    assert path.read_text(encoding="utf-8") == configuration_markdown()
    assert main(["--check", str(path)]) == 0
    path.write_text(path.read_text(encoding="utf-8").replace("batch-size", "batch_size"), encoding="utf-8")
    assert main(["--check", str(path)]) == 1
