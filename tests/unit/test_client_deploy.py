"""`fedsilo client start`'s environment: the SuperNode's executor polls for tasks every 0.1 s, not every second, and
the SuperNode (`client.supernode`) waits the site's `poll_seconds` for a message, not 3 s, and 0.1 s for a reply."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import client.compat
import common.compat
from client import cli, deploy, join, supernode
from client.compat import SUPERNODE_LOOP, get_task_poll_interval, set_supernode_polls
from client.deploy import SUPEREXEC_POLL_ENV, THREADS_ENV, supernode_env
from client.executor import SITE_CONFIG_ENV
from client.site import SiteConfig
from client.supernode import HEARTBEAT_ENV, POLL_ENV, REPLY_POLL_ENV
from common.compat import FlowerCompatError, resolve


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

    site = SimpleNamespace(name="cardiology", insecure=False, ca="ca.crt", node_key="cardiology", server="h:1",
                           poll_seconds=0.25, heartbeat_seconds=12.0, threads=1)
    gate = tmp_path / "gate"
    gate.mkdir()
    monkeypatch.setattr(deploy, "supernode_command", lambda *_a, **_k: ["flower-supernode"])
    monkeypatch.setattr(deploy, "install_gate", lambda: gate)
    monkeypatch.setattr(join, "start_supernode", start_supernode)
    monkeypatch.setattr(SiteConfig, "from_toml", staticmethod(lambda _path: site))
    args = argparse.Namespace(site_config=tmp_path / "site.toml", port=9094, max_retries=None)
    assert cli._cmd_client_start(args) == 0
    assert ran["cmd"] == ["flower-supernode"] and ran["env"]["PATH"].split(os.pathsep)[0] == str(gate)
    assert ran["env"][SUPEREXEC_POLL_ENV] == "0.1"
    assert (ran["env"][POLL_ENV], ran["env"][REPLY_POLL_ENV]) == ("0.25", "0.1")  # the SuperNode's waits
    assert ran["env"][HEARTBEAT_ENV] == "12.0"  # and its heartbeat
    assert ran["env"][SITE_CONFIG_ENV] == str((tmp_path / "site.toml").resolve())  # the executor reads it
    assert ran["env"][THREADS_ENV] == "1"  # the site's training threads
    assert not gate.exists()  # the gate's directory goes with the SuperNode
    assert (ran["site"], ran["address"], ran["ca"], ran["node_key"]) == ("cardiology", "h:1", Path("ca.crt"),
                                                                         Path("cardiology"))


class _Sleeps:
    """Records the waits `client.compat`'s stand-in clock passes on to `time.sleep`."""

    def __init__(self) -> None:
        self.slept: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)

    @staticmethod
    def monotonic() -> float:
        return 42.0


