"""The site's executor (client.executor): Flower's own SuperExec, whose ClientApp tasks of a warm-worker site run the
gate in a thread instead of a fresh process; and the shorter first wait for a message's objects (common.compat).
Real deployments run both in tests/deployment."""

from __future__ import annotations

import hashlib
import itertools
import logging
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from flwr.app import Context, Message, MessageType, Metadata, RecordDict

import client.compat
import client.gate
import common.compat
from client import executor
from client.compat import SUPEREXEC_LOOP, LaunchResult, SubprocessExecutor, TaskType, set_superexec_executor
from client.egress import egress_log_path, read_egress_log
from client.executor import GateExecutor, gate_executor
from common import keys
from common.compat import FlowerCompatError, resolve

BUNDLE = b"the job's bundle"
DIGEST = "sha256:" + hashlib.sha256(BUNDLE).hexdigest()


def _site(tmp_path: Path, *, warm: bool = True) -> Path:
    toml = tmp_path / "site.toml"
    toml.write_text('name = "cardiology"\ndata = "notes.csv"\nepsilon = 8.0\ndelta = 1e-5\nledger = "ledger.json"\n'
                    f"warm_worker = {str(warm).lower()}\n[policy]\napproved_apps = [\"{DIGEST}\"]\n")
    return toml


class _Inner:
    """Flower's subprocess executor as the wrapper sees it: what it was asked to launch."""

    def __init__(self) -> None:
        self.launched: list[Any] = []

    def launch(self, spec: Any) -> str:
        self.launched.append(spec)
        return "a process"

    def reconcile(self) -> str:
        return "reconciled"


def _spec(task_type: str = "flwr-clientapp", *, install: bool = False) -> Any:
    return SimpleNamespace(task_type=TaskType(task_type), runtime_dependency_install=install, task_id=3,
                           runtime_api_address="127.0.0.1:9094", token="tok", insecure=True,
                           root_certificates_path=None)


def test_a_clientapp_task_of_a_warm_site_runs_the_gate_in_a_thread(monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Path) -> None:
    ran: list[tuple[Any, ...]] = []
    done = threading.Event()

    def run(*args: Any, **kwargs: Any) -> int:
        ran.append((*args, kwargs, threading.current_thread().name))
        done.set()
        return 0

    monkeypatch.setattr(client.gate, "run", run)
    inner = _Inner()
    gate = GateExecutor(inner, _site(tmp_path))
    result = gate.launch(_spec())
    assert result == LaunchResult.accepted() and done.wait(10)
    assert inner.launched == []  # no process
    (address, token, insecure, certificates, parent_pid, kwargs, thread), = ran
    assert (address, token, insecure, certificates, kwargs) == ("127.0.0.1:9094", "tok", True, None,
                                                                {"in_process": True})
    assert parent_pid == executor.os.getpid() and thread == "gate-task-3"  # the worker ends with this executor
    assert gate.reconcile() == "reconciled"  # everything else is Flower's executor's


