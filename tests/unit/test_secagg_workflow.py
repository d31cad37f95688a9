"""The server's workflow helpers around Flower's legacy API: the stage timeout and the SecAgg+ dropout fix."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from types import SimpleNamespace
from typing import Any

import pytest
from flwr.app import ConfigRecord, RecordDict
from flwr.server.workflow import SecAggPlusWorkflow

from server.compat import SECAGG_CONFIGS_RECORD, SecAggKey, combine_shares, create_shares
from server.secagg import (
    FIRST_POLL_SECONDS,
    POLL_GROWTH,
    POLL_SECONDS,
    ReportingSecAggPlusWorkflow,
    StageTimeoutGrid,
    _forget_unmasked_dropouts,
    neighbourhood,
    trim_shares,
)


class FakeClock:
    """Time that passes only when the grid sleeps."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class FakeGrid:
    """A grid whose node `n` replies `answer_after[n]` seconds after the push (never if absent); `push_messages`
    returns None for nodes in `unpushable`, as Flower's deployment grid does for a message it could not push."""

    def __init__(self, clock: FakeClock, answer_after: dict[int, float], unpushable: frozenset[int] = frozenset(),
                 error_codes: dict[int, int] | None = None) -> None:
        self.error_codes = error_codes or {}  # node -> the code of the error it answers with
        self.clock = clock
        self.answer_after = answer_after
        self.unpushable = unpushable
        self.pushed_at = 0.0
        self.ids: dict[str, int] = {}
        self.pulls: list[set[str]] = []

    def push_messages(self, messages: Iterable[Any]) -> list[str | None]:
        self.pushed_at = self.clock()
        out: list[str | None] = []
        for m in messages:
            node = m.metadata.dst_node_id
            message_id = None if node in self.unpushable else f"m{node}"
            if message_id:
                self.ids[message_id] = node
            out.append(message_id)
        return out

    def pull_messages(self, message_ids: Iterable[str]) -> list[Any]:
        asked = set(message_ids)
        self.pulls.append(asked)
        waited = self.clock() - self.pushed_at
        return [SimpleNamespace(metadata=SimpleNamespace(src_node_id=self.ids[i], reply_to_message_id=i),
                                has_error=lambda i=i: self.ids[i] in self.error_codes,
                                error=SimpleNamespace(code=self.error_codes.get(self.ids[i], 0)))
                for i in sorted(asked) if self.answer_after.get(self.ids[i], float("inf")) <= waited]

    def send_and_receive(self, messages: Iterable[Any], *, timeout: float | None = None) -> list[Any]:
        raise AssertionError("Flower's send_and_receive sleeps 3 s between pulls; the wrapper must not call it")

    def get_node_ids(self) -> list[int]:
        return [1, 2, 3]


def _to(node_id: int) -> Any:
    return SimpleNamespace(metadata=SimpleNamespace(dst_node_id=node_id))


def _grid(answer_after: dict[int, float], timeout: float = 40.0, **kwargs: Any) -> tuple[StageTimeoutGrid, FakeGrid,
                                                                                          FakeClock]:
    clock = FakeClock()
    inner = FakeGrid(clock, answer_after, **kwargs)
    return StageTimeoutGrid(inner, timeout, sleep=clock.sleep, clock=clock), inner, clock  # type: ignore[arg-type]


def test_replies_are_collected_as_soon_as_they_come() -> None:
    grid, inner, clock = _grid({1: 0.0, 2: 0.35, 3: 0.9})
    replies = list(grid.send_and_receive([_to(1), _to(2), _to(3)]))
    assert [r.metadata.src_node_id for r in replies] == [1, 2, 3]
    # waits of 0.01 s growing by half up to 0.1 s (polls at 0.01, 0.025, 0.0475, 0.081, 0.132, 0.208, 0.308 s), then
    # every 0.1 s: done at the first poll after the last reply (0.9 s), at 0.908 s, not 3 s later
    growing = [FIRST_POLL_SECONDS * POLL_GROWTH ** k for k in range(6)]
    assert growing == pytest.approx([0.01, 0.015, 0.0225, 0.03375, 0.050625, 0.0759375])
    assert clock.sleeps[:7] == pytest.approx([*growing, POLL_SECONDS])
    assert all(s == pytest.approx(POLL_SECONDS) for s in clock.sleeps[6:])
    assert clock.now - 100.0 == pytest.approx(sum(growing) + 7 * POLL_SECONDS)
    assert inner.pulls[0] == {"m1", "m2", "m3"} and inner.pulls[-1] == {"m3"}  # answered messages are not re-asked