def test_the_supernode_loop_waits_the_sites_seconds_not_flowers(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = resolve(SUPERNODE_LOOP)
    monkeypatch.setattr(loop, "time", loop.time)  # restored after the test
    sleeps = _Sleeps()
    monkeypatch.setattr(client.compat, "time", sleeps)
    set_supernode_polls(0.25, 0.1)  # the installed Flower's loop has both waits, or this raises
    for seconds in (3, 0.5, 2):  # idle, waiting for a reply, any other wait
        loop.time.sleep(seconds)
    assert sleeps.slept == [0.25, 0.1, 2]
    sleeps.slept.clear()
    for _ in range(6):  # idle after a reply: the next message of the round is looked for soon, then less often
        loop.time.sleep(3)
    assert sleeps.slept == pytest.approx([0.05, 0.075, 0.1125, 0.16875, 0.25, 0.25])
    loop.time.sleep(0.5)  # another message served: soon again
    loop.time.sleep(3)
    assert sleeps.slept[-2:] == [0.1, 0.05]
    assert loop.time.monotonic() == 42.0  # everything else is the time module's own


def test_a_flower_without_those_waits_is_left_as_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = resolve(SUPERNODE_LOOP)
    monkeypatch.setattr(loop, "time", loop.time)
    before = loop.time
    monkeypatch.setattr(common.compat.inspect, "getsource", lambda _m: "while True:\n    time.sleep(1)\n")
    with pytest.raises(FlowerCompatError, match=r"no time\.sleep\(3\) and no time\.sleep\(0\.5\)"):
        set_supernode_polls(0.25, 0.1)
    assert loop.time is before


def test_the_supernode_process_sets_its_waits_then_runs_flowers_supernode(monkeypatch: pytest.MonkeyPatch,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    calls: list[tuple[str, Any]] = []
    monkeypatch.setattr(client.compat, "set_supernode_polls", lambda idle, reply: calls.append(("polls", (idle,
                                                                                                          reply))))
    monkeypatch.setattr(client.compat, "flower_supernode", lambda: calls.append(("flower", None)), raising=False)
    monkeypatch.setattr(common.compat, "quicken_object_pulls", lambda _log, who: calls.append(("pulls", who)))
    monkeypatch.setenv(POLL_ENV, "0.25")
    monkeypatch.delenv(REPLY_POLL_ENV, raising=False)
    supernode.main()
    # no reply wait set: Flower's own; and its pulls of a message's objects first wait briefly (test_executor)
    assert calls == [("polls", (0.25, 0.5)), ("pulls", "client"), ("flower", None)]

    def refuse(_idle: float, _reply: float) -> None:
        raise FlowerCompatError("Flower 9's SuperNode loop has no time.sleep(3)")

    monkeypatch.setattr(client.compat, "set_supernode_polls", refuse)
    calls.clear()
    supernode.main()  # slower rounds, said so: the site still runs Flower's SuperNode
    assert calls == [("pulls", "client"), ("flower", None)] and "keeps Flower's own waits" in caplog.text
    monkeypatch.setenv(POLL_ENV, "soon")
    with pytest.raises(SystemExit, match="FEDSILO_POLL_SECONDS must be a number of seconds"):
        supernode.main()


def test_the_supernode_declares_and_keeps_the_sites_heartbeat(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's SuperNode declares its heartbeat interval when it activates and heartbeats at that pace; both read
    Flower's fixed 30 s from their module, and both take the site's interval, in memory."""
    modules = [resolve(name) for name in client.compat.SUPERNODE_HEARTBEAT_USES]
    for module in modules:
        monkeypatch.setattr(module, "HEARTBEAT_DEFAULT_INTERVAL", module.HEARTBEAT_DEFAULT_INTERVAL)  # restored
    assert [m.HEARTBEAT_DEFAULT_INTERVAL for m in modules] == [30, 30]  # Flower 1.41 and 1.42
    client.compat.set_supernode_heartbeat(12.0)  # the installed Flower reads it where described, or this raises
    assert [m.HEARTBEAT_DEFAULT_INTERVAL for m in modules] == [12.0, 12.0]
    with pytest.raises(ValueError, match="from 10 to 1800 s, got 5"):
        client.compat.set_supernode_heartbeat(5)  # Flower's SuperLink would refuse the node's activation


def test_a_flower_reading_its_heartbeat_elsewhere_is_left_as_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    modules = [resolve(name) for name in client.compat.SUPERNODE_HEARTBEAT_USES]
    for module in modules:
        monkeypatch.setattr(module, "HEARTBEAT_DEFAULT_INTERVAL", module.HEARTBEAT_DEFAULT_INTERVAL)
    monkeypatch.setattr(common.compat.inspect, "getsource", lambda _m: "INTERVAL = 30\n")
    with pytest.raises(FlowerCompatError, match="does not read its heartbeat interval"):
        client.compat.set_supernode_heartbeat(12.0)
    assert [m.HEARTBEAT_DEFAULT_INTERVAL for m in modules] == [30, 30]


def test_the_supernode_process_sets_the_heartbeat_or_keeps_flowers(monkeypatch: pytest.MonkeyPatch,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    calls: list[tuple[str, Any]] = []
    monkeypatch.setattr(client.compat, "set_supernode_polls", lambda idle, reply: None)
    monkeypatch.setattr(client.compat, "set_supernode_heartbeat", lambda s: calls.append(("heartbeat", s)))
    monkeypatch.setattr(common.compat, "quicken_object_pulls", lambda *_a: None)
    monkeypatch.setattr(client.compat, "flower_supernode", lambda: calls.append(("flower", None)), raising=False)
    monkeypatch.delenv(POLL_ENV, raising=False)
    monkeypatch.setenv(HEARTBEAT_ENV, "15")
    supernode.main()
    assert calls == [("heartbeat", 15.0), ("flower", None)]

    def refuse(_seconds: float) -> None:
        raise FlowerCompatError("Flower 9's flwr.supercore.heartbeat does not read its heartbeat interval")

    monkeypatch.setattr(client.compat, "set_supernode_heartbeat", refuse)
    with caplog.at_level(logging.WARNING):
        supernode.main()
    assert "the SuperNode keeps Flower's own heartbeat (30s)" in caplog.text
    monkeypatch.setenv(HEARTBEAT_ENV, "5")
    with pytest.raises(SystemExit, match="FEDSILO_HEARTBEAT_SECONDS must be a number of seconds from 10 to 1800"):
        supernode.main()
