"""The server strategy with fake department results: FedAvg of updates, declines, rejected updates, records."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from flwr.common import Code, EvaluateRes, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

from common import keys
from common.config import JobConfig
from common.updates import check_update
from server.records import AggregateStatus, Dropout
from server.report import RunRecorder
from server.strategy import FedSiloStrategy

OK = Status(code=Code.OK, message="")


def _proxy(node_id: int) -> SimpleNamespace:
    return SimpleNamespace(node_id=node_id)


def _fit(name: str, update: list[np.ndarray], n: int, status: str = keys.STATUS_TRAINED) -> FitRes:
    metrics = {keys.M_DEPARTMENT: name, keys.M_STATUS: status, keys.M_EPSILON: 1.5, keys.M_NUM_EXAMPLES: n}
    return FitRes(status=OK, parameters=ndarrays_to_parameters(update), num_examples=n if status == "trained" else 0,
                  metrics=metrics)


@pytest.fixture
def strategy(tmp_path) -> FedSiloStrategy:
    initial = [np.ones((2, 3), dtype=np.float32), np.zeros(4, dtype=np.float32)]
    s = FedSiloStrategy(JobConfig(secagg=False, num_server_rounds=2), initial, "fp", RunRecorder({}, tmp_path))
    s.global_arrays = initial
    return s


def test_weighted_average_of_updates_is_added_to_the_global_model(strategy: FedSiloStrategy) -> None:
    a = [np.full((2, 3), 1.0, np.float32), np.full(4, 2.0, np.float32)]
    b = [np.full((2, 3), 4.0, np.float32), np.full(4, -1.0, np.float32)]
    params, _ = strategy.aggregate_fit(1, [(_proxy(1), _fit("a", a, 10)), (_proxy(2), _fit("b", b, 30))], [])
    new = parameters_to_ndarrays(params)
    np.testing.assert_allclose(new[0], 1.0 + (10 * 1.0 + 30 * 4.0) / 40)
    np.testing.assert_allclose(new[1], 0.0 + (10 * 2.0 + 30 * -1.0) / 40)
    record = strategy.recorder.rounds[-1]
    assert record.aggregate is AggregateStatus.APPLIED and record.aggregate_reason is None
    assert record.departments["a"].status == "trained"
    assert strategy.recorder.departments["b"].n_train == 30


def test_declined_department_does_not_weigh_in(strategy: FedSiloStrategy) -> None:
    a = [np.full((2, 3), 2.0, np.float32), np.full(4, 2.0, np.float32)]
    zeros = [np.zeros((2, 3), np.float32), np.zeros(4, np.float32)]
    results = [(_proxy(1), _fit("a", a, 10)), (_proxy(2), _fit("b", zeros, 50, keys.STATUS_DECLINED_BUDGET))]
    new = parameters_to_ndarrays(strategy.aggregate_fit(1, results, [])[0])
    np.testing.assert_allclose(new[0], 3.0)
    assert strategy.recorder.rounds[-1].departments["b"].status == keys.STATUS_DECLINED_BUDGET


def test_everyone_declined_keeps_the_previous_model(strategy: FedSiloStrategy) -> None:
    zeros = [np.zeros((2, 3), np.float32), np.zeros(4, np.float32)]
    results = [(_proxy(1), _fit("a", zeros, 5, keys.STATUS_DECLINED_BUDGET))]
    new = parameters_to_ndarrays(strategy.aggregate_fit(1, results, [RuntimeError("node 3 died")])[0])
    np.testing.assert_array_equal(new[0], 1.0)
    record = strategy.recorder.rounds[-1]
    assert record.aggregate is AggregateStatus.KEPT_PREVIOUS and record.aggregate_reason == "no department trained"
    assert record.failures == 1 and "node 3 died" in record.errors[0]


@pytest.mark.parametrize("bad", [
    [np.full((2, 3), np.nan, np.float32), np.zeros(4, np.float32)],
    [np.zeros((3, 2), np.float32), np.zeros(4, np.float32)],
    [np.zeros((2, 3), np.float32)],
])
def test_a_bad_update_is_rejected_by_name(strategy: FedSiloStrategy, bad: list[np.ndarray]) -> None:
    good = [np.full((2, 3), 1.0, np.float32), np.full(4, 1.0, np.float32)]
    results = [(_proxy(1), _fit("good", good, 10)), (_proxy(2), _fit("evil", bad, 1000))]
    new = parameters_to_ndarrays(strategy.aggregate_fit(1, results, [])[0])
    np.testing.assert_allclose(new[0], 2.0)  # only the good update counted
    dept = strategy.recorder.rounds[-1].departments["evil"]
    assert dept.status == keys.STATUS_FAILED and dept.reason.startswith("rejected update")


def test_check_update_names_the_problem() -> None:
    ref = [np.zeros(3, np.float32)]
    assert check_update([np.zeros(3, np.float32)], ref) is None
    assert "shape" in check_update([np.zeros(4, np.float32)], ref)
    assert "not finite" in check_update([np.array([0, np.inf, 0], np.float32)], ref)
    assert "arrays instead of" in check_update([], ref)


def test_evaluation_gives_the_global_accuracy_and_finishes_the_round(strategy: FedSiloStrategy, tmp_path) -> None:
    strategy.round_start = 0.0
    res = [
        (_proxy(1), EvaluateRes(status=OK, loss=0.5, num_examples=10,
                                metrics={keys.M_DEPARTMENT: "a", keys.M_ACCURACY: 0.9, keys.M_CORRECT: 9,
                                         keys.M_EPSILON: 2.0})),
        (_proxy(2), EvaluateRes(status=OK, loss=0.5, num_examples=30,
                                metrics={keys.M_DEPARTMENT: "b", keys.M_ACCURACY: 0.5, keys.M_CORRECT: 15,
                                         keys.M_EPSILON: 3.0})),
    ]
    strategy.aggregate_evaluate(1, res, [])
    record = strategy.recorder.rounds[-1]
    assert record.global_accuracy == pytest.approx(24 / 40)
    assert record.departments["b"].epsilon == 3.0 and record.departments["b"].n_test == 30
    assert (tmp_path / "report.json").exists() and (tmp_path / "rounds.csv").exists()


def test_a_department_that_dropped_before_answering_is_named_once_known(strategy: FedSiloStrategy) -> None:
    strategy.record_dropouts(1, "setup", {7})
    assert strategy.recorder.round(1).departments["node-7"].status == keys.STATUS_DROPPED
    a = [np.zeros((2, 3), np.float32), np.zeros(4, np.float32)]
    strategy.aggregate_fit(2, [(_proxy(7), _fit("radiology", a, 10)), (_proxy(8), _fit("oncology", a, 10))], [])
    first = strategy.recorder.rounds[0]
    assert "node-7" not in first.departments
    assert first.departments["radiology"].status == keys.STATUS_DROPPED
    assert first.dropouts == [Dropout(department="radiology", node_id=7, stage="setup", attempt=1)]
    assert strategy.recorder.round(2).update_norm == 0.0


def test_applied_round_records_how_far_the_model_moved(strategy: FedSiloStrategy) -> None:
    a = [np.full((2, 3), 1.0, np.float32), np.zeros(4, np.float32)]
    strategy.aggregate_fit(1, [(_proxy(1), _fit("a", a, 10))], [])
    assert strategy.recorder.round(1).update_norm == pytest.approx(np.sqrt(6))


def test_deployment_final_delta_is_the_departments_reported_delta(strategy: FedSiloStrategy) -> None:
    """In deployment the server knows no delta: each department reports its own with its epsilon."""
    from server.recording import run_summary

    a = [np.zeros((2, 3), np.float32), np.zeros(4, np.float32)]
    first, second = _fit("a", a, 10), _fit("b", a, 10, keys.STATUS_DECLINED_POLICY)
    first.metrics[keys.M_DELTA], second.metrics[keys.M_DELTA] = 1e-5, 1e-6
    strategy.aggregate_fit(1, [(_proxy(1), first), (_proxy(2), second)], [])
    assert strategy.recorder.round(1).departments["b"].delta == 1e-6
    deployed = run_summary(strategy.recorder, delta=None, dp=True, secure_aggregation=False)
    assert deployed.delta == 1e-5  # the largest: every department's epsilon holds at it
    assert run_summary(strategy.recorder, delta=1e-7, dp=True, secure_aggregation=False).delta == 1e-7  # simulation


class FakeClientManager:
    """Two departments online; Flower's FedAvg samples both."""

    def num_available(self) -> int:
        return 2

    def sample(self, num_clients: int, min_num_clients: int | None = None, criterion: object = None) -> list:
        return [_proxy(1), _proxy(2)][:num_clients]


