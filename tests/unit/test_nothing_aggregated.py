"""A round in which no department trained averages nothing: no division by a zero total weight (FedAvg's or
SecAgg+'s), the previous global model stays, and the round says "no department trained". Fake results only."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.workflow import SecAggPlusWorkflow

from common import keys
from common.config import JobConfig
from server.aggregation import NO_DEPARTMENT_TRAINED, NO_USABLE_UPDATE, TOO_FEW_SUMMANDS
from server.compat import MAIN_CONFIGS_RECORD, WorkflowKey
from server.records import AggregateStatus
from server.report import RunRecorder
from server.secagg import ReportingSecAggPlusWorkflow
from server.strategy import FedSiloStrategy

OK = Status(code=Code.OK, message="")
INITIAL = [np.ones((2, 3), dtype=np.float32), np.zeros(4, dtype=np.float32)]


@pytest.fixture(autouse=True)
def _runtime_warnings_are_errors() -> Iterator[None]:
    """A division by zero (or 0/0) anywhere in numpy fails the test instead of warning."""
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error", RuntimeWarning)
        yield


def _reply(name: str, status: str, n: int = 0, update: list[np.ndarray] | None = None) -> FitRes:
    metrics = {keys.M_DEPARTMENT: name, keys.M_STATUS: status, keys.M_NUM_EXAMPLES: n, keys.M_REASON: status}
    arrays = update if update is not None else [np.zeros_like(a) for a in INITIAL]
    return FitRes(status=OK, parameters=ndarrays_to_parameters(arrays), num_examples=n, metrics=metrics)


def _declined() -> list[tuple[Any, FitRes]]:
    return [(SimpleNamespace(node_id=1), _reply("cardiology", keys.STATUS_DECLINED_POLICY)),
            (SimpleNamespace(node_id=2), _reply("oncology", keys.STATUS_DECLINED_BUDGET))]


def _strategy(tmp_path: Any, *, secagg: bool) -> FedSiloStrategy:
    return FedSiloStrategy(JobConfig(secagg=secagg, num_server_rounds=2), INITIAL, "fp", RunRecorder({}, tmp_path))


@pytest.mark.parametrize("secagg", [False, True])
def test_every_department_declined_keeps_the_previous_model(tmp_path: Any, secagg: bool) -> None:
    strategy = _strategy(tmp_path, secagg=secagg)
    params, _ = strategy.aggregate_fit(1, _declined(), [RuntimeError("radiology failed")])
    kept = parameters_to_ndarrays(params)
    assert all(np.array_equal(a, b) for a, b in zip(kept, INITIAL, strict=True))
    record = strategy.recorder.round(1)
    assert record.aggregate is AggregateStatus.KEPT_PREVIOUS and record.aggregate_reason == NO_DEPARTMENT_TRAINED
    assert {name: d.status for name, d in record.departments.items()} == {
        "cardiology": keys.STATUS_DECLINED_POLICY, "oncology": keys.STATUS_DECLINED_BUDGET}


def test_no_reply_at_all_is_no_department_trained(tmp_path: Any) -> None:
    strategy = _strategy(tmp_path, secagg=False)
    strategy.aggregate_fit(1, [], [RuntimeError("every department failed")])
    assert strategy.recorder.round(1).aggregate_reason == NO_DEPARTMENT_TRAINED


def test_trained_but_every_update_rejected_is_still_no_usable_update(tmp_path: Any) -> None:
    strategy = _strategy(tmp_path, secagg=False)
    bad = [np.full((2, 3), np.nan, np.float32), np.zeros(4, np.float32)]
    with np.errstate(all="ignore"):  # the NaN update itself is the test's input
        strategy.aggregate_fit(1, [(SimpleNamespace(node_id=1), _reply("cardiology", keys.STATUS_TRAINED, 10, bad))],
                               [])
    record = strategy.recorder.round(1)
    assert record.aggregate_reason == NO_USABLE_UPDATE
    assert record.departments["cardiology"].status == keys.STATUS_FAILED


class UnusedGrid:
    """The departments are not asked for their shares when there is nothing to unmask."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the grid was used ({name}) although nothing was to be unmasked")


def _workflow() -> ReportingSecAggPlusWorkflow:
    return ReportingSecAggPlusWorkflow(num_shares=3, reconstruction_threshold=2, on_halt=lambda *a: None,
                                       on_dropout=lambda *a: None)


def _secagg_round(strategy: Any, results: list[tuple[Any, FitRes]]) -> tuple[Any, Any]:
    records = {MAIN_CONFIGS_RECORD: {WorkflowKey.CURRENT_ROUND: 1}}
    context = SimpleNamespace(state=SimpleNamespace(config_records=records), strategy=strategy)
    nodes = {proxy.node_id for proxy, _ in results}
    state = SimpleNamespace(active_node_ids=set(nodes), sampled_node_ids=set(nodes), legacy_results=results,
                            failures=[], nid_to_neighbours={n: set(nodes) for n in nodes}, threshold=2)
    return context, state


def test_secagg_unmask_with_no_weight_divides_nothing_and_keeps_the_previous_model(tmp_path: Any) -> None:
    strategy = _strategy(tmp_path, secagg=True)
    context, state = _secagg_round(strategy, _declined())
    assert _workflow().unmask_stage(UnusedGrid(), context, state) is True  # the round completes, not halts
    record = strategy.recorder.round(1)
    assert record.aggregate is AggregateStatus.KEPT_PREVIOUS and record.aggregate_reason == NO_DEPARTMENT_TRAINED
    assert all(res.parameters.tensors == [] for _, res in state.legacy_results)  # no masked vector as "aggregate"
    assert strategy.global_arrays is INITIAL


def test_secagg_unmask_with_weight_is_flowers_own(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []
    monkeypatch.setattr(SecAggPlusWorkflow, "unmask_stage", lambda self, grid, context, state: calls.append(grid)
                        or True)
    trained = [*_declined(), (SimpleNamespace(node_id=3), _reply("radiology", keys.STATUS_TRAINED, 40)),
               (SimpleNamespace(node_id=4), _reply("urology", keys.STATUS_TRAINED, 30))]
    context, state = _secagg_round(SimpleNamespace(aggregate_fit=None), trained)
    grid = SimpleNamespace(send_and_receive=lambda messages, timeout=None: [])
    assert _workflow().unmask_stage(grid, context, state) is True
    assert len(calls) == 1 and calls[0].send_and_receive([]) == []  # Flower's, through the share-trimming grid


def test_secagg_does_not_unmask_the_update_of_a_lone_trainer(tmp_path: Any) -> None:
    """One department trained, the others declined (zero updates of weight 0): the unmasked "sum" would be its
    update in the clear, so it is not unmasked, and the previous model stays."""
    strategy = _strategy(tmp_path, secagg=True)
    lone = [*_declined(), (SimpleNamespace(node_id=3), _reply("radiology", keys.STATUS_TRAINED, 40))]
    context, state = _secagg_round(strategy, lone)
    assert _workflow().unmask_stage(UnusedGrid(), context, state) is True  # done without asking for shares
    record = strategy.recorder.round(1)
    assert record.aggregate is AggregateStatus.KEPT_PREVIOUS and record.aggregate_reason == TOO_FEW_SUMMANDS
    assert record.departments["radiology"].status == keys.STATUS_TRAINED
    assert all(res.parameters.tensors == [] for _, res in state.legacy_results)
    assert strategy.global_arrays is INITIAL
