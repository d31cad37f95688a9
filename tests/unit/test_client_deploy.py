"""`fedsilo client start`'s environment: the SuperNode's executor polls for tasks every 0.1 s, not every second."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from client import cli, deploy
from client.compat import get_task_poll_interval
from client.deploy import SUPEREXEC_POLL_ENV, supernode_env


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

    def exec_tool(cmd: list[str], env: dict[str, str] | None = None, *, path_first: Path | None = None) -> int:
        ran.update(cmd=cmd, env=env, path_first=path_first)
        return 0

    monkeypatch.setattr(deploy, "supernode_command", lambda *_a, **_k: ["flower-supernode"])
    monkeypatch.setattr(deploy, "install_gate", lambda: tmp_path)
    monkeypatch.setattr(cli, "exec_tool", exec_tool)
    args = argparse.Namespace(site_config=tmp_path / "site.toml", port=9094, max_retries=None)
    assert cli._cmd_client_start(args) == 0
    assert ran["cmd"] == ["flower-supernode"] and ran["path_first"] == tmp_path
    assert ran["env"][SUPEREXEC_POLL_ENV] == "0.1"
