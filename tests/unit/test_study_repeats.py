"""The utility study's repeats: every arm runs once per seed, tables give medians, --resume adds only missing runs.

The arms' training is replaced by a recorder (the real arms run in tests/integration/test_bench.py); what is checked
here is the orchestration: which (arm, seed) runs happen, what study.json keeps, how medians and ranges come out, and
that a study.json written before repeats existed still loads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeAlias

import pytest

import simulations.study as study_mod
from common.errors import ConfigError
from simulations.study import STUDY_JSON, STUDY_MD, Arm, ArmRun, load_study, run_study
from tests.conftest import TINY_JOB, make_department_frame
from tests.unit.test_bench_plan import MACHINE

# global accuracy of each (arm, seed): medians and ranges below are computed from these by hand
ACCURACY = {("centralized", 0): 0.90, ("centralized", 1): 0.80, ("centralized", 2): 0.85,
            ("federated", 0): 0.70, ("federated", 1): 0.88, ("federated", 2): 0.86,
            ("federated-dp-eps8", 0): 0.60, ("federated-dp-eps8", 1): 0.84, ("federated-dp-eps8", 2): 0.81}


ONE_POINT = {"learning-rate": [0.05]}  # no tuning: these tests are about repeats (tuning: test_study_tuning.py)

Recorded: TypeAlias = tuple[dict[str, Any], list[tuple[str, int]]]  # the study's run config, the (arm, seed) runs


@pytest.fixture()
def recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Recorded:
    data = tmp_path / "departments.csv"
    make_department_frame({"cardiology": 40, "oncology": 32}).to_csv(data, index=False)
    calls: list[tuple[str, int]] = []

    def fake_central(rc: dict[str, Any], out_dir: Path) -> ArmRun:
        seed = int(rc["seed"])
        calls.append(("centralized", seed))
        acc = ACCURACY[("centralized", seed)]
        return ArmRun(seed, acc, {"cardiology": acc, "oncology": acc - 0.1}, 60.0)

    def fake_federated(rc: dict[str, Any], run_dir: Path, epsilon: float | None) -> ArmRun:
        seed = int(rc["seed"])
        name = "federated" if epsilon is None else f"federated-dp-eps{epsilon:g}"
        calls.append((name, seed))
        assert run_dir.name == (name if seed == 0 else f"{name}-seed{seed}")
        acc = ACCURACY[(name, seed)]
        spent = {} if epsilon is None else {"cardiology": epsilon - seed / 10, "oncology": epsilon}
        return ArmRun(seed, acc, {"cardiology": acc, "oncology": acc - 0.1}, 120.0 + seed, spent)

    monkeypatch.setattr(study_mod, "run_centralized", fake_central)
    monkeypatch.setattr(study_mod, "describe", lambda: MACHINE)
    monkeypatch.setattr(study_mod, "run_federated", fake_federated)
    return {**TINY_JOB, "num-server-rounds": 2, "sim-data": str(data)}, calls


def test_repeats_give_medians_and_ranges(tmp_path: Path, recorded: Recorded) -> None:
    rc, calls = recorded
    study = run_study(rc, tmp_path / "s", epsilons=[8.0], grid=ONE_POINT, repeats=3)
    # every arm once, then every arm's second run, ...: an interrupted study has whole rounds of arms
    assert calls == [(name, seed) for seed in (0, 1, 2) for name in ("centralized", "federated", "federated-dp-eps8")]
    saved = json.loads((tmp_path / "s" / STUDY_JSON).read_text())
    arms = {a["name"]: a for a in saved["arms"]}
    assert arms["centralized"]["global_accuracy"] == pytest.approx(0.85)
    assert arms["federated"]["global_accuracy"] == pytest.approx(0.86)
    assert arms["federated-dp-eps8"]["global_accuracy"] == pytest.approx(0.81)
    assert arms["federated-dp-eps8"]["global_accuracy_range"] == pytest.approx([0.60, 0.84])
    assert arms["federated"]["departments"]["oncology"] == pytest.approx(0.76)
    assert arms["federated-dp-eps8"]["epsilon_spent"] == {"cardiology": 8.0, "oncology": 8.0}  # the most spent
    assert [r["seed"] for r in arms["federated"]["runs"]] == [0, 1, 2]
    # goals compare medians: 0.86 - 0.81 = 5 points (one unlucky DP run alone would have said 10 - 26)
    assert saved["goals"]["dp_eps8_gap_points"]["value"] == pytest.approx(5.0)
    assert saved["goals"]["dp_eps8_gap_points"]["met"] is False
    assert saved["goals"]["federated_gap_points"]["value"] == pytest.approx(-1.0)
    table = (tmp_path / "s" / STUDY_MD).read_text()
    assert "| federated-dp-eps8 | 8 | 3 (0, 1, 2) | 0.8100 | 0.6000-0.8400 |" in table
    assert ("(medians of 3 runs and 3 runs) is 5.00 points below federated non-private (goal: at most 2 below: "
            "missed); gap seed by seed: seed 0: 10.00, seed 1: 4.00, seed 2: 5.00.") in table
    assert saved["goals"]["dp_eps8_gap_points"]["per_seed"] == pytest.approx({"0": 10.0, "1": 4.0, "2": 5.0})
    assert "is 1.00 points above centralized (goal: at most 2 below: met)" in table
    assert [a.global_accuracy for a in load_study(tmp_path / "s").arms] == pytest.approx([0.85, 0.86, 0.81])
    assert study.arm("federated") is not None


def test_resume_adds_only_missing_runs(tmp_path: Path, recorded: Recorded) -> None:
    rc, calls = recorded
    run_study(rc, tmp_path / "s", epsilons=[8.0], grid=ONE_POINT)
    assert calls == [("centralized", 0), ("federated", 0), ("federated-dp-eps8", 0)]
    calls.clear()
    with pytest.raises(ConfigError, match="already holds a study"):
        run_study(rc, tmp_path / "s", epsilons=[8.0], grid=ONE_POINT, repeats=2)
    assert calls == []
    run_study(rc, tmp_path / "s", epsilons=[8.0], grid=ONE_POINT, repeats=2, resume=True)
    assert calls == [("centralized", 1), ("federated", 1), ("federated-dp-eps8", 1)]
    calls.clear()
    study = run_study(rc, tmp_path / "s", epsilons=[8.0], grid=ONE_POINT, repeats=2, resume=True)
    assert calls == []  # nothing left to run
    assert [len(a.runs) for a in study.arms] == [2, 2, 2]
    with pytest.raises(ConfigError, match="repeats must be at least 1"):
        run_study(rc, tmp_path / "s", epsilons=[8.0], grid=ONE_POINT, repeats=0, resume=True)
    with pytest.raises(ConfigError, match="other settings"):
        run_study({**rc, "learning-rate": 0.1}, tmp_path / "s", epsilons=[8.0], grid=ONE_POINT, repeats=3,
                  resume=True)
    assert calls == []
    assert [len(a.runs) for a in load_study(tmp_path / "s").arms] == [2, 2, 2]  # the refused resume changed nothing


def test_a_study_written_before_repeats_loads_as_one_run_each(tmp_path: Path) -> None:
    old_arm = {"name": "federated-dp-eps8", "epsilon": 8.0, "global_accuracy": 0.79, "departments": {"a": 0.8},
               "seconds": 300.0, "steps": 126, "epsilon_spent": {"a": 7.9}}
    arm = Arm.from_dict(old_arm, base_seed=4)
    assert arm.seeds() == [4]
    assert arm.global_accuracy == pytest.approx(0.79) and arm.accuracy_range() == pytest.approx([0.79, 0.79])
    assert arm.to_dict()["epsilon_spent"] == {"a": 7.9}
    again = Arm.from_dict(json.loads(json.dumps(arm.to_dict())), base_seed=0)  # the new format round-trips
    assert again == arm