def _evaluation(name: str, accuracy: float) -> EvaluateRes:
    return EvaluateRes(status=OK, loss=0.5, num_examples=10,
                       metrics={keys.M_DEPARTMENT: name, keys.M_ACCURACY: accuracy, keys.M_CORRECT: int(10 * accuracy),
                                keys.M_EPSILON: 2.0})


def test_evaluation_every_k_rounds_and_in_the_last(tmp_path) -> None:
    from server.recording import run_summary

    initial = [np.ones((2, 3), dtype=np.float32), np.zeros(4, dtype=np.float32)]
    finished: list[int] = []
    strategy = FedSiloStrategy(JobConfig(secagg=False, num_server_rounds=5, evaluate_every=2), initial, "fp",
                               RunRecorder({}, tmp_path), on_round=lambda rec: finished.append(rec.rounds[-1].round))
    update = [np.full((2, 3), 0.1, np.float32), np.zeros(4, np.float32)]
    evaluated = []
    for server_round in range(1, 6):
        params = strategy.configure_fit(server_round, ndarrays_to_parameters(strategy.global_arrays),
                                        FakeClientManager())[0][1].parameters
        strategy.aggregate_fit(server_round, [(_proxy(1), _fit("a", update, 10)), (_proxy(2), _fit("b", update, 10))],
                               [])
        pairs = strategy.configure_evaluate(server_round, params, FakeClientManager())
        if pairs:  # Flower's evaluate workflow asks the departments and aggregates only then
            evaluated.append(server_round)
            assert {proxy.node_id for proxy, _ in pairs} == {1, 2}
            strategy.aggregate_evaluate(server_round, [(_proxy(1), _evaluation("a", 0.5 + server_round / 10)),
                                                       (_proxy(2), _evaluation("b", 0.5))], [])
    assert evaluated == [2, 4, 5]
    assert finished == [1, 2, 3, 4, 5]  # every round is written, checkpointed and reported, evaluated or not
    rounds = strategy.recorder.rounds
    assert [r.global_accuracy for r in rounds] == [None, pytest.approx(0.6), None, pytest.approx(0.7),
                                                   pytest.approx(0.75)]
    skipped = rounds[0]
    assert skipped.aggregate is AggregateStatus.APPLIED and skipped.seconds is not None
    assert skipped.departments["a"].status == keys.STATUS_TRAINED and skipped.departments["a"].accuracy is None
    assert skipped.departments["a"].epsilon == 1.5 and skipped.dropouts == []  # nobody asked, nobody missing
    final = run_summary(strategy.recorder, delta=None, dp=True, secure_aggregation=False)
    assert final.global_accuracy == pytest.approx(0.75) and final.rounds_completed == 5
    assert "global_accuracy" in (tmp_path / "rounds.csv").read_text()
    strategy.recorder.report.final = final
    strategy.recorder.write()
    strategy.recorder.plot()
    assert (tmp_path / "accuracy.png").exists()