def test_a_message_that_fails_in_its_gate_thread_leaves_the_executor_running(monkeypatch: pytest.MonkeyPatch,
                                                                             tmp_path: Path,
                                                                             caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(client.gate, "run", lambda *_a, **_k: pytest.fail("the gate ran without its certificates"))
    spec = _spec()
    spec.insecure, spec.root_certificates_path = False, str(tmp_path / "missing-ca.crt")
    with caplog.at_level(logging.ERROR):
        assert GateExecutor(_Inner(), _site(tmp_path)).launch(spec) == LaunchResult.accepted()  # no raise here
        for thread in threading.enumerate():
            if thread.name == "gate-task-3":
                thread.join(10)
    assert "the gate failed on task 3" in caplog.text


@pytest.mark.parametrize("case", ["cold site", "other task", "runtime install", "unreadable config"])
def test_every_other_task_starts_a_process_as_flower_does(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                          case: str, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(client.gate, "run", lambda *_a, **_k: pytest.fail("the gate ran in the executor"))
    inner = _Inner()
    config = _site(tmp_path, warm=case != "cold site")
    if case == "unreadable config":
        config.write_text("name = [")
    spec = _spec("flwr-agentapp" if case == "other task" else "flwr-clientapp", install=case == "runtime install")
    assert GateExecutor(inner, config).launch(spec) == "a process"
    assert inner.launched == [spec]  # a gate process (or a refusing stand-in), which answers for itself
    if case == "unreadable config":
        assert "is not valid TOML" in caplog.text


def test_a_gate_thread_that_finds_the_warm_worker_switched_off_refuses(tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    """The executor decided on a thread from the config it read; the gate reads it again with the message."""
    config = _site(tmp_path, warm=False)
    context = Context(run_id=7, node_id=5, node_config={keys.NODE_SITE_CONFIG: str(config)}, state=RecordDict(),
                      run_config={})
    metadata = Metadata(run_id=7, message_id="m1", src_node_id=0, dst_node_id=5, reply_to_message_id="",
                        group_id="2", created_at=time.time(), ttl=100.0, message_type=MessageType.TRAIN)
    reply = client.gate.handle(Message(RecordDict(), metadata=metadata), context, BUNDLE, in_process=True)
    assert reply.has_error() and "PolicyError" in reply.error.reason
    assert "turned its warm worker off" in caplog.text  # the bundle is approved: this is the only reason
    (record,) = read_egress_log(egress_log_path(tmp_path / "ledger.json"))  # what left the site is recorded
    assert record["site"] == "cardiology" and "PolicyError" in record["error"]


def test_flowers_superexec_builds_its_executor_through_the_wrapper(monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Path) -> None:
    loop = resolve(SUPEREXEC_LOOP)
    monkeypatch.setattr(loop, "get_executor", loop.get_executor)  # restored after the test
    flowers = loop.get_executor
    set_superexec_executor(gate_executor(tmp_path / "site.toml"))
    set_superexec_executor(gate_executor(tmp_path / "site.toml"))  # again: wraps Flower's builder, not the last
    assert loop.get_executor.__wrapped__ is flowers
    built = loop.get_executor(resolve("flwr.supercore.constant:ExecutorType").SUBPROCESS)
    assert isinstance(built, GateExecutor) and isinstance(built.inner, SubprocessExecutor)
    assert built.site_config == tmp_path / "site.toml"


def test_a_flower_building_its_executor_otherwise_is_left_as_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = resolve(SUPEREXEC_LOOP)
    monkeypatch.setattr(loop, "get_executor", loop.get_executor)
    before = loop.get_executor
    monkeypatch.setattr(common.compat.inspect, "getsource", lambda _m: "executor = make_executor()\n")
    with pytest.raises(FlowerCompatError, match="does not build its executor"):
        set_superexec_executor(lambda inner: inner)
    assert loop.get_executor is before


def test_the_executor_process_sets_the_wrapper_or_keeps_flowers(monkeypatch: pytest.MonkeyPatch,
                                                                caplog: pytest.LogCaptureFixture,
                                                                tmp_path: Path) -> None:
    calls: list[str] = []
    monkeypatch.setattr(common.compat, "quicken_object_pulls", lambda *_a: calls.append("pulls"))
    monkeypatch.setattr(client.compat, "set_superexec_executor", lambda wrap: calls.append("wrapper"))
    monkeypatch.setattr(client.compat, "flower_superexec", lambda: calls.append("flower"), raising=False)
    monkeypatch.setattr(client.gate, "configure_gate_logging", lambda: None)
    monkeypatch.setenv(executor.SITE_CONFIG_ENV, str(tmp_path / "site.toml"))
    executor.main()
    assert calls == ["pulls", "wrapper", "flower"]

    def refuse(_wrap: Any) -> None:
        raise FlowerCompatError("Flower 9's SuperExec does not build its executor")

    monkeypatch.setattr(client.compat, "set_superexec_executor", refuse)
    calls.clear()
    with caplog.at_level(logging.WARNING):
        executor.main()  # slower messages, said so: Flower's own executor
    assert calls == ["pulls", "flower"] and "every message starts a gate process" in caplog.text
    monkeypatch.delenv(executor.SITE_CONFIG_ENV)
    calls.clear()
    executor.main()
    assert calls == ["pulls", "flower"]


def test_object_pulls_first_wait_briefly_then_as_flower_does(monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    functions = [resolve(f"{common.compat.OBJECT_PULLS}:{name}") for name in common.compat.OBJECT_PULL_USES]
    flowers = resolve(f"{common.compat.OBJECT_PULLS}:PULL_INITIAL_BACKOFF")
    assert flowers == 1  # Flower 1.41 and 1.42
    for function in functions:  # Flower's own wait (a ServerApp run earlier in this process set fedsilo's), and
        # the functions' defaults restored after the test
        monkeypatch.setattr(function, "__kwdefaults__", {**function.__kwdefaults__, "initial_backoff": flowers})
    common.compat.set_object_pull_wait(0.02)
    assert [f.__kwdefaults__["initial_backoff"] for f in functions] == [0.02, 0.02]
    assert [f.__kwdefaults__["backoff_cap"] for f in functions] == [10, 10]  # the rest is Flower's
    for function in functions:
        function.__kwdefaults__["initial_backoff"] = 1
    monkeypatch.setattr(common.compat.inspect, "getsource", lambda _f: "def pull_objects(ids): ...\n")
    with caplog.at_level(logging.WARNING):
        common.compat.quicken_object_pulls(logging.getLogger("test"), "gate")
    assert "waited for as Flower does (1 s, doubling)" in caplog.text
    assert [f.__kwdefaults__["initial_backoff"] for f in functions] == [1, 1]


def test_a_pull_waits_the_set_time_for_an_object_not_yet_pushed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's own pull, with the wait this process set: the object that comes on the third ask waits 0.02 s
    and then 0.04 s (+-20%), where Flower would wait 1 s and then 2 s."""
    pull_objects = resolve(f"{common.compat.OBJECT_PULLS}:pull_objects")
    unavailable = resolve(f"{common.compat.OBJECT_PULLS}:ObjectUnavailableError")
    monkeypatch.setattr(pull_objects, "__kwdefaults__", dict(pull_objects.__kwdefaults__))
    common.compat.set_object_pull_wait(0.02)
    asks: list[float] = []

    def pull(object_id: str) -> bytes:
        asks.append(time.monotonic())
        if len(asks) < 3:
            raise unavailable(object_id)
        return b"content"

    assert pull_objects(["o1"], pull) == {"o1": b"content"}
    waits = [b - a for a, b in itertools.pairwise(asks)]
    assert len(waits) == 2 and waits[0] > 0.015 and waits[1] > 0.03
    assert max(waits) < 0.75  # Flower's own first wait is 0.8 s at the least (1 s - 20%)
