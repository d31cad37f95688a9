"""The run's typed records: every field of every record survives report.json, the committed schema is current,
reports written before the records were typed still load, and the files keep their layout."""

from __future__ import annotations

import csv
import inspect
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import ConfigError
from server import records
from server.records import (
    AggregateStatus,
    DepartmentRound,
    DepartmentSize,
    Dropout,
    PhasePlanRecord,
    PlanRecord,
    ResumeRecord,
    RoundRecord,
    RunReport,
    RunSummary,
    dump_report,
    load_report,
    read_report,
    report_schema,
    schema_text,
)
from server.report import REPORT_JSON, ROUNDS_CSV, RunRecorder

SCHEMA_FILE = Path(__file__).resolve().parents[2] / "docs" / "report.schema.json"

finite = st.floats(allow_nan=False, allow_infinity=False)
text = st.text(max_size=12)
names = st.text(min_size=1, max_size=8)
counts = st.integers(min_value=0, max_value=10**9)
json_scalars = st.none() | st.booleans() | st.integers() | finite | text


def _maybe(values: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.none() | values


# One strategy per field of every record: test_every_field_of_every_record_is_generated keeps this complete.
FIELDS: dict[type, dict[str, st.SearchStrategy[Any]]] = {
    DepartmentRound: {"status": text, "epsilon": _maybe(finite), "delta": _maybe(finite), "accuracy": _maybe(finite),
                      "n_test": _maybe(counts), "reason": _maybe(text), "train_seconds": _maybe(finite),
                      "evaluate_status": _maybe(text), "evaluate_reason": _maybe(text), "phase": _maybe(text)},
    Dropout: {"department": names, "node_id": st.integers(), "stage": text, "attempt": st.integers(1, 5)},
    PhasePlanRecord: {"phase": text, "rounds": counts, "batch_size": st.integers(1, 10**6), "expected_batch": finite,
                      "sample_rate": finite, "steps_per_round": st.integers(1, 10**6), "noise_multiplier": finite,
                      "clip_norm": finite, "noised_weights": counts, "noise_ratio": finite},
}
FIELDS[PlanRecord] = {
    "site": names, "n_train": counts, "epsilon_budget": finite, "delta": finite, "epsilon_spent": finite,
    "epsilon_planned": finite, "phases": st.lists(st.builds(PhasePlanRecord, **FIELDS[PhasePlanRecord]), max_size=2),
    "warnings": st.lists(text, max_size=2),
}
FIELDS |= {
    DepartmentSize: {"n_train": counts, "n_test": counts, "node_id": _maybe(st.integers()),
                     "plan": _maybe(st.builds(PlanRecord, **FIELDS[PlanRecord]))},
    ResumeRecord: {"after_round": counts, "time": text,
                   "checkpoint_versions": st.dictionaries(names, text, max_size=3)},
}
FIELDS[RoundRecord] = {
    "round": counts, "seconds": finite, "fit_seconds": finite, "global_accuracy": _maybe(finite), "failures": counts,
    "aggregate": st.sampled_from(AggregateStatus), "aggregate_reason": _maybe(text),
    "errors": st.lists(text, max_size=3), "attempts": st.integers(1, 5),
    "dropouts": st.lists(st.builds(Dropout, **FIELDS[Dropout]), max_size=3),
    "peak_rss_mb": _maybe(finite), "update_norm": _maybe(finite),
    "departments": st.dictionaries(names, st.builds(DepartmentRound, **FIELDS[DepartmentRound]), max_size=3),
}
FIELDS[RunSummary] = {
    "central_global_accuracy": _maybe(finite), "global_accuracy": _maybe(finite),
    "federated_global_accuracy": _maybe(finite), "epsilon": st.dictionaries(names, _maybe(finite), max_size=3),
    "delta": _maybe(finite), "dp": st.booleans(), "secure_aggregation": st.booleans(), "rounds_completed": counts,
    "outcome": st.sampled_from(["completed", "ended_early"]), "outcome_reason": _maybe(text),
    "privacy": _maybe(st.dictionaries(names, json_scalars, max_size=3)),
}
FIELDS[RunReport] = {
    "config": st.dictionaries(names, json_scalars, max_size=4),
    "departments": st.dictionaries(names, st.builds(DepartmentSize, **FIELDS[DepartmentSize]), max_size=3),
    "rounds": st.lists(st.builds(RoundRecord, **FIELDS[RoundRecord]), max_size=3),
    "resumes": st.lists(st.builds(ResumeRecord, **FIELDS[ResumeRecord]), max_size=2),
    "final": _maybe(st.builds(RunSummary, **FIELDS[RunSummary])),
}
reports = st.builds(RunReport, **FIELDS[RunReport])


def test_every_field_of_every_record_is_generated() -> None:
    models = {cls for _, cls in inspect.getmembers(records, inspect.isclass)
              if issubclass(cls, records.BaseModel) and cls.__module__ == records.__name__ and cls.model_fields}
    assert models == set(FIELDS)
    for model, fields in FIELDS.items():
        assert set(fields) == set(model.model_fields), model.__name__


@settings(max_examples=150, deadline=None)
@given(reports)
def test_every_field_of_every_record_survives_report_json(report: RunReport) -> None:
    text = json.dumps(dump_report(report), indent=2, allow_nan=False)  # what RunRecorder.write writes
    again = load_report(json.loads(text))
    assert again == report
    assert dump_report(again) == dump_report(report)


@settings(max_examples=50, deadline=None)
@given(reports)
def test_every_report_matches_the_committed_schema(report: RunReport) -> None:
    jsonschema.validate(dump_report(report), report_schema())


def test_the_committed_schema_is_current() -> None:
    assert SCHEMA_FILE.read_text(encoding="utf-8") == schema_text(), (
        "docs/report.schema.json is stale: regenerate it with `python -m server.records > docs/report.schema.json`")


def test_a_report_written_before_the_records_were_typed_still_loads() -> None:
    old = {"config": {"num-server-rounds": 2}, "departments": {"a": {"n_train": 4, "n_test": 1}},
           "rounds": [{"round": 1, "seconds": 1.0, "global_accuracy": None, "failures": 0,
                       "aggregate": "kept_previous: unmasked aggregate unusable: 1 arrays instead of 2",
                       "errors": [], "attempts": 1, "dropouts": [], "peak_rss_mb": None, "update_norm": None,
                       "departments": {"a": {"status": "trained", "epsilon": 1.0, "accuracy": None, "n_test": None,
                                             "train_seconds": None}}}],
           "resumes": [], "final": {}}
    report = load_report(old)
    assert report.final is None and report.rounds[0].fit_seconds == 0.0
    assert report.rounds[0].aggregate is AggregateStatus.KEPT_PREVIOUS
    assert report.rounds[0].aggregate_reason == "unmasked aggregate unusable: 1 arrays instead of 2"


@pytest.mark.parametrize("doc", [
    {"rounds": [{"round": 1}], "final": {}},  # no config
    {"config": {}, "rounds": [{"round": 1, "aggregate": "exploded"}]},
    {"config": {}, "rounds": [], "surprise": 1},
    [],
])
def test_what_is_not_a_report_is_refused_by_type(doc: Any) -> None:
    with pytest.raises(ConfigError, match="Not a fedsilo run report"):
        load_report(doc)


def test_read_report_names_an_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="Cannot read the run's report"):
        read_report(tmp_path / REPORT_JSON)
    (tmp_path / REPORT_JSON).write_text("{not json")
    with pytest.raises(ConfigError, match="Cannot read the run's report"):
        read_report(tmp_path / REPORT_JSON)


