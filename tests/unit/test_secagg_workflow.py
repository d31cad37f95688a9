"""The server's workflow helpers around Flower's legacy API: the stage timeout and the SecAgg+ dropout fix."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from types import SimpleNamespace
from typing import Any

import pytest

from server.secagg import StageTimeoutGrid, _forget_unmasked_dropouts


class FakeGrid:
    def __init__(self, answering: set[int]) -> None:
        self.answering = answering
        self.timeouts: list[float | None] = []

    def send_and_receive(self, messages: Iterable[Any], *, timeout: float | None = None) -> list[Any]:
        self.timeouts.append(timeout)
        return [SimpleNamespace(metadata=SimpleNamespace(src_node_id=m.metadata.dst_node_id))
                for m in messages if m.metadata.dst_node_id in self.answering]

    def get_node_ids(self) -> list[int]:
        return [1, 2, 3]


def _to(node_id: int) -> Any:
    return SimpleNamespace(metadata=SimpleNamespace(dst_node_id=node_id))


def test_an_exchange_without_a_timeout_waits_at_most_the_stage_timeout(caplog: pytest.LogCaptureFixture) -> None:
    inner = FakeGrid(answering={1, 2})
    grid = StageTimeoutGrid(inner, 40.0)  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING):
        replies = list(grid.send_and_receive([_to(1), _to(2), _to(3)]))
    assert inner.timeouts == [40.0]
    assert [r.metadata.src_node_id for r in replies] == [1, 2]
    assert "no reply from node(s) [3] within 40s" in caplog.text
    grid.send_and_receive([_to(1)], timeout=5.0)  # a caller's own timeout is kept
    assert inner.timeouts[-1] == 5.0
    assert list(grid.get_node_ids()) == [1, 2, 3]


def test_departments_gone_before_their_shares_left_are_not_unmasked() -> None:
    # Node 3 answered setup but not share_keys: nobody holds its shares or masked with it.
    state = SimpleNamespace(active_node_ids={1, 2, 4}, sampled_node_ids={1, 2, 3, 4},
                            nid_to_neighbours={1: {1, 2, 3}, 2: {1, 2, 3, 4}, 3: {2, 3, 4}, 4: {2, 3, 4}})
    _forget_unmasked_dropouts(state)
    assert state.sampled_node_ids == {1, 2, 4}
    assert state.nid_to_neighbours[1] == {1, 2}
    assert state.nid_to_neighbours[2] == {1, 2, 4}
    assert state.nid_to_neighbours[4] == {2, 4}