def _zeros() -> list[np.ndarray]:
    return [np.zeros((2, 3), np.float32), np.zeros(4, np.float32)]


def test_a_node_that_never_answered_is_called_by_its_registration_name(strategy: FedSiloStrategy) -> None:
    lookups: list[int] = []

    def registry() -> dict[int, str]:
        lookups.append(1)
        return {7: "Radiology (registered)"}

    strategy.use_registry(registry)
    strategy.record_dropouts(1, "setup", {7, 9})
    record = strategy.recorder.round(1)
    assert set(record.departments) == {"Radiology (registered)", "node-9"}  # 9: registered without a name
    strategy.record_dropouts(1, "share_keys", {9})
    assert len(lookups) == 2  # 7 and 9 were looked up once each, not at every mention
    strategy.aggregate_fit(2, [(_proxy(7), _fit("radiology", _zeros(), 10))], [])
    first = strategy.recorder.rounds[0]
    assert set(first.departments) == {"radiology", "node-9"}  # what the department says it is wins
    assert first.dropouts[0] == Dropout(department="radiology", node_id=7, stage="setup", attempt=1)


def test_one_entry_per_department_per_round_after_a_resume(strategy: FedSiloStrategy, tmp_path) -> None:
    """A department killed after round 1 whose server was resumed: round 2 lists it once, as dropped, by name."""
    strategy.aggregate_fit(1, [(_proxy(7), _fit("radiology", _zeros(), 10)),
                               (_proxy(8), _fit("oncology", _zeros(), 10))], [])
    strategy.round_start = 0.0
    strategy._finish_round(1, None, 0)
    saved = strategy.recorder.report.model_copy(deep=True)
    assert saved.departments["radiology"].node_id == 7

    resumed = FedSiloStrategy(strategy.job, strategy.global_arrays, "fp", RunRecorder({}, tmp_path, report=saved))
    resumed.asked["train"] = {7, 8}
    resumed.aggregate_fit(2, [(_proxy(8), _fit("oncology", _zeros(), 10))], [RuntimeError("node 7 unavailable")])
    resumed.round_start = 0.0
    resumed._finish_round(2, None, 0)
    second = resumed.recorder.round(2)
    assert set(second.departments) == {"radiology", "oncology"}
    assert second.departments["radiology"].status == keys.STATUS_DROPPED
    assert second.dropouts == [Dropout(department="radiology", node_id=7, stage="train", attempt=1)]


