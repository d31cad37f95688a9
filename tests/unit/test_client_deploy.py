"""`fedsilo client start`'s environment: the SuperNode's executor polls for tasks every 0.1 s, not every second."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from client import cli, deploy, join
from client.compat import get_task_poll_interval
from client.deploy import SUPEREXEC_POLL_ENV, supernode_env
from client.site import SiteConfig


def test_the_executor_poll_interval_is_set_low_unless_the_operator_chose_one() -> None:
    env = supernode_env({"PATH": "/usr/bin"})
    assert env == {"PATH": "/usr/bin", SUPEREXEC_POLL_ENV: "0.1"}
    assert supernode_env({SUPEREXEC_POLL_ENV: "2"})[SUPEREXEC_POLL_ENV] == "2"


def test_flower_reads_and_accepts_the_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SUPEREXEC_POLL_ENV, raising=False)
    assert get_task_poll_interval() == 1.0  # Flower's default, what the SuperNode's executor used before
    monkeypatch.setenv(SUPEREXEC_POLL_ENV, supernode_env({})[SUPEREXEC_POLL_ENV])
    assert get_task_poll_interval() == pytest.approx(0.1)


def test_client_start_runs_the_supernode_with_that_environment(monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    monkeypatch.delenv(SUPEREXEC_POLL_ENV, raising=False)
    ran: dict[str, Any] = {}

    def start_supernode(site: str, config: Path, address: str, ca: Path | None, node_key: Path | None,
                        cmd: list[str], env: dict[str, str]) -> int:
        ran.update(site=site, address=address, ca=ca, node_key=node_key, cmd=cmd, env=env)
        return 0

    site = SimpleNamespace(name="cardiology", insecure=False, ca="ca.crt", node_key="cardiology", server="h:1")
    monkeypatch.setattr(deploy, "supernode_command", lambda *_a, **_k: ["flower-supernode"])
    monkeypatch.setattr(deploy, "install_gate", lambda: tmp_path)
    monkeypatch.setattr(join, "start_supernode", start_supernode)
    monkeypatch.setattr(SiteConfig, "from_toml", staticmethod(lambda _path: site))
    args = argparse.Namespace(site_config=tmp_path / "site.toml", port=9094, max_retries=None)
    assert cli._cmd_client_start(args) == 0
    assert ran["cmd"] == ["flower-supernode"] and ran["env"]["PATH"].split(os.pathsep)[0] == str(tmp_path)
    assert ran["env"][SUPEREXEC_POLL_ENV] == "0.1"
    assert (ran["site"], ran["address"], ran["ca"], ran["node_key"]) == ("cardiology", "h:1", Path("ca.crt"),
                                                                         Path("cardiology"))
