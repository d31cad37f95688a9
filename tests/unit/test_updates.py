"""Hostile or broken updates: the shared check, a department refusing to send its own bad update (before SecAgg+
masks it), and the server rejecting bad individual updates by name (no SecAgg+) or a bad unmasked aggregate."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
import torch
from flwr.common import Code, FitRes, Parameters, Status, ndarrays_to_parameters, parameters_to_ndarrays

from client.ledger import LedgerFile
from client.runner import Department
from client.site import SiteConfig
from client.train import TrainResult
from common import keys
from common.config import JobConfig, SimulationConfig, as_run_config
from common.data import Split
from common.errors import ConfigError, InvalidUpdateError
from common.model import BuiltModel
from common.privacy import sample_rate
from common.updates import check_update, update_norm
from server.records import AggregateStatus
from server.report import RunRecorder
from server.strategy import FedSiloStrategy

REF = [np.zeros((2, 3), np.float32), np.zeros(2, np.float32)]


# --- the shared check --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("arrays", "reason"), [
    ([np.zeros((2, 3), np.float32)], "1 arrays instead of 2"),
    ([np.zeros((3, 2), np.float32), np.zeros(2, np.float32)], "array 0 (weight) has shape (3, 2)"),
    ([np.zeros((2, 3), np.float64), np.zeros(2, np.float32)], "array 0 (weight) has dtype float64"),
    ([np.zeros((2, 3), np.float32), np.array([1, np.nan], np.float32)], "array 1 (bias) is not finite"),
    ([np.zeros((2, 3), np.float32), np.array([np.inf, 0], np.float32)], "array 1 (bias) is not finite"),
    ([np.zeros((2, 3), np.float32), [0.0, 0.0]], "array 1 (bias) is a list"),
    ([np.full((2, 3), 3.0, np.float32), np.full(2, 3.0, np.float32)], "L2 norm 8.485 exceeds max-update-norm 5"),
])
def test_check_update_names_the_problem(arrays: list[np.ndarray], reason: str) -> None:
    why = check_update(arrays, REF, max_norm=5.0, names=["weight", "bias"])
    assert why is not None and why.startswith(reason), why


def test_check_update_accepts_a_good_update_and_any_float_when_asked() -> None:
    good = [np.full((2, 3), 0.5, np.float32), np.full(2, -0.5, np.float32)]
    assert check_update(good, REF, max_norm=2.0) is None
    as64 = [a.astype(np.float64) for a in good]
    assert "dtype" in check_update(as64, REF)
    assert check_update(as64, REF, exact_dtype=False) is None  # a dequantised SecAgg+ aggregate
    ints = [np.zeros((2, 3), np.int64), np.zeros(2, np.int64)]
    assert "non-floating" in check_update(ints, REF, exact_dtype=False)


def test_update_norm_is_accumulated_in_float64() -> None:
    big = [np.full(4, 3e19, np.float32)]  # the float32 sum of squares would overflow
    assert update_norm(big) == pytest.approx(6e19, rel=1e-6)
    assert update_norm([np.array([3.0, 4.0], np.float32), np.array([12.0], np.float32)]) == pytest.approx(13.0)
    assert update_norm([np.array([np.nan], np.float32)]) == math.inf


def test_max_update_norm_is_a_validated_config_key_and_in_the_app_config() -> None:
    assert JobConfig.from_run_config({"max-update-norm": 2.5}).max_update_norm == 2.5
    for bad in (0, -1.0, "big", float("inf")):
        with pytest.raises(ConfigError, match="max-update-norm"):
            JobConfig.from_run_config({"max-update-norm": bad})
    # pyproject's [tool.flwr.app.config] (what `flwr run` accepts) lists exactly the configs' keys and defaults
    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    app_config = pyproject["tool"]["flwr"]["app"]["config"]
    assert app_config == as_run_config(JobConfig(), SimulationConfig())


# --- a department checks its own update before it is masked --------------------------------------------------------

def _fit_with_training_result(tmp_path: Path, change: float, *, max_update_norm: float = 1000.0,
                              secagg: bool = True) -> Department:
    """Run the real Department.fit with the model faked as Linear(3, 2) and training adding `change` to it."""
    job = JobConfig(labels="negative,positive", batch_size=4, local_epochs=0.5, max_update_norm=max_update_norm,
                    secagg=secagg, min_departments=2 if secagg else 1, probe_rounds=0)
    site = SiteConfig(name="cardiology", data="unused.csv", epsilon=8.0, delta=1e-5,
                      ledger=str(tmp_path / "ledger.json"))
    dept = Department(site, job, "run-1")
    n = 40
    dept._split = Split("cardiology", ["note"] * n, np.arange(n) % 2, ["note", "note"], np.array([0, 1]))
    def fake_train(model: torch.nn.Module, data: object, job: JobConfig, *, batch_size: int, steps: int,
                   noise_multiplier: float, dev: torch.device, seed: int | None) -> TrainResult:
        q = sample_rate(batch_size, n)
        with torch.no_grad():
            model.weight.add_(change)
        return TrainResult(steps, 0.5, 0.0, [(noise_multiplier, q, steps)])

    with mock.patch("client.runner.train_round", fake_train), \
            mock.patch("client.runner.build_model", lambda job, k: BuiltModel(torch.nn.Linear(3, 2), None)), \
            mock.patch("client.plan.noise_for_budget", lambda **kw: 3.0), \
            mock.patch.object(Department, "_encode", lambda self, built, texts, labels: None):
        dept.outcome = dept.fit(REF, 1, 2, None)  # type: ignore[attr-defined]
    return dept


def test_a_good_update_is_sent(tmp_path: Path) -> None:
    dept = _fit_with_training_result(tmp_path, 0.01)
    np.testing.assert_allclose(dept.outcome.update[0], 0.01, rtol=1e-5)  # type: ignore[attr-defined]


@pytest.mark.parametrize(("change", "norm", "reason"), [
    (float("nan"), 1000.0, "is not finite"),
    (float("inf"), 1000.0, "is not finite"),
    (2.0, 1.0, "exceeds max-update-norm 1"),
])
def test_a_department_refuses_to_send_a_bad_update_but_keeps_the_charge(tmp_path: Path, change: float, norm: float,
                                                                          reason: str) -> None:
    with pytest.raises(InvalidUpdateError, match=reason) as info:
        _fit_with_training_result(tmp_path, change, max_update_norm=norm, secagg=False)
    assert "cardiology" in str(info.value) and "round 1" in str(info.value)
    # the round's privacy cost was charged before training: refusing to send never un-charges it
    ledger = LedgerFile(tmp_path / "ledger.json", "cardiology", 8.0, 1e-5, "rdp").read()
    assert [e.round for e in ledger.entries] == [1]


# --- the server ---------------------------------------------------------------------------------------------------

OK = Status(code=Code.OK, message="")


def _res(name: str, params: Parameters, n: int) -> tuple[SimpleNamespace, FitRes]:
    metrics = {keys.M_DEPARTMENT: name, keys.M_STATUS: keys.STATUS_TRAINED, keys.M_EPSILON: 1.0,
               keys.M_NUM_EXAMPLES: n}
    return SimpleNamespace(node_id=hash(name) % 1000), FitRes(status=OK, parameters=params, num_examples=n,
                                                               metrics=metrics)


def _strategy(tmp_path: Path, *, secagg: bool, max_update_norm: float = 10.0) -> FedSiloStrategy:
    initial = [np.ones((2, 3), np.float32), np.zeros(2, np.float32)]
    job = JobConfig(secagg=secagg, num_server_rounds=3, max_update_norm=max_update_norm)
    return FedSiloStrategy(job, initial, "fp", RunRecorder({}, tmp_path))


GOOD = [np.full((2, 3), 0.5, np.float32), np.full(2, 0.5, np.float32)]


@pytest.mark.parametrize(("bad", "reason"), [
    (ndarrays_to_parameters([np.full((2, 3), 50.0, np.float32), np.zeros(2, np.float32)]), "exceeds max-update-norm"),
    (ndarrays_to_parameters([a.astype(np.float64) for a in GOOD]), "dtype float64"),
    (ndarrays_to_parameters([np.zeros((2, 3), np.int32), np.zeros(2, np.int32)]), "dtype int32"),
    (Parameters(tensors=[b"not a numpy array", b"\x00\x01"], tensor_type="numpy.ndarray"), "cannot be decoded"),
])
def test_without_secagg_a_bad_update_is_rejected_by_name_and_the_job_goes_on(tmp_path: Path, bad: Parameters,
                                                                             reason: str) -> None:
    strategy = _strategy(tmp_path, secagg=False)
    results = [_res("cardiology", ndarrays_to_parameters(GOOD), 10), _res("mallory", bad, 10_000)]
    new = parameters_to_ndarrays(strategy.aggregate_fit(1, results, [])[0])
    np.testing.assert_allclose(new[0], 1.5)  # only cardiology's update was applied
    record = strategy.recorder.rounds[-1]
    assert record.aggregate is AggregateStatus.APPLIED
    dept = record.departments["mallory"]
    assert dept.status == keys.STATUS_FAILED and dept.reason.startswith("rejected update") and reason in dept.reason
    # next round: mallory behaves, both count
    results = [_res("cardiology", ndarrays_to_parameters(GOOD), 10), _res("mallory", ndarrays_to_parameters(GOOD), 10)]
    new = parameters_to_ndarrays(strategy.aggregate_fit(2, results, [])[0])
    np.testing.assert_allclose(new[0], 2.0)


def _secagg_round(strategy: FedSiloStrategy, server_round: int, aggregate: list[np.ndarray]) -> list[np.ndarray]:
    """Under SecAgg+, Flower hands every department's result the same unmasked aggregate."""
    params = ndarrays_to_parameters(aggregate)
    results = [_res(name, params, n) for name, n in (("cardiology", 10), ("oncology", 30))]
    return parameters_to_ndarrays(strategy.aggregate_fit(server_round, results, [])[0])


