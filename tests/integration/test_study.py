"""`fedsilo study utility` on a tiny setup: every arm tunes on a 2-point grid, runs, and the study is written,
resumed and rendered."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.cli import main
from common.errors import ConfigError
from simulations.study import STUDY_JSON, STUDY_MD, UTILITY_PNG, run_study
from tests.conftest import TINY_JOB, make_department_frame

pytestmark = pytest.mark.slow


def test_utility_study_on_a_tiny_setup(tmp_path: Path) -> None:
    data = tmp_path / "departments.csv"
    make_department_frame({"cardiology": 40, "oncology": 32}).to_csv(data, index=False)
    rc = {**TINY_JOB, "num-server-rounds": 2, "sim-data": str(data)}
    grid = {"learning-rate": [0.02, 0.05]}  # two points: every arm tunes on its training rows, then runs once
    study = run_study(rc, tmp_path / "study", epsilons=[8.0], grid=grid)
    saved = json.loads((tmp_path / "study" / STUDY_JSON).read_text())
    assert [a["name"] for a in saved["arms"]] == ["centralized", "federated", "federated-dp-eps8"]
    assert saved["grid"] == grid and len(saved["trials"]) == 6
    assert all(0 <= t["validation_accuracy"] <= 1 and t["seconds"] > 0 for t in saved["trials"])
    budget = saved["budget"]
    assert budget["probe_rounds"] == 1 and budget["finetune_rounds"] == 1
    assert budget["total_steps"] == sum(d["steps_per_round"] for d in budget["departments"].values())
    for arm in saved["arms"]:
        assert 0 <= arm["global_accuracy"] <= 1
        assert set(arm["departments"]) == {"cardiology", "oncology"}
        assert arm["point"] == saved["chosen"][arm["name"]]["values"]
        assert arm["head_examples"] > 0  # every arm starts from a head trained alone
        # one compute budget for every arm, in examples (the centralized arm's batches: to half a batch)
        assert abs(sum(arm["examples"].values()) - budget["examples"]) <= 4
    assert set(saved["arms"][1]["examples"]) == {"cardiology", "oncology"}
    assert 0 < saved["majority"]["accuracy"] < 1
    assert set(saved["goals"]) == {"dp_eps8_gap_points", "federated_gap_points", "dp_eps8_above_majority_points"}
    assert saved["arms"][2]["epsilon_spent"]["cardiology"] <= 8.0
    assert (tmp_path / "study" / UTILITY_PNG).stat().st_size > 0
    table = (tmp_path / "study" / STUDY_MD).read_text()
    assert "| federated-dp-eps8 | 8 |" in table and "not included in the epsilons" in table
    assert study.arm("centralized") is not None
    # --resume with every trial and arm done runs nothing and keeps the results
    again = run_study(rc, tmp_path / "study", epsilons=[8.0], grid=grid, resume=True)
    assert [a.global_accuracy for a in again.arms] == [a["global_accuracy"] for a in saved["arms"]]
    assert len(again.trials) == 6
    with pytest.raises(ConfigError, match="already holds a study"):
        run_study(rc, tmp_path / "study", epsilons=[8.0], grid=grid)
    # --render rewrites the table and the docs section from study.json without running anything
    docs = tmp_path / "docs" / "benchmarks.md"
    assert main(["study", "utility", "--out", str(tmp_path / "study"), "--render", "--docs", str(docs)]) == 0
    assert "| federated-dp-eps8 | 8 |" in docs.read_text() and (docs.parent / "utility-departments.png").is_file()
    assert "<!-- fedsilo:study-departments:start -->" in docs.read_text()
    assert main(["study", "utility", "--out", str(tmp_path / "none"), "--render"]) == 2
    with pytest.raises(ConfigError, match="sets dp"):
        run_study({**rc, "dp": False}, tmp_path / "other")
