"""A department's failure reaches the server as a typed status and one public line: no paths, no data values."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from client.app import DepartmentClient
from client.failures import REASON_CHARS, failure_metrics, public_reason
from client.runner import FitOutcome
from common import keys
from common.errors import (
    ConfigError,
    DataError,
    InvalidUpdateError,
    ModelError,
    PolicyError,
    SecureAggregationError,
)

SITE = "radiology-2"


@pytest.mark.parametrize(("exc", "expected"), [
    (DataError(f"Site {SITE}: labels ['cancer', 'flu'] in /srv/data/rad/train.csv are not among the job's labels "
               "{'a', 'b'}"),
     f"DataError at site {SITE}: labels <values> in <path> are not among the job's labels <values>"),
    (ConfigError("Cannot read /etc/fedsilo/site.toml: No such file or directory"),
     f"ConfigError at site {SITE}: Cannot read <path>: No such file or directory"),
    (InvalidUpdateError(f"Site {SITE}: refusing to send its update of round 3: norm 12.5 over bound 1e3."),
     f"InvalidUpdateError at site {SITE}: refusing to send its update of round <n>: norm <n> over bound <n>."),
    (SecureAggregationError(f"Site {SITE} has 1234 training examples, more than secagg-max-weight 1000"),
     f"SecureAggregationError at site {SITE}: Site {SITE} has <n> training examples, more than "
     "secagg-max-weight <n>"),
    (PolicyError(f'Site {SITE} refuses the job: its job id "x/y" is not allowed\n  Traceback line ~/secret.csv'),
     f"PolicyError at site {SITE}: Site {SITE} refuses the job: its job id <value> is not allowed"),
    (ModelError("C:\\data\\model.bin differs (value nan, 3.5%, -inf)"),
     f"ModelError at site {SITE}: <path> differs (value <n>, <n>, <n>)"),
    (DataError("\x1b[31mtext \x07with 'quoted training text' and `code`\x1b[0m"),
     f"DataError at site {SITE}: text with <value> and <value>"),
])
def test_a_typed_error_keeps_its_type_and_message_without_paths_or_values(exc: Exception, expected: str) -> None:
    assert public_reason(exc, SITE) == expected


@pytest.mark.parametrize("exc", [KeyError("patient 4711"), ValueError("/srv/data/x.csv line 3: 'text'"),
                                 RuntimeError("CUDA out of memory")])
def test_an_unexpected_error_says_nothing_of_its_message(exc: Exception) -> None:
    reason = public_reason(exc, SITE)
    assert reason == f"internal error ({type(exc).__name__}) at site {SITE}; see the site's log"


def test_a_reason_is_one_short_line_and_names_the_site_even_when_unknown() -> None:
    reason = public_reason(DataError("word " * 200 + "\nsecond line"), None)
    assert "\n" not in reason and len(reason) <= REASON_CHARS and reason.startswith("DataError at site this site")
    assert public_reason(DataError(""), SITE) == f"DataError at site {SITE}"
    metrics = failure_metrics(DataError("x"), SITE)
    assert metrics == {keys.M_STATUS: keys.STATUS_FAILED, keys.M_REASON: f"DataError at site {SITE}: x",
                       keys.M_DEPARTMENT: SITE}
    assert keys.M_DEPARTMENT not in failure_metrics(DataError("x"), None)


class _Site:
    name = SITE


class _Failing:
    site = _Site()

    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def fit(self, *_args: object, **_kwargs: object) -> FitOutcome:
        raise self.exc

    def evaluate(self, *_args: object) -> tuple[float, int, dict[str, float]]:
        raise self.exc


CONFIG = {keys.CFG_ROUND: 1, keys.CFG_NUM_ROUNDS: 2}


def test_a_failed_fit_answers_with_its_status_and_no_update(caplog: pytest.LogCaptureFixture) -> None:
    global_arrays = [np.ones((2, 3), np.float32), np.full(4, 7.0, np.float32)]
    client = DepartmentClient(_Failing(DataError("labels ['x'] in /data/train.csv")))  # type: ignore[arg-type]
    with caplog.at_level(logging.INFO):
        arrays, n, metrics = client.fit(global_arrays, dict(CONFIG))
    assert n == 0 and all(not a.any() for a in arrays)
    assert [a.shape for a in arrays] == [(2, 3), (4,)] and [a.dtype for a in arrays] == [np.float32] * 2
    assert metrics[keys.M_STATUS] == keys.STATUS_FAILED and metrics[keys.M_DEPARTMENT] == SITE
    assert metrics[keys.M_REASON] == f"DataError at site {SITE}: labels <values> in <path>"
    assert f"site {SITE} failed" in caplog.text and "/data/train.csv" in caplog.text  # the whole error stays here


def test_an_unexpected_evaluate_error_is_logged_at_the_site_and_answered(caplog: pytest.LogCaptureFixture) -> None:
    client = DepartmentClient(_Failing(ZeroDivisionError("secret")))  # type: ignore[arg-type]
    with caplog.at_level(logging.INFO):
        loss, n, metrics = client.evaluate([np.ones(2, np.float32)], dict(CONFIG))
    assert (loss, n, metrics[keys.M_STATUS]) == (0.0, 0, keys.STATUS_FAILED)
    assert "secret" not in str(metrics[keys.M_REASON]) and "ZeroDivisionError" in str(metrics[keys.M_REASON])
    assert any(r.exc_info and f"site {SITE}" in r.getMessage() for r in caplog.records)


def test_a_department_that_cannot_be_built_is_answered_too() -> None:
    def make() -> object:
        raise ConfigError("Site config /etc/site.toml: unknown key 'x'")

    client = DepartmentClient(make=make)  # type: ignore[arg-type]
    _, n, metrics = client.fit([np.ones(2, np.float32)], dict(CONFIG))
    assert n == 0 and keys.M_DEPARTMENT not in metrics
    assert metrics[keys.M_REASON] == "ConfigError at site this site: Site config <path>: unknown key <value>"


def test_a_failure_after_the_charge_stays_charged_and_sends_nothing_trained(tmp_path) -> None:
    """Through the real `Department.fit` (model and training faked, as in test_ledger_crash): the update check
    refuses the trained update after the ledger was charged; the reply is the failure, with zeros, and the charge
    stays, exactly one, as when the error was raised."""
    from unittest import mock

    from tests.unit.test_ledger_crash import GLOBAL, _department, _Harness, _ledger

    harness = _Harness(tmp_path, budget=8.0)
    dept = _department(tmp_path, 8.0, 40, "run-1", rounds=3)
    client = DepartmentClient(dept)
    with harness.patched(None, dept), mock.patch("client.runner.check_update", lambda *a, **k: "not finite"):
        arrays, n, metrics = client.fit([a.copy() for a in GLOBAL], dict(CONFIG))
    assert n == 0 and all(not a.any() for a in arrays)
    assert metrics[keys.M_STATUS] == keys.STATUS_FAILED
    assert metrics[keys.M_REASON] == "InvalidUpdateError at site cardiology: refusing to send its update of round " \
                                     "<n>: not finite."
    assert harness.trained_with == [1] and len(_ledger(tmp_path, 8.0).read().entries) == 1