def test_an_exchange_without_a_timeout_waits_at_most_the_stage_timeout(caplog: pytest.LogCaptureFixture) -> None:
    grid, _, clock = _grid({1: 0.0, 2: 12.0})
    with caplog.at_level(logging.WARNING):
        replies = list(grid.send_and_receive([_to(1), _to(2), _to(3)]))
    assert clock.now - 100.0 == pytest.approx(40.0)
    assert max(clock.sleeps) <= POLL_SECONDS
    assert [r.metadata.src_node_id for r in replies] == [1, 2]
    assert "no reply from node(s) [3] within 40s" in caplog.text
    assert list(grid.get_node_ids()) == [1, 2, 3]


def test_a_callers_own_timeout_is_kept(caplog: pytest.LogCaptureFixture) -> None:
    grid, _, clock = _grid({1: 0.0, 2: 12.0})
    with caplog.at_level(logging.WARNING):
        replies = list(grid.send_and_receive([_to(1), _to(2)], timeout=5.03))
    assert [r.metadata.src_node_id for r in replies] == [1]
    assert clock.now - 100.0 == pytest.approx(5.03)  # the last sleep is cut to the deadline
    assert "no reply from node(s) [2] within 5s" in caplog.text


def test_a_message_that_could_not_be_pushed_counts_as_silent(caplog: pytest.LogCaptureFixture) -> None:
    grid, inner, clock = _grid({1: 0.0, 2: 0.0}, unpushable=frozenset({2}))
    with caplog.at_level(logging.WARNING):
        replies = list(grid.send_and_receive([_to(1), _to(2)]))
    assert [r.metadata.src_node_id for r in replies] == [1]
    assert clock.sleeps == [] and inner.pulls == [{"m1"}]
    assert "no reply from node(s) [2]" in caplog.text


def test_departments_gone_before_their_shares_left_are_not_unmasked() -> None:
    # Node 3 answered setup but not share_keys: nobody holds its shares or masked with it.
    state = SimpleNamespace(active_node_ids={1, 2, 4}, sampled_node_ids={1, 2, 3, 4},
                            nid_to_neighbours={1: {1, 2, 3}, 2: {1, 2, 3, 4}, 3: {2, 3, 4}, 4: {2, 3, 4}})
    _forget_unmasked_dropouts(state)
    assert state.sampled_node_ids == {1, 2, 4}
    assert state.nid_to_neighbours[1] == {1, 2}
    assert state.nid_to_neighbours[2] == {1, 2, 4}
    assert state.nid_to_neighbours[4] == {2, 4}


def test_registration_names_come_from_the_grids_node_information() -> None:
    from types import SimpleNamespace

    from server.secagg import StageTimeoutGrid, registered_names

    class OldGrid:  # a grid with node ids only
        def get_node_ids(self) -> list[int]:
            return [1, 2]

    class Grid(OldGrid):
        def get_nodes(self) -> list[SimpleNamespace]:
            return [SimpleNamespace(node_id=1, name="radiology"), SimpleNamespace(node_id=2, name="")]

    assert registered_names(OldGrid()) == {}
    assert registered_names(Grid()) == {1: "radiology"} == registered_names(StageTimeoutGrid(Grid(), 1.0))


def test_the_grid_tells_which_nodes_answered_with_an_error() -> None:
    grid, _, _ = _grid({1: 0.0, 2: 0.0}, error_codes={2: 2})
    grid.send_and_receive([_to(1), _to(2), _to(3)], timeout=1.0)
    assert grid.error_replies == {2: 2}
    grid.send_and_receive([_to(1)], timeout=1.0)
    assert grid.error_replies == {}  # the last exchange's only


# ---------------------------------------------------------------- neighbourhoods and the unmask stage's shares


@pytest.mark.parametrize(("num_shares", "threshold", "sampled", "expected"), [
    (31, 0.67, 3, (3, 2)),  # everyone is a neighbour up to 31 departments ...
    (31, 0.67, 30, (30, 20)),
    (31, 0.67, 31, (31, 21)),
    (31, 0.67, 100, (31, 21)),  # ... then a fixed neighbourhood of 31
    (31, 0.67, 300, (31, 21)),
    (3, 0.67, 5, (3, 2)),
    (1.0, 0.67, 100, (100, 67)),  # a fraction: Flower's own rounding
    (0.5, 0.67, 10, (5, 3)),  # round(5) is odd
    (0.4, 0.67, 10, (5, 3)),  # round(4) is even: one more
    (0.1, 0.67, 10, (10, 7)),  # 1 share is too few: everyone
    (1.0, 0.51, 4, (4, 3)),  # round(0.51 * 4) = 2 is half of 4: raised to a majority
    (1.0, 0.51, 2, (2, 2)),
    (1.0, 1.0, 7, (7, 7)),
    (5, 0.6, 100, (5, 3)),
])
def test_each_round_has_a_neighbourhood_of_at_most_the_departments_sampled_and_a_majority_threshold(
        num_shares: float, threshold: float, sampled: int, expected: tuple[int, int]) -> None:
    k, t = neighbourhood(num_shares, threshold, sampled)
    assert (k, t) == expected
    assert k <= sampled and 2 * t > k and t <= k


