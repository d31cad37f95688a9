"""A department's data must be usable before any budget is charged: enough examples, two classes, delta < 1/n."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from client.runner import Department
from client.site import SiteConfig
from common.config import JobConfig
from common.data import Split
from common.errors import ConfigError, DataError
from common.preflight import check_department_data

LABELS = ("negative", "positive", "neutral")


def test_usable_data_passes() -> None:
    check_department_data("a", np.array([0, 1] * 20), LABELS, delta=1e-5)
    check_department_data("a", np.array([0, 2, 2, 2]), LABELS, delta=None)  # 2 of 3 classes is fine


def test_too_few_examples_to_sample_batches_from() -> None:
    with pytest.raises(DataError, match=r"'a' has 3 training example\(s\), fewer than 4"):
        check_department_data("a", np.arange(3) % 2, LABELS, delta=None)
    check_department_data("a", np.arange(4) % 2, LABELS, delta=None)


@pytest.mark.parametrize(("labels", "only"), [([1] * 10, "positive"), ([2] * 10, "neutral")])
def test_one_class(labels: list[int], only: str) -> None:
    with pytest.raises(DataError, match=f"single class \\('{only}'\\)"):
        check_department_data("a", np.array(labels), LABELS, delta=1e-5)


@pytest.mark.parametrize(("n", "delta"), [(10, 0.1), (10, 0.5), (100, 0.01), (1000, 0.002)])
def test_delta_not_below_one_over_n(n: int, delta: float) -> None:
    with pytest.raises(ConfigError, match=f"delta={delta:g} is not below 1/n"):
        check_department_data("a", np.arange(n) % 2, LABELS, delta=delta)
    check_department_data("a", np.arange(n) % 2, LABELS, delta=None)  # no DP: no delta to check
    check_department_data("a", np.arange(n) % 2, LABELS, delta=delta * 0.99 / (delta * n))


def test_a_site_refuses_unusable_data_before_charging(tmp_path: Path) -> None:
    site = SiteConfig(name="cardiology", data="unused.csv", epsilon=8.0, delta=1e-5,
                      ledger=str(tmp_path / "ledger.json"))
    dept = Department(site, JobConfig(labels="negative,positive", batch_size=4), "run-1")
    dept._split = Split("cardiology", ["note"] * 20, np.ones(20, np.int64), ["note"], np.array([1]))
    with pytest.raises(DataError, match="single class"):
        dept.fit([np.zeros(2, np.float32)], 1, 2, None)
    assert not (tmp_path / "ledger.json").exists()  # nothing charged, nothing trained
