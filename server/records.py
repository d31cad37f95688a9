"""The run's typed records: what report.json holds, and its one (de)serialisation.

`RunReport` is report.json (and the report a checkpoint carries): the job's config, each department's data sizes,
one `RoundRecord` per round and, once the run has ended, its `RunSummary`. Loading is `load_report` (pydantic's
validation), dumping is `dump_report` (pydantic's `model_dump`): there is no hand-written converter to drift.
`report_schema()` is the JSON schema of report.json (docs/report.schema.json; `python -m server.records` prints it).
"""

from __future__ import annotations

import json
import math
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_serializer,
    model_serializer,
    model_validator,
)

from common.errors import ConfigError


def _finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


# A measured value: a non-finite one (a department's NaN epsilon) is written as null, never as invalid JSON.
Measure = Annotated[float | None, PlainSerializer(_finite_or_none, return_type=float | None)]


class AggregateStatus(StrEnum):
    """What became of a round's aggregate; `RoundRecord.aggregate_reason` says why when it was not applied."""

    PENDING = "pending"  # the round has not aggregated yet
    APPLIED = "applied"  # the averaged update was added to the global model
    KEPT_PREVIOUS = "kept_previous"  # the previous global model was kept


class _Record(BaseModel):
    """A record: unknown fields are refused; fields named in `_OMIT_IF_NONE` are left out of the dump when None."""

    model_config = ConfigDict(extra="forbid")
    _OMIT_IF_NONE: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _omit_none(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        for name in self._OMIT_IF_NONE:
            if data.get(name) is None:
                data.pop(name, None)
        return data


class DepartmentRound(_Record):
    """One department in one round: what it reported (fit and evaluation metrics) and what the server decided."""

    _OMIT_IF_NONE = frozenset({"reason", "evaluate_status", "evaluate_reason", "phase"})

    status: str = Field(description="trained, declined_budget, declined_policy, failed, not_seen (not connected "
                                    "when the round started) or dropped")
    epsilon: Measure = Field(default=None, description="epsilon spent so far, from the department's own ledger")
    delta: Measure = Field(default=None, description="delta of that epsilon (the department's own site config)")
    accuracy: Measure = Field(default=None, description="accuracy of the global model on its held-out test")
    n_test: int | None = Field(default=None, description="its held-out test examples this round")
    reason: str | None = Field(default=None, description="why it did not train or was not counted")
    train_seconds: Measure = Field(default=None, description="its own local-training time this round")
    phase: str | None = Field(default=None, description="what it trained: probe (the head alone) or finetune")
    evaluate_status: str | None = Field(default=None, description="failed when its evaluation of the global model "
                                                                  "failed (absent: evaluated, or not asked)")
    evaluate_reason: str | None = Field(default=None, description="why its evaluation failed (one line, from the "
                                                                  "department: no data values or paths)")


class Dropout(_Record):
    """A department that stopped answering during a stage of a round."""

    department: str = Field(description="its name, or node-<id> while it has never answered")
    node_id: int
    stage: str = Field(description="a SecAgg+ stage (setup, share_keys, collect_masked_vectors, unmask), "
                                   "train or evaluate")
    attempt: int = Field(ge=1, description="the round's fit attempt (a halted SecAgg+ round may be retried)")


class PhasePlanRecord(_Record):
    """One phase of a department's plan (client.plan.PhasePlan)."""

    phase: str = Field(description="probe (the classifier head alone, on cached inputs) or finetune")
    rounds: int = Field(ge=0, description="rounds of this phase planned")
    batch_size: int = Field(ge=1)
    expected_batch: float
    sample_rate: float
    steps_per_round: int = Field(ge=1)
    noise_multiplier: float = Field(description="0 without DP")
    clip_norm: float
    noised_weights: int
    noise_ratio: float = Field(description="expected L2 norm of one averaged step's noise over the clip norm")


class PlanRecord(_Record):
    """A department's privacy-utility plan for the job, as it sent it with its first training reply, computed
    before it charged anything (client.plan.Plan)."""

    site: str
    n_train: int
    epsilon_budget: float
    delta: float
    epsilon_spent: float = Field(description="its epsilon before the job's first round it trained in")
    epsilon_planned: float = Field(description="its epsilon after every planned round")
    phases: list[PhasePlanRecord]
    warnings: list[str] = Field(default_factory=list)


class DepartmentSize(_Record):
    """A department's data sizes, as it last reported them, the node it last answered from, and its plan."""

    _OMIT_IF_NONE = frozenset({"node_id", "plan"})

    n_train: int = 0
    n_test: int = 0
    node_id: int | None = Field(default=None, description="the Flower node id it last answered from: the server "
                                                          "names that node's records by this department, on resume "
                                                          "too")
    plan: PlanRecord | None = Field(default=None, description="its privacy-utility plan, from its first training "
                                                              "reply")


class RoundRecord(_Record):
    """One round: timings, the aggregate's fate, failures, dropouts and each department's status."""

    round: int = Field(ge=0)
    seconds: float = Field(default=0.0, description="configure_fit to the end of federated evaluation")
    fit_seconds: float = Field(default=0.0, description="configure_fit to aggregate_fit (SecAgg+ stages included)")
    global_accuracy: Measure = Field(default=None, description="federated accuracy over the departments' tests")
    failures: int = Field(default=0, description="departments whose fit failed (exceptions) this round")
    aggregate: AggregateStatus = AggregateStatus.PENDING
    aggregate_reason: str | None = Field(default=None, description="why the aggregate was not applied")
    errors: list[str] = Field(default_factory=list, description="failure messages of departments this round")
    attempts: int = Field(default=1, ge=1, description="fit attempts (a halted SecAgg+ round may be retried)")
    dropouts: list[Dropout] = Field(default_factory=list)
    peak_rss_mb: Measure = Field(default=None, description="peak resident memory of the server's process tree")
    update_norm: Measure = Field(default=None, description="L2 norm of the applied global update")
    departments: dict[str, DepartmentRound] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _split_legacy_aggregate(cls, data: Any) -> Any:
        """Reports written before the status had its own reason field said "kept_previous: <why>"."""
        if isinstance(data, dict) and isinstance(data.get("aggregate"), str) and ": " in data["aggregate"]:
            status, reason = data["aggregate"].split(": ", 1)
            data = {**data, "aggregate": status, "aggregate_reason": data.get("aggregate_reason", reason)}
        return data

    @field_serializer("departments")
    def _sorted(self, departments: dict[str, DepartmentRound]) -> dict[str, Any]:
        return {name: departments[name] for name in sorted(departments)}

    def keep_previous(self, reason: str) -> None:
        self.aggregate, self.aggregate_reason = AggregateStatus.KEPT_PREVIOUS, reason

    def describe_aggregate(self) -> str:
        """The aggregate's status with its reason, for logs."""
        status = self.aggregate.value
        return status if self.aggregate_reason is None else f"{status} ({self.aggregate_reason})"


class ResumeRecord(_Record):
    """One `--resume` of the run."""

    after_round: int = Field(ge=0, description="the checkpoint's last completed round")
    time: str = Field(description="when the run was resumed (local time, ISO 8601)")
    checkpoint_versions: dict[str, str] = Field(description="library versions that wrote the checkpoint")


Outcome = Literal["completed", "ended_early"]


class RunSummary(_Record):
    """The end of the run: final accuracy, privacy spent and what protected the updates."""

    _OMIT_IF_NONE = frozenset({"central_global_accuracy", "privacy"})

    central_global_accuracy: Measure = Field(default=None, description="central evaluation on the global held-out "
                                                                       "test (simulation only)")
    global_accuracy: Measure = Field(description="the central accuracy if there is one, else the federated one")
    federated_global_accuracy: Measure = Field(description="the last round's federated accuracy")
    epsilon: dict[str, Measure] = Field(description="each department's epsilon after the last round")
    delta: float | None = Field(description="delta of the guarantee: the simulation's; in deployment the largest "
                                            "delta a department reported (each epsilon holds at it)")
    dp: bool
    secure_aggregation: bool
    rounds_completed: int = Field(ge=0)
    outcome: Outcome = Field(default="completed", description="completed: every round ran; ended_early: the job "
                                                               "stopped because too few departments could train")
    outcome_reason: str | None = Field(default=None, description="why the job ended early")
    privacy: dict[str, Any] | None = Field(default=None, description="the guarantee statement (DP runs)")


class RunReport(_Record):
    """report.json."""

    model_config = ConfigDict(title="fedsilo run report (report.json)")

    config: dict[str, Any] = Field(description="the job's run config (kebab-case keys)")
    departments: dict[str, DepartmentSize] = Field(default_factory=dict)
    rounds: list[RoundRecord] = Field(default_factory=list)
    resumes: list[ResumeRecord] = Field(default_factory=list)
    final: RunSummary | None = Field(default=None, description="null until the run has ended")

    @model_validator(mode="before")
    @classmethod
    def _legacy_final(cls, data: Any) -> Any:
        """Reports written before `final` was typed said {} (or only the central accuracy) for a run that had not
        ended, where they now say null."""
        final = data.get("final") if isinstance(data, dict) else None
        if isinstance(final, dict) and set(final) <= {"central_global_accuracy"}:
            data = {**data, "final": None}
        return data


def dump_report(report: RunReport) -> dict[str, Any]:
    """The report as a JSON document (report.json's content, and the report a checkpoint carries)."""
    return report.model_dump(mode="json")


def load_report(doc: Any) -> RunReport:
    """A report from its JSON document; ConfigError naming the first problems if it is not one."""
    try:
        return RunReport.model_validate(doc)
    except ValidationError as exc:
        raise ConfigError(f"Not a fedsilo run report: {exc.error_count()} problem(s): "
                          f"{'; '.join(_describe(e) for e in exc.errors()[:3])}") from exc


def read_report(path: Path) -> RunReport:
    """report.json at `path`; ConfigError if it is missing, unreadable or not a report."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"Cannot read the run's report {path}: {exc}") from exc
    try:
        return load_report(doc)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def _describe(error: Any) -> str:
    where = ".".join(str(part) for part in error["loc"]) or "report"
    return f"{where}: {error['msg']}"


def report_schema() -> dict[str, Any]:
    """The JSON schema of report.json (what `load_report` accepts)."""
    schema = RunReport.model_json_schema(mode="validation")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def schema_text() -> str:
    """docs/report.schema.json's exact content."""
    return json.dumps(report_schema(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    sys.stdout.write(schema_text())
