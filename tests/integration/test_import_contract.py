"""The import contract of pyproject.toml ([tool.importlinter]) holds, and it catches a violation."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def _lint(root: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=root, capture_output=True, text=True,
                          timeout=300, check=False, env=env)


def test_contract_holds() -> None:
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def test_contract_catches_an_upward_import(tmp_path: Path) -> None:
    copy = tmp_path / "tree"
    copy.mkdir()
    shutil.copy(ROOT / "pyproject.toml", copy)
    for package in ("common", "client", "server", "simulations"):
        shutil.copytree(ROOT / package, copy / package, ignore=shutil.ignore_patterns("__pycache__"))
    paths = copy / "common" / "paths.py"
    paths.write_text(paths.read_text() + "\nimport client.site  # noqa\n")
    result = _lint(copy, env={"PYTHONPATH": str(copy), "PATH": str(LINT_IMPORTS.parent)})
    assert result.returncode != 0
    assert "BROKEN" in result.stdout and "common.paths -> client.site" in result.stdout