def test_a_known_department_that_was_not_asked_was_not_seen(strategy: FedSiloStrategy) -> None:
    strategy.aggregate_fit(1, [(_proxy(7), _fit("radiology", _zeros(), 10)),
                               (_proxy(8), _fit("oncology", _zeros(), 10))], [])
    strategy.asked["train"] = {8}  # radiology was not connected when round 2 started
    strategy.aggregate_fit(2, [(_proxy(8), _fit("oncology", _zeros(), 10))], [])
    strategy.round_start = 0.0
    strategy._finish_round(2, None, 0)
    radiology = strategy.recorder.round(2).departments["radiology"]
    assert (radiology.status, radiology.reason) == (keys.STATUS_NOT_SEEN, "not connected when the round started")


def test_a_failure_is_recorded_with_its_reason_in_the_report_and_the_log(strategy: FedSiloStrategy,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    failed = _fit("radiology", _zeros(), 0, keys.STATUS_FAILED)
    failed.metrics[keys.M_REASON] = "DataError at site radiology: labels <values> are not among the job's labels"
    strategy.aggregate_fit(1, [(_proxy(7), failed), (_proxy(8), _fit("oncology", _zeros(), 10))], [])
    broken = EvaluateRes(status=OK, loss=0.0, num_examples=0,
                         metrics={keys.M_DEPARTMENT: "oncology", keys.M_STATUS: keys.STATUS_FAILED,
                                  keys.M_REASON: "internal error (KeyError) at site oncology; see the site's log"})
    good = EvaluateRes(status=OK, loss=0.5, num_examples=10,
                       metrics={keys.M_DEPARTMENT: "radiology", keys.M_ACCURACY: 0.5, keys.M_CORRECT: 5})
    strategy.round_start = 0.0
    with caplog.at_level("INFO"):
        strategy.aggregate_evaluate(1, [(_proxy(8), broken), (_proxy(7), good)], [])
    record = strategy.recorder.round(1)
    radiology, oncology = record.departments["radiology"], record.departments["oncology"]
    assert (radiology.status, radiology.reason) == (keys.STATUS_FAILED, failed.metrics[keys.M_REASON])
    assert strategy.recorder.departments["radiology"].n_train == 0  # never said otherwise
    failed.metrics.pop(keys.M_NUM_EXAMPLES)
    strategy.aggregate_fit(2, [(_proxy(7), _fit("radiology", _zeros(), 12))], [])
    strategy.aggregate_fit(3, [(_proxy(7), failed)], [])  # a failure reply without its size keeps the last one
    assert strategy.recorder.departments["radiology"].n_train == 12
    assert (oncology.status, oncology.evaluate_status) == (keys.STATUS_TRAINED, keys.STATUS_FAILED)
    assert oncology.accuracy is None and oncology.evaluate_reason.startswith("internal error (KeyError)")
    assert record.global_accuracy == 0.5
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("round 1/"))
    assert "radiology: failed" in line and "(DataError at site radiology" in line
    assert "[evaluation failed: internal error (KeyError)" in line


