"""The utility study's tuning: a grid declared in advance, every arm tries every point on a validation split of its
training rows (never the test rows), the best validation accuracy wins, --resume skips finished trials.

The arms' training is replaced by fakes whose accuracy depends on the grid point and on which data they see (the
tuning data or the real data), so the tests can tell whether selection ever looked at a test accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeAlias

import pandas as pd
import pytest

import simulations.study as study_mod
from client.site import simulated_sites
from common.cli import main
from common.data import resolve_job
from common.errors import ConfigError
from simulations.docs import update_section
from simulations.study import (
    GOALS,
    STUDY_JSON,
    STUDY_MD,
    TUNING_DATA,
    VALIDATION_FRACTION,
    Arm,
    ArmRun,
    Study,
    Trial,
    _budget,
    centralized_schedule,
    choose,
    default_grid,
    grid_points,
    load_study,
    parse_grid,
    plot_name,
    run_study,
    run_study_command,
    section_name,
)
from tests.conftest import TINY_JOB, make_department_frame
from tests.unit.test_bench_plan import MACHINE

GRID = {"learning-rate": [0.01, 0.02, 0.04]}
# accuracy by (arm, learning rate): on the validation rows (tuning data) and on the test rows (real data). Test
# accuracy always prefers another point than validation does: a selection that peeked would pick it.
VALIDATION = {"centralized": {0.01: 0.70, 0.02: 0.80, 0.04: 0.75},
              "federated": {0.01: 0.60, 0.02: 0.65, 0.04: 0.66},
              "federated-dp-eps8": {0.01: 0.55, 0.02: 0.55, 0.04: 0.50}}  # a tie: the first declared wins
TEST = {"centralized": {0.01: 0.95, 0.02: 0.81, 0.04: 0.70},
        "federated": {0.01: 0.90, 0.02: 0.91, 0.04: 0.80},
        "federated-dp-eps8": {0.01: 0.70, 0.02: 0.99, 0.04: 0.98}}
CHOSEN = {"centralized": 0.02, "federated": 0.04, "federated-dp-eps8": 0.01}


class Interrupted(Exception):
    """Raised by a fake run to stop a study half-way."""


Calls: TypeAlias = list[tuple[str, str, float, int]]  # (arm, "tuning" or "final", learning rate, seed)


@pytest.fixture()
def fake_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, Any], Calls, dict[str, int]]:
    data = tmp_path / "departments.csv"
    make_department_frame({"cardiology": 40, "oncology": 32}).to_csv(data, index=False)
    calls: Calls = []
    stop = {"after": -1}  # raise Interrupted when this many runs have been made (-1: never)

    def outcome(arm: str, rc: dict[str, Any]) -> ArmRun:
        if len(calls) == stop["after"]:
            raise Interrupted
        assert rc["sim-split-seed"] == 0  # every run, of every seed, splits as the base seed does
        tuning = str(rc["sim-data"]).endswith(TUNING_DATA)
        if tuning:
            assert rc["sim-test-fraction"] == VALIDATION_FRACTION
        lr, seed = float(rc["learning-rate"]), int(rc["seed"])
        calls.append((arm, "tuning" if tuning else "final", lr, seed))
        acc = (VALIDATION if tuning else TEST)[arm][lr]
        return ArmRun(seed, acc, {"cardiology": acc, "oncology": acc}, 10.0)

    def fake_central(rc: dict[str, Any], out_dir: Path) -> ArmRun:
        return outcome("centralized", rc)

    def fake_federated(rc: dict[str, Any], run_dir: Path, epsilon: float | None) -> ArmRun:
        return outcome("federated" if epsilon is None else f"federated-dp-eps{epsilon:g}", rc)

    monkeypatch.setattr(study_mod, "run_centralized", fake_central)
    monkeypatch.setattr(study_mod, "run_federated", fake_federated)
    monkeypatch.setattr(study_mod, "describe", lambda: MACHINE)
    return {**TINY_JOB, "num-server-rounds": 2, "sim-data": str(data)}, calls, stop


def test_selection_uses_validation_accuracy_only(tmp_path: Path, fake_runs: Any) -> None:
    rc, calls, _ = fake_runs
    study = run_study(rc, tmp_path / "s", epsilons=[8.0], grid=GRID, repeats=3)
    arms = ("centralized", "federated", "federated-dp-eps8")
    tuning = [c for c in calls if c[1] == "tuning"]
    # every arm tries every point (the same effort), once, with the base seed, before any final run
    assert tuning == [(a, "tuning", lr, 0) for a in arms for lr in GRID["learning-rate"]]
    assert calls[:len(tuning)] == tuning
    finals = calls[len(tuning):]
    assert finals == [(a, "final", CHOSEN[a], seed) for seed in (0, 1, 2) for a in arms]
    assert {a.name: a.point for a in study.arms} == {a: {"learning-rate": lr} for a, lr in CHOSEN.items()}
    saved = json.loads((tmp_path / "s" / STUDY_JSON).read_text())
    assert saved["grid"] == GRID and saved["validation_fraction"] == VALIDATION_FRACTION
    assert saved["seeds"] == [0, 1, 2]
    assert len(saved["trials"]) == 9
    assert {t["arm"] for t in saved["trials"]} == set(arms)
    assert all(t["seconds"] == 10.0 for t in saved["trials"])
    assert saved["chosen"]["federated"] == {"point": 2, "values": {"learning-rate": 0.04}}
    assert saved["chosen"]["federated-dp-eps8"]["point"] == 0  # tied with point 1: the first declared
    table = (tmp_path / "s" / STUDY_MD).read_text()
    assert "| federated | 0.6000 | 0.6500 | **0.6600** | learning-rate=0.04 |" in table
    assert "not included in the epsilons" in table
    assert "(seeds 0, 1, 2: initialisation and batch order; every run tests on the same rows" in table
    assert "learning-rate 0.01, 0.02, 0.04: 3 point(s)" in table
    # the re-rendered study keeps the trials and the choice
    again = load_study(tmp_path / "s")
    assert again.chosen == study.chosen and again.trials == study.trials


def test_tuning_data_holds_only_the_training_rows(tmp_path: Path, fake_runs: Any) -> None:
    rc, _, _ = fake_runs
    run_study(rc, tmp_path / "s", epsilons=[8.0], grid=GRID)
    tuning = pd.read_csv(tmp_path / "s" / TUNING_DATA, dtype=str, keep_default_na=False)
    job, sim = resolve_job({**rc, "dp": False})
    for site in simulated_sites(job, sim, tmp_path):
        split = site.load_split(job.label_names)
        rows = tuning[tuning["department"] == site.name]
        assert sorted(rows["text"]) == sorted(split.train_texts)  # exactly the site's training rows
        assert sorted(rows["label"]) == sorted(job.label_names[i] for i in split.train_labels)
        assert len(rows) + len(split.test_texts) == (40 if site.name == "cardiology" else 32)


def test_resume_skips_finished_trials(tmp_path: Path, fake_runs: Any) -> None:
    rc, calls, stop = fake_runs
    stop["after"] = 4  # interrupted during the federated arm's tuning
    with pytest.raises(Interrupted):
        run_study(rc, tmp_path / "s", epsilons=[8.0], grid=GRID)
    saved = json.loads((tmp_path / "s" / STUDY_JSON).read_text())
    assert [(t["arm"], t["point"]) for t in saved["trials"]] == [("centralized", 0), ("centralized", 1),
                                                                  ("centralized", 2), ("federated", 0)]
    done = list(calls)
    calls.clear()
    stop["after"] = -1
    study = run_study(rc, tmp_path / "s", epsilons=[8.0], grid=GRID, resume=True)
    assert not set(done) & set(calls)  # no trial ran twice
    rest = [("federated", 0.02), ("federated", 0.04), *[("federated-dp-eps8", lr) for lr in GRID["learning-rate"]]]
    assert [(c[0], c[2]) for c in calls if c[1] == "tuning"] == rest
    assert len(study.trials) == 9
    calls.clear()
    run_study(rc, tmp_path / "s", epsilons=[8.0], grid=GRID, resume=True)
    assert calls == []
    with pytest.raises(ConfigError, match="other settings"):  # another grid is another study
        run_study(rc, tmp_path / "s", epsilons=[8.0], grid={"learning-rate": [0.01, 0.02]}, resume=True)


def test_ties_go_to_the_first_declared_point() -> None:
    trials = [Trial("a", 2, {"x": 3}, 0.8, 1.0), Trial("a", 0, {"x": 1}, 0.8, 1.0), Trial("a", 1, {"x": 2}, 0.7, 1.0)]
    assert choose(trials) == 0
    assert choose([Trial("a", 1, {}, 0.5, 1.0), Trial("a", 0, {}, 0.4, 1.0)]) == 1
    with pytest.raises(ConfigError, match="No tuning trial"):
        choose([])


def test_grid_parsing() -> None:
    assert parse_grid(["learning-rate=0.001, 0.01", "batch-size=32,64.0"]) == {"learning-rate": [0.001, 0.01],
                                                                               "batch-size": [32, 64]}
    assert grid_points({"a": [1, 2], "b": [3]}) == [{"a": 1, "b": 3}, {"a": 2, "b": 3}]
    assert grid_points({}) == [{}]
    job, _ = resolve_job({**TINY_JOB, "sim-data": "x.csv", "labels": "negative,positive"})
    assert default_grid(job) == {"learning-rate": [0.025, 0.05, 0.1]}  # three points for every arm
    for bad, message in [("learning-rate", "wants KEY=V1,V2"), ("=1,2", "wants KEY=V1,V2"),
                         ("learning-rate=", "wants KEY=V1,V2"), ("nope=1", "'nope' is not a run-config key"),
                         ("seed=1,2", "'seed' is not a run-config key"), ("dp=0,1", "'dp' is not"),
                         ("num-server-rounds=2,3", "not a run-config key the study can tune"),
                         ("model=1", "is not"), ("learning-rate=0.1,abc", "'abc' is not a number"),
                         ("learning-rate=nan", "not a finite number"), ("batch-size=1.5", "whole numbers"),
                         ("learning-rate=0.1,0.1", "repeated")]:
        with pytest.raises(ConfigError, match=message):
            parse_grid([bad])
    with pytest.raises(ConfigError, match="twice"):
        parse_grid(["learning-rate=0.1", "learning-rate=0.2"])


def test_a_grid_point_that_makes_no_valid_job_stops_before_any_run(tmp_path: Path, fake_runs: Any) -> None:
    rc, calls, _ = fake_runs
    with pytest.raises(ConfigError, match="--grid point learning-rate=-1"):
        run_study(rc, tmp_path / "s", epsilons=[8.0], grid={"learning-rate": [0.01, -1.0]})
    assert calls == [] and not (tmp_path / "s").exists()


def test_budget_in_examples(tmp_path: Path) -> None:
    data = tmp_path / "departments.csv"
    make_department_frame({"cardiology": 40, "oncology": 32}).to_csv(data, index=False)
    rc = {**TINY_JOB, "num-server-rounds": 3, "sim-data": str(data)}
    budget = _budget(rc, tmp_path)
    assert budget["probe_rounds"] == 1 and budget["finetune_rounds"] == 2
    assert {d: v["train_rows"] for d, v in budget["departments"].items()} == {"cardiology": 32, "oncology": 26}
    for d in budget["departments"].values():  # fine-tuning rounds x steps x expected batch
        assert d["examples"] == pytest.approx(2 * d["steps_per_round"] * d["expected_batch"], abs=0.1)
    job, _ = resolve_job({**rc, "dp": False})
    schedule = centralized_schedule(budget, job)
    assert schedule["rows"] == 58
    # the same examples as the federated arms' fine-tuning at every department together (to half a batch)
    assert abs(schedule["examples"] - budget["examples"]) <= schedule["batch"] / 2
    # the head-only phase visits the probe's epochs of the pooled rows
    assert schedule["head_examples"] == pytest.approx(job.probe_epochs * 58, rel=0.25)


def _arm(name: str, epsilon: float | None, accuracies: list[float]) -> Arm:
    return Arm(name, epsilon, 10, [ArmRun(s, a, {}, 1.0) for s, a in enumerate(accuracies)])


@pytest.mark.parametrize("data", ["hutto", "hutto-small"])
def test_goals(data: str) -> None:
    study = Study(config={"data": data}, budget={}, machine={},
                  arms=[_arm("centralized", None, [0.80, 0.82, 0.84]), _arm("federated", None, [0.81, 0.80, 0.79]),
                        _arm("federated-dp-eps8", 8.0, [0.76, 0.77, 0.78]), _arm("federated-dp-eps3", 3.0, [0.77]),
                        _arm("federated-dp-eps1", 1.0, [0.60])],
                  majority={"label": "positive", "accuracy": 0.66, "seed": 0})
    goals = study.goals()
    assert goals["dp_eps8_gap_points"]["value"] == pytest.approx(3.0)
    assert goals["dp_eps3_gap_points"]["value"] == pytest.approx(3.0)
    assert goals["dp_eps1_gap_points"]["value"] == pytest.approx(20.0)
    assert goals["dp_eps1_gap_points"]["goal"] is None and goals["dp_eps1_gap_points"]["met"] is None
    assert goals["federated_gap_points"]["value"] == pytest.approx(2.0)
    assert goals["dp_eps8_above_majority_points"]["value"] == pytest.approx(11.0)
    if data == "hutto":  # eps 8 within 2 of federated non-private, eps 3 within 4, federated within 2
        assert goals["dp_eps8_gap_points"]["goal"] == 2.0 and goals["dp_eps8_gap_points"]["met"] is False
        assert goals["dp_eps3_gap_points"]["goal"] == 4.0 and goals["dp_eps3_gap_points"]["met"] is True
        assert goals["federated_gap_points"]["met"] is True
        assert goals["dp_eps8_above_majority_points"]["met"] is None
    else:  # small departments: eps 8 at least 10 above the majority class, within 6 of non-private
        assert goals["dp_eps8_gap_points"]["goal"] == 6.0 and goals["dp_eps8_gap_points"]["met"] is True
        assert goals["dp_eps8_above_majority_points"]["goal"] == 10.0
        assert goals["dp_eps8_above_majority_points"]["met"] is True
    assert GOALS["default"]["dp_eps8"] == 2.0


def test_docs_sections_per_data(tmp_path: Path, fake_runs: Any) -> None:
    rc, _, _ = fake_runs
    assert (section_name("hutto"), plot_name("hutto")) == ("study", "utility.png")  # the existing section
    assert (section_name("hutto-small"), plot_name("hutto-small")) == ("study-hutto-small", "utility-hutto-small.png")
    assert section_name("/data/My Clinics.csv") == "study-my-clinics"
    run_study(rc, tmp_path / "s", epsilons=[8.0], grid={"learning-rate": [0.02]})
    docs = tmp_path / "docs" / "benchmarks.md"
    update_section(docs, "study", "## Utility study\n\nthe Hutto table")
    saved = json.loads((tmp_path / "s" / STUDY_JSON).read_text())
    saved["config"]["data"] = "hutto-small"
    (tmp_path / "s" / STUDY_JSON).write_text(json.dumps(saved))
    run_study_command({}, tmp_path / "s", [8.0], docs, render=True)
    text = docs.read_text()
    assert "the Hutto table" in text  # regenerating the small study keeps the Hutto one
    assert "<!-- fedsilo:study-hutto-small:start -->" in text
    assert "## Utility study: small departments (hutto-small)" in text
    assert "above the majority class (goal: at least 10 above" in text
    assert (docs.parent / "utility-hutto-small.png").is_file() and not (docs.parent / "utility.png").exists()


def test_help_documents_the_grid(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["study", "utility", "--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--grid KEY=V1,V2,..." in out and "not in epsilon" in out and "default 3" in out


def test_a_bad_grid_on_the_command_line_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "s"
    assert main(["study", "utility", "--out", str(out), "--grid", "learning-rate=0.01,fast"]) == 2
    assert "--grid learning-rate: 'fast' is not a number." in capsys.readouterr().err
    assert main(["study", "utility", "--out", str(out), "--grid", "clip=1,2"]) == 2
    assert "'clip' is not a run-config key the study can tune; tunable keys: " in capsys.readouterr().err
    assert not out.exists()


def test_the_split_seed_holds_the_test_rows_across_seeds(tmp_path: Path) -> None:
    data = tmp_path / "departments.csv"
    make_department_frame({"cardiology": 40, "oncology": 32}).to_csv(data, index=False)

    def test_rows(**keys: Any) -> list[list[str]]:
        job, sim = resolve_job({**TINY_JOB, "sim-data": str(data), **keys})
        return [s.load_split(job.label_names).test_texts for s in simulated_sites(job, sim, tmp_path)]

    assert test_rows(seed=1) != test_rows(seed=0)  # by default the seed sets the split
    assert test_rows(seed=1, **{"sim-split-seed": 0}) == test_rows(seed=0)
    assert test_rows(seed=2, **{"sim-split-seed": 0}) == test_rows(seed=0, **{"sim-split-seed": 0})