@pytest.mark.parametrize(("aggregate", "reason"), [
    ([np.full((2, 3), np.nan), np.zeros(2)], "not finite"),
    ([np.zeros((3, 2)), np.zeros(2)], "shape"),
    ([np.zeros((2, 3))], "1 arrays instead of 2"),
    ([np.full((2, 3), 100.0), np.zeros(2)], "exceeds max-update-norm"),
])
def test_with_secagg_a_bad_aggregate_keeps_the_previous_model_and_says_why(tmp_path: Path, aggregate: list,
                                                                           reason: str,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    strategy = _strategy(tmp_path, secagg=True)
    new = _secagg_round(strategy, 1, aggregate)
    np.testing.assert_array_equal(new[0], 1.0)  # previous global model kept
    record = strategy.recorder.rounds[-1]
    assert record.aggregate is AggregateStatus.KEPT_PREVIOUS
    assert record.aggregate_reason.startswith("unmasked aggregate unusable") and reason in record.aggregate_reason
    assert "round 1" in caplog.text and "unmasked aggregate is unusable" in caplog.text
    # no department is blamed: the server cannot know whose masked update broke the sum
    assert {d.status for d in record.departments.values()} == {keys.STATUS_TRAINED}
    # the job goes on: a good (float64, dequantised) aggregate next round is applied
    new = _secagg_round(strategy, 2, [a.astype(np.float64) for a in GOOD])
    np.testing.assert_allclose(new[0], 1.5)
    assert new[0].dtype == np.float32
    assert strategy.recorder.rounds[-1].aggregate is AggregateStatus.APPLIED