def test_a_node_that_answered_with_an_error_failed_and_one_that_is_gone_dropped(strategy: FedSiloStrategy) -> None:
    """Errors Flower reports for a node (its gate or a mod failed; the node is gone) keep to their code: Flower's
    text of them may name the site's files."""
    from server.compat import ErrorCode

    strategy.aggregate_fit(1, [(_proxy(7), _fit("radiology", _zeros(), 10)),
                               (_proxy(8), _fit("oncology", _zeros(), 10)),
                               (_proxy(9), _fit("cardiology", _zeros(), 10))], [])
    strategy.asked["train"] = {7, 8, 9}
    strategy.use_error_replies(lambda: {7: ErrorCode.CLIENT_APP_RAISED_EXCEPTION, 8: ErrorCode.NODE_UNAVAILABLE})
    strategy.aggregate_fit(2, [(_proxy(9), _fit("cardiology", _zeros(), 10))],
                           [RuntimeError("Traceback /srv/site/x.py"), RuntimeError("node unavailable")])
    record = strategy.recorder.round(2)
    radiology, oncology = record.departments["radiology"], record.departments["oncology"]
    assert radiology.status == keys.STATUS_FAILED
    assert radiology.reason == "the site's ClientApp failed (CLIENT_APP_RAISED_EXCEPTION); see the site's log"
    assert oncology.status == keys.STATUS_DROPPED
    assert [d.department for d in record.dropouts] == ["oncology"]
    strategy.asked["evaluate"] = {7, 9}
    strategy.use_error_replies(lambda: {9: ErrorCode.CLIENT_APP_CRASHED})
    strategy.round_start = 0.0
    strategy.aggregate_evaluate(2, [], [RuntimeError("crashed")])
    cardiology = record.departments["cardiology"]
    assert (cardiology.status, cardiology.evaluate_status) == (keys.STATUS_TRAINED, keys.STATUS_FAILED)
    assert "CLIENT_APP_CRASHED" in cardiology.evaluate_reason
    assert set(record.departments) == {"radiology", "oncology", "cardiology"}


def test_a_failing_name_lookup_leaves_the_placeholder(strategy: FedSiloStrategy) -> None:
    def registry() -> dict[int, str]:
        raise ConnectionError("SuperLink unreachable")

    strategy.use_registry(registry)
    assert strategy.name_of(5) == "node-5"
