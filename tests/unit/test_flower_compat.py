"""Flower confined: every private Flower name fedsilo uses resolves through one compat module per side, and no
other module (fedsilo's or its tests') imports a private Flower module.

Public, and imported directly: the top-level names of the documented packages in `PUBLIC`. Everything else in
`flwr` (`flwr.common.secure_aggregation.*`, `flwr.supercore.*`, `flwr.superlink.*`, `flwr.supernode.*`,
`flwr.cli.*`, `flwr.server.workflow.constant`, `flwr.clientapp.typing`, ...) goes through `client.compat`,
`server.compat` or `common.compat`.
"""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path
from types import ModuleType

import flwr
import pytest

from client import compat as client_compat
from common import compat as common_compat
from server import compat as server_compat

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("client", "common", "server", "simulations", "tests")
COMPAT_MODULES = (client_compat, common_compat, server_compat)
COMPAT_FILES = {ROOT / "client" / "compat.py", ROOT / "common" / "compat.py", ROOT / "server" / "compat.py"}
PUBLIC = frozenset({
    "flwr", "flwr.app", "flwr.serverapp", "flwr.clientapp", "flwr.client", "flwr.client.mod", "flwr.server",
    "flwr.server.workflow", "flwr.server.strategy", "flwr.common", "flwr.simulation",
})
FLWR_NAME = re.compile(r"flwr(\.[A-Za-z_]\w*)+")


def _names() -> list[tuple[ModuleType, str, str]]:
    return [(module, name, target) for module in COMPAT_MODULES for name, target in module.FLOWER_NAMES.items()]


@pytest.mark.parametrize(("module", "name", "target"), _names(),
                         ids=[f"{m.__name__}.{n}" for m, n, _ in _names()])
def test_each_compat_name_resolves_to_flowers_object(module: ModuleType, name: str, target: str) -> None:
    flower_module, _, attribute = target.partition(":")
    expected = importlib.import_module(flower_module)
    if attribute:
        expected = getattr(expected, attribute)
    assert getattr(module, name) is expected, f"{module.__name__}.{name} is not {target} in flwr {flwr.__version__}"


@pytest.mark.parametrize("module", COMPAT_MODULES, ids=[m.__name__ for m in COMPAT_MODULES])
def test_compat_modules_export_exactly_their_names(module: ModuleType) -> None:
    exported = set(module.__all__) - {"FLOWER_NAMES"}
    helpers = {"FlowerCompatError", "lazy_names", "resolve"} if module is common_compat else set()
    assert exported - helpers == set(module.FLOWER_NAMES)
    for target in module.FLOWER_NAMES.values():
        assert target.split(":")[0] not in PUBLIC, f"{target} is public: import it directly, not through compat"


def test_an_unknown_or_missing_name_fails_loudly() -> None:
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        _ = client_compat.not_a_name
    missing = common_compat.lazy_names({"gone": "flwr.app:NoSuchThing"}, {"__name__": "fake.compat"})
    with pytest.raises(common_compat.FlowerCompatError, match=r"flwr\.app:NoSuchThing"):
        missing("gone")


def _public(dotted: str, *, attribute_allowed: bool) -> bool:
    if dotted in PUBLIC:
        return True
    parent = dotted.rsplit(".", 1)[0]
    return attribute_allowed and parent in PUBLIC


def _private_uses(path: Path) -> list[str]:
    """Private Flower modules `path` imports: import statements, and module paths in strings (importlib,
    pytest.importorskip, mock.patch targets)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] == "flwr" and a.name not in PUBLIC]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "flwr":
            if node.module == "flwr":
                found += [f"flwr.{a.name}" for a in node.names if f"flwr.{a.name}" not in PUBLIC]
            elif node.module not in PUBLIC:
                found.append(node.module)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and FLWR_NAME.fullmatch(node.value):
            if not _public(node.value, attribute_allowed=True):
                found.append(node.value)
    return [f"{path.relative_to(ROOT)}:{name}" for name in found]


def test_no_module_outside_the_compat_modules_imports_private_flower() -> None:
    skip = {*COMPAT_FILES, Path(__file__).resolve()}  # this file names private modules as test data
    files = [p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py")) if p not in skip]
    assert len(files) > 50
    offenders = [use for path in files for use in _private_uses(path)]
    assert offenders == [], "private Flower modules imported outside client/server/common compat: " + \
        ", ".join(offenders)


def test_the_scan_catches_each_kind_of_private_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import flwr.proto\nfrom flwr.common.constant import ErrorCode\nfrom flwr import supercore\n"
                   "from flwr.app import Message\nimport importlib\n"
                   "importlib.import_module('flwr.superlink.main')\nX = 'flwr.simulation.run_simulation'\n")
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    assert sorted(u.split(":", 1)[1] for u in _private_uses(bad)) == [
        "flwr.common.constant", "flwr.proto", "flwr.supercore", "flwr.superlink.main"]
