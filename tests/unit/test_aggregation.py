"""The aggregation decisions as pure functions: which results take part, screening, and the round's outcome."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.common import Code, EvaluateRes, FitRes, Parameters, Status, ndarrays_to_parameters

from common import keys
from server import aggregation

OK = Status(code=Code.OK, message="")
GLOBAL = [np.ones((2, 2), np.float32), np.zeros(3, np.float32)]


def _fit(arrays: list[np.ndarray] | Parameters, n: int = 10) -> FitRes:
    params = arrays if isinstance(arrays, Parameters) else ndarrays_to_parameters(arrays)
    return FitRes(status=OK, parameters=params, num_examples=n, metrics={})


def test_only_a_trained_department_with_examples_takes_part() -> None:
    update = [np.zeros_like(a) for a in GLOBAL]
    assert aggregation.takes_part(keys.STATUS_TRAINED, _fit(update))
    assert not aggregation.takes_part(keys.STATUS_TRAINED, _fit(update, n=0))
    assert not aggregation.takes_part(keys.STATUS_DECLINED_BUDGET, _fit(update))


def test_screening_names_what_is_wrong() -> None:
    good = [np.full_like(a, 0.5) for a in GLOBAL]
    assert aggregation.screen_update(_fit(good), GLOBAL, max_norm=10.0) is None
    assert "exceeds max-update-norm" in aggregation.screen_update(_fit([a * 100 for a in good]), GLOBAL, 10.0)
    broken = Parameters(tensors=[b"junk"], tensor_type="numpy.ndarray")
    assert "cannot be decoded" in aggregation.screen_update(_fit(broken), GLOBAL, 10.0)
    # a dequantised SecAgg+ sum is float64 and may exceed the per-department bound by the slack
    as64 = [a.astype(np.float64) for a in good]
    assert aggregation.screen_unmasked_aggregate(_fit(as64), GLOBAL, 10.0) is None
    assert "dtype float64" in aggregation.screen_update(_fit(as64), GLOBAL, 10.0)


def test_the_average_is_applied_unless_missing_or_unusable() -> None:
    step = [np.full_like(a, 0.5) for a in GLOBAL]
    applied = aggregation.apply_average(GLOBAL, ndarrays_to_parameters(step))
    assert applied.applied and applied.reason is None
    np.testing.assert_allclose(applied.arrays[0], 1.5)
    assert applied.update_norm == pytest.approx(np.sqrt(7 * 0.25))
    missing = aggregation.apply_average(GLOBAL, None)
    assert not missing.applied and missing.reason == aggregation.AGGREGATION_FAILED and missing.arrays is GLOBAL
    nan = aggregation.apply_average(GLOBAL, ndarrays_to_parameters([np.full_like(a, np.nan) for a in GLOBAL]))
    assert not nan.applied and "not finite" in nan.reason and nan.arrays is GLOBAL and nan.update_norm is None


def test_federated_accuracy_pools_the_departments_tests() -> None:
    def res(correct: int, n: int) -> EvaluateRes:
        return EvaluateRes(status=OK, loss=0.0, num_examples=n, metrics={keys.M_CORRECT: correct})

    assert aggregation.federated_accuracy([res(9, 10), res(15, 30)]) == pytest.approx(24 / 40)
    assert aggregation.federated_accuracy([]) is None
