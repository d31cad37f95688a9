"""The simulation engine's message queue (`server.compat.set_simulation_queue_poll`): Flower's extractor looks for
each department's next message every 0.1 s; `fedsilo simulate` makes it look every 1 ms per department, from 0.01 s
up to Flower's own 0.1 s. Nothing of Flower's is changed on disk; a Flower whose extractor differs is left alone."""

from __future__ import annotations

import logging
import threading
from typing import Any

import pytest

import common.compat
from common.compat import FlowerCompatError, resolve
from server.compat import FLOWER_QUEUE_POLL_SECONDS, SIMULATION_QUEUE, set_simulation_queue_poll
from simulations import run
from simulations.run import queue_poll_seconds


class _Stop:
    """Flower's stop event, as a test sees it: set after `rounds` waits; the waits are recorded, not slept."""

    def __init__(self, rounds: int) -> None:
        self.waits: list[float | None] = []
        self._rounds = rounds

    def is_set(self) -> bool:
        return len(self.waits) >= self._rounds

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(timeout)
        return self.is_set()


class _State:
    def __init__(self) -> None:
        self.asked: list[int] = []

    def get_message_ins(self, node_id: int, limit: int) -> list[str]:
        self.asked.append(node_id)
        return [f"message for {node_id}"] if len(self.asked) <= 2 else []


@pytest.fixture
def engine(monkeypatch: pytest.MonkeyPatch) -> Any:
    module = resolve(SIMULATION_QUEUE)
    monkeypatch.setattr(module, "add_messages_to_queue", module.add_messages_to_queue)  # restored afterwards
    return module


def test_the_engine_looks_for_messages_at_the_set_poll_and_queues_them_as_flower_does(engine: Any) -> None:
    set_simulation_queue_poll(0.02)  # the installed Flower's extractor is the one described, or this raises
    stop, state, queued = _Stop(rounds=3), _State(), []

    class Queue:
        def put(self, msg: str) -> None:
            queued.append(msg)

    engine.add_messages_to_queue(state, Queue(), {7: 0, 8: 1}, stop)
    assert queued == ["message for 7", "message for 8"]  # Flower's own loop: each node's next message, queued
    assert state.asked == [7, 8] * 3
    assert stop.waits == [0.02] * 3  # its fixed 0.1 s wait, at the poll set


def test_setting_it_again_replaces_the_poll_and_keeps_one_wrapper(engine: Any) -> None:
    set_simulation_queue_poll(0.05)
    set_simulation_queue_poll(0.01)
    stop = _Stop(rounds=1)
    engine.add_messages_to_queue(_State(), None, {}, stop)
    assert stop.waits == [0.01]
    assert not hasattr(engine.add_messages_to_queue.__wrapped__, "__wrapped__")


def test_the_stop_event_itself_is_flowers(engine: Any) -> None:
    set_simulation_queue_poll(0.01)
    event = threading.Event()
    event.set()  # a stopped engine: the loop ends without looking
    state = _State()
    engine.add_messages_to_queue(state, None, {1: 0}, event)
    assert state.asked == []


def test_a_flower_with_another_extractor_is_left_as_it_is(engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    before = engine.add_messages_to_queue
    monkeypatch.setattr(common.compat.inspect, "getsource", lambda _f: "while True:\n    f_stop.wait(1.0)\n")
    with pytest.raises(FlowerCompatError, match=r"f_stop\.wait\(0\.1\)"):
        set_simulation_queue_poll(0.01)
    assert engine.add_messages_to_queue is before


@pytest.mark.parametrize(("departments", "seconds"), [(1, 0.01), (2, 0.01), (10, 0.01), (40, 0.04), (100, 0.1),
                                                      (300, 0.1)])
def test_the_poll_grows_with_the_departments_up_to_flowers(departments: int, seconds: float) -> None:
    assert queue_poll_seconds(departments) == pytest.approx(seconds)
    assert queue_poll_seconds(departments) <= FLOWER_QUEUE_POLL_SECONDS


def test_simulate_keeps_flowers_poll_with_a_warning_when_it_cannot_set_it(monkeypatch: pytest.MonkeyPatch,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    def refuse(_seconds: float) -> None:
        raise FlowerCompatError("Flower 9's simulation message extractor is not ...")

    monkeypatch.setattr(run, "set_simulation_queue_poll", refuse)
    with caplog.at_level(logging.WARNING):
        run._set_queue_poll(4)
    assert "keeping Flower's 0.1 s message poll: Flower 9's simulation message extractor" in caplog.text
