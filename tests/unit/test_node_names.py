"""`fedsilo server nodes` shows the name each department's node was registered with (Flower's listing has none)."""

from __future__ import annotations

import json
import stat
import subprocess
from pathlib import Path

import pytest

from common.errors import ConfigError
from server import deploy
from server.deploy import NODE_NAMES, list_nodes, read_node_names, register_node

LISTING = {"success": True, "nodes": [
    {"node-id": "111", "owner-name": "none", "status": "online", "created-at": "2026-12-07 10:00:00Z",
     "online-at": "2026-12-07 10:01:00Z", "online-elapsed": 5.0, "offline-at": "N/A", "deleted-at": "N/A"},
    {"node-id": "222", "owner-name": "none", "status": "registered", "created-at": "2026-12-07 10:02:00Z",
     "online-at": "N/A", "online-elapsed": 0.0, "offline-at": "N/A", "deleted-at": "N/A"},
    {"node-id": "333", "owner-name": "none", "status": "unregistered", "created-at": "2026-12-07 09:00:00Z",
     "online-at": "N/A", "online-elapsed": 0.0, "offline-at": "N/A", "deleted-at": "2026-12-07 09:30:00Z"},
]}


@pytest.fixture
def flower(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, ...]]:
    """A fake `flwr` CLI: registers nodes 111 then 222, lists LISTING."""
    calls: list[tuple[str, ...]] = []
    new_ids = iter([111, 222])

    def fake(_state: object, *args: str, capture: bool = True) -> subprocess.CompletedProcess[str]:
        calls.append(args)
        if args[:2] == ("supernode", "register"):
            return subprocess.CompletedProcess(args, 0, f"✅ SuperNode {next(new_ids)} registered successfully.\n", "")
        return subprocess.CompletedProcess(args, 0, json.dumps(LISTING), "")

    monkeypatch.setattr(deploy, "_flwr", fake)
    return calls


def test_the_registration_name_is_kept_privately_and_listed(tmp_path: Path, flower: list[tuple[str, ...]]) -> None:
    key = tmp_path / "radiology.pub"
    key.write_text("key")
    register_node(tmp_path, key, "radiology")
    register_node(tmp_path, key, "oncology")
    assert flower[0][-2:] == ("--name", "radiology")  # Flower is given the name too
    assert read_node_names(tmp_path) == {111: "radiology", 222: "oncology"}
    assert stat.S_IMODE((tmp_path / NODE_NAMES).stat().st_mode) == 0o600

    table = list_nodes(tmp_path).splitlines()
    assert table[0].split() == ["NODE", "ID", "NAME", "STATUS", "SINCE"]
    assert table[1].split() == ["111", "radiology", "online", "2026-12-07", "10:01:00Z"]
    assert table[2].split()[:3] == ["222", "oncology", "registered"]
    assert len(table) == 3  # the unregistered node only in --json, as in Flower's own table

    listed = json.loads(list_nodes(tmp_path, as_json=True))
    assert [(n["node-id"], n["name"]) for n in listed["nodes"]] == [("111", "radiology"), ("222", "oncology"),
                                                                    ("333", None)]
    assert listed["nodes"][0]["status"] == "online"  # Flower's fields as they were


def test_no_names_yet_and_an_unreadable_names_file(tmp_path: Path, flower: list[tuple[str, ...]]) -> None:
    assert "(unknown)" in list_nodes(tmp_path).splitlines()[1]
    (tmp_path / NODE_NAMES).write_text("{not json")
    with pytest.raises(ConfigError, match="unreadable"):
        list_nodes(tmp_path)