def test_a_round_of_one_department_has_no_neighbourhood() -> None:
    with pytest.raises(ValueError, match="at least 2 departments"):
        neighbourhood(31, 0.67, 1)


def _shares_reply(owners: list[int], *, error: bool = False) -> Any:
    record = ConfigRecord({SecAggKey.NODE_ID_LIST: owners, SecAggKey.SHARE_LIST: [bytes([o]) * 4 for o in owners]})
    return SimpleNamespace(has_error=lambda: error, content=RecordDict({SECAGG_CONFIGS_RECORD: record}))


def _owners(reply: Any) -> list[int]:
    return list(reply.content.config_records[SECAGG_CONFIGS_RECORD][SecAggKey.NODE_ID_LIST])


def test_unmasking_gets_exactly_the_threshold_number_of_each_departments_shares() -> None:
    replies = [_shares_reply([1, 2, 3]), _shares_reply([1, 2, 3]), _shares_reply([1, 3]), _shares_reply([1, 2])]
    trim_shares(replies, threshold=2)
    assert [_owners(r) for r in replies] == [[1, 2, 3], [1, 2, 3], [], []]
    for reply in replies:  # each share stays with its owner
        record = reply.content.config_records[SECAGG_CONFIGS_RECORD]
        assert list(record[SecAggKey.SHARE_LIST]) == [bytes([o]) * 4 for o in _owners(reply)]


def test_a_department_with_too_few_shares_keeps_them_all_and_errors_are_left_alone() -> None:
    failed = _shares_reply([1, 2], error=True)
    replies = [_shares_reply([1, 2]), failed, _shares_reply([1]), _shares_reply([1])]
    trim_shares(replies, threshold=3)
    assert [_owners(r) for r in replies] == [[1, 2], [1, 2], [1], [1]]  # 2 has 1 share: Flower halts, as before
    plain = SimpleNamespace(has_error=lambda: False, content=RecordDict({}))
    trim_shares([plain], threshold=1)  # a reply without shares


def test_trimmed_shares_reconstruct_the_secret() -> None:
    secret = bytes(range(32))
    shares = create_shares(secret, 3, 5)
    reply = SimpleNamespace(has_error=lambda: False, content=RecordDict({SECAGG_CONFIGS_RECORD: ConfigRecord(
        {SecAggKey.NODE_ID_LIST: [7] * 5, SecAggKey.SHARE_LIST: shares})}))
    trim_shares([reply], threshold=3)
    kept = list(reply.content.config_records[SECAGG_CONFIGS_RECORD][SecAggKey.SHARE_LIST])
    assert len(kept) == 3 and combine_shares(kept) == secret


def test_the_setup_stage_sizes_the_round_by_the_departments_the_strategy_sampled(
        monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[Any, Any]] = []

    def flowers_setup(self: Any, grid: Any, context: Any, state: Any) -> bool:  # Flower's order: sample, then read
        context.strategy.configure_fit(1, None, context.client_manager)
        seen.append((self.num_shares, self.reconstruction_threshold))
        return True

    monkeypatch.setattr(SecAggPlusWorkflow, "setup_stage", flowers_setup)
    workflow = ReportingSecAggPlusWorkflow(num_shares=31, reconstruction_threshold=0.67, on_halt=lambda *a: None,
                                           on_dropout=lambda *a: None)
    for sampled in (5, 1, 100):  # one department: Flower halts the round (no neighbourhood to size)
        strategy = SimpleNamespace(configure_fit=lambda rnd, params, cm, n=sampled: [object()] * n, name="fedsilo")
        context = SimpleNamespace(strategy=strategy, client_manager=None, state=None)
        state = SimpleNamespace(active_node_ids=set(), sampled_node_ids=set(), nid_to_neighbours={})
        assert workflow.setup_stage(object(), context, state) is True  # type: ignore[arg-type]
        assert context.strategy is strategy  # the caller's context is not changed
    assert seen == [(5, 3), (5, 3), (31, 21)]