def test_files_keep_their_layout(tmp_path: Path) -> None:
    rec = RunRecorder({"num-server-rounds": 1}, tmp_path, budget=8.0)
    rec.department("b").n_train = 3
    r = rec.round(1)
    r.departments["b"] = DepartmentRound(status="trained", epsilon=float("nan"), accuracy=0.5)
    r.departments["a"] = DepartmentRound(status="dropped", reason="dropped out during setup (attempt 1)")
    r.keep_previous("no usable update")
    rec.write()
    doc = json.loads((tmp_path / REPORT_JSON).read_text())
    assert list(doc) == ["config", "departments", "rounds", "resumes", "final"] and doc["final"] is None
    row = doc["rounds"][0]
    assert list(row["departments"]) == ["a", "b"]  # sorted by name
    assert "reason" not in row["departments"]["b"] and row["departments"]["a"]["reason"].startswith("dropped")
    assert row["departments"]["b"]["epsilon"] is None  # a non-finite metric is written as null, not invalid JSON
    assert (row["aggregate"], row["aggregate_reason"]) == ("kept_previous", "no usable update")
    assert list(csv.reader((tmp_path / ROUNDS_CSV).read_text().splitlines()))[1][:5] == [
        "1", "0.000", "", "a", "dropped"]
    rec.report.final = RunSummary(global_accuracy=0.5, federated_global_accuracy=0.5, epsilon={"b": 1.0},
                                  delta=None, dp=True, secure_aggregation=True, rounds_completed=1)
    final = rec.to_dict()["final"]
    assert "central_global_accuracy" not in final and "privacy" not in final
