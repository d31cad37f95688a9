"""Recording a round into the run's report: what each department reported, who failed or dropped out (by name,
once known), what the aggregation decided, and the run's summary at the end. Also the log lines that go with them.

The strategy calls these; they change the `RunRecorder`'s typed records and never decide anything themselves.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence

from flwr.common import EvaluateRes, FitRes, Scalar
from pydantic import ValidationError

from common import keys
from server.aggregation import Outcome
from server.compat import ErrorCode
from server.records import AggregateStatus, DepartmentRound, Dropout, PlanRecord, RoundRecord, RunSummary
from server.report import RunRecorder

log = logging.getLogger(__name__)

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
FAILURE_TEXT_CHARS = 400
HALTED = "secure aggregation halted (too few departments)"
NO_AGGREGATE = "no aggregate (secure aggregation halted or no department trained)"
SECONDS_DIGITS = 3  # timings are recorded to the millisecond
PLAN_MAX_CHARS = 16_384  # a department's plan is a few hundred characters; anything far larger is not a plan


def failure_text(exc: object) -> str:
    """A department failure for the report: the end of its message (where the cause is), without the Ray
    traceback and terminal colours that precede it in simulation."""
    text = _ANSI.sub("", str(exc)).replace("\\n", "\n")
    lines = [line.strip() for line in text.splitlines() if re.search(r"\w", line)]
    tail = " | ".join(lines[-3:]) if lines else type(exc).__name__
    return tail[-FAILURE_TEXT_CHARS:]


def placeholder(node_id: int) -> str:
    """A department's name in the report while nothing better is known: it never answered, and the SuperLink does
    not know the name it was registered with."""
    return f"node-{node_id}"


def reported_name(metrics: Mapping[str, Scalar], node_id: int) -> str:
    return str(metrics.get(keys.M_DEPARTMENT, placeholder(node_id)))


def known_nodes(recorder: RunRecorder) -> dict[int, str]:
    """Node id -> department name, from the report (each department's `node_id`): what a resumed run knows."""
    return {size.node_id: name for name, size in recorder.departments.items() if size.node_id is not None}


def name_of(node_names: Mapping[int, str], registered: Mapping[int, str], node_id: int) -> str:
    """What to call a node: the name its department reported (this run or before its resume), else the name it was
    registered with at the SuperLink (`fedsilo server register --name`), else `node-<id>`."""
    return node_names.get(node_id) or registered.get(node_id) or placeholder(node_id)


def learn_name(recorder: RunRecorder, node_names: dict[int, str], node_id: int, name: str,
               provisional: str | None = None) -> None:
    """Remember which department a node is (in the report too: its `node_id`, kept across a resume). Records made
    before it first answered, under `node-<id>` or `provisional` (its registration name), are renamed; one entry
    per department per round stays (what the department said itself wins over what was recorded for it)."""
    recorder.department(name).node_id = node_id
    if node_names.get(node_id) == name:
        return
    node_names[node_id] = name
    olds = {placeholder(node_id), provisional} - {None, name}
    for record in recorder.rounds:
        for old in olds:
            if old in record.departments:
                record.departments.setdefault(name, record.departments.pop(old))
        for dropout in record.dropouts:
            if dropout.node_id == node_id:
                dropout.department = name
    for old in olds:
        size = recorder.departments.get(old)  # type: ignore[arg-type]
        if size is not None and size.node_id in (None, node_id):
            del recorder.departments[old]  # type: ignore[arg-type]


def fit_started(recorder: RunRecorder, server_round: int, seconds: float, failures: Sequence[object]) -> RoundRecord:
    """The round's record at aggregate_fit: its fit time and the departments whose fit failed."""
    record = recorder.round(server_round)
    record.fit_seconds = round(seconds, SECONDS_DIGITS)
    record.failures = len(failures)
    for exc in failures:
        log.warning("aggregate_fit: round %s: a department failed: %s", server_round, exc)
        record.errors.append(failure_text(exc))
    return record


def fit_result(recorder: RunRecorder, record: RoundRecord, name: str, res: FitRes) -> DepartmentRound:
    """A department's fit reply: its status, epsilon, reason, training time and training examples."""
    metrics = res.metrics
    status = str(metrics.get(keys.M_STATUS, keys.STATUS_FAILED))
    if keys.M_NUM_EXAMPLES in metrics:  # a failure reply does not say: the size it last reported stays
        recorder.department(name).n_train = int(metrics[keys.M_NUM_EXAMPLES])
    else:
        recorder.department(name)
    dept = DepartmentRound(status=status, epsilon=_number(metrics.get(keys.M_EPSILON)),
                           delta=_number(metrics.get(keys.M_DELTA)), reason=_text(metrics.get(keys.M_REASON)),
                           train_seconds=_number(metrics.get(keys.M_TRAIN_SECONDS)),
                           phase=_text(metrics.get(keys.M_PHASE)))
    record.departments[name] = dept
    if keys.M_PLAN in metrics and recorder.department(name).plan is None:
        recorder.department(name).plan = _plan(name, metrics[keys.M_PLAN])
    return dept


def _plan(name: str, value: Scalar) -> PlanRecord | None:
    """A department's plan as it sent it (JSON), or None (logged) when it is not a readable plan."""
    if not isinstance(value, str) or len(value) > PLAN_MAX_CHARS:
        log.warning("department %s sent a plan that is not a JSON text of at most %d characters; not recorded",
                    name, PLAN_MAX_CHARS)
        return None
    try:
        return PlanRecord.model_validate_json(value)
    except ValidationError as exc:
        log.warning("department %s sent an unreadable plan (not recorded): %s", name, failure_text(exc))
        return None


def rejected(dept: DepartmentRound, server_round: int, name: str, node_id: int, why: str) -> None:
    """The server refused a department's own update (seen in the clear): it counts as failed, by name."""
    dept.status, dept.reason = keys.STATUS_FAILED, f"rejected update: {why}"
    log.error("aggregate_fit: round %s: rejected the update of %s (node %s): %s", server_round, name, node_id, why)


def outcome(record: RoundRecord, decided: Outcome) -> None:
    """What the aggregation decided for the round."""
    if decided.applied:
        record.aggregate, record.aggregate_reason = AggregateStatus.APPLIED, None
        record.update_norm = decided.update_norm
    else:
        record.keep_previous(decided.reason or "")


def halt(recorder: RunRecorder, server_round: int, failures: Sequence[BaseException], attempt: int,
         retries: int) -> None:
    """Secure aggregation halted the round (too few departments answered): its failures and attempts."""
    record = recorder.round(server_round)
    record.failures = len(failures)
    # Another attempt follows while retries are left (secagg.ReportingSecAggPlusWorkflow).
    record.attempts = max(record.attempts, min(attempt + 1, retries + 1))
    record.errors.extend(f"attempt {attempt}: {failure_text(exc)}" for exc in failures)
    record.keep_previous(HALTED)
    log.error("round %s: secure aggregation halted (attempt %d); %d department failure(s)", server_round,
              attempt, len(failures))


def dropouts(recorder: RunRecorder, names: Callable[[int], str], server_round: int, stage: str,
             node_ids: set[int], attempt: int) -> None:
    """Departments that stopped answering in `stage` (a SecAgg+ stage, "train" or "evaluate"), named by `names`."""
    record = recorder.round(server_round)
    record.attempts = max(record.attempts, attempt)
    for node_id in sorted(node_ids):
        name = names(node_id)
        record.dropouts.append(Dropout(department=name, node_id=node_id, stage=stage, attempt=attempt))
        if stage not in ("unmask", "evaluate"):  # its update was not aggregated
            record.departments[name] = DepartmentRound(status=keys.STATUS_DROPPED,
                                                       reason=f"dropped out during {stage} (attempt {attempt})")
    log.warning("round %s: %d department(s) dropped out during %s (attempt %d): %s", server_round,
                len(node_ids), stage, attempt, ", ".join(names(n) for n in sorted(node_ids)))


def node_gone(code: int) -> bool:
    """Whether an error reply's code says the node (or its message) is gone, rather than that its ClientApp
    failed."""
    return code in {ErrorCode.NODE_UNAVAILABLE, ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE}


def _code_name(code: int) -> str:
    names = {value: name for name, value in vars(ErrorCode).items() if isinstance(value, int) and name.isupper()}
    return names.get(code, f"error code {code}")


def error_replies(recorder: RunRecorder, names: Callable[[int], str], server_round: int, stage: str,
                  codes: Mapping[int, int]) -> None:
    """Departments whose node answered `stage` ("train" or "evaluate") with an error instead of a result: their
    ClientApp failed outside the department's own code (a mod, the site's gate, loading the app). Recorded as
    failed with the error's code only: Flower's text of it (in `errors`) may carry the site's paths."""
    record = recorder.round(server_round)
    for node_id, code in sorted(codes.items()):
        name = names(node_id)
        reason = f"the site's ClientApp failed ({_code_name(code)}); see the site's log"
        if stage == "evaluate":
            dept = record.departments.setdefault(name, DepartmentRound(status=keys.STATUS_FAILED))
            dept.evaluate_status, dept.evaluate_reason = keys.STATUS_FAILED, reason
        else:
            record.departments[name] = DepartmentRound(status=keys.STATUS_FAILED, reason=reason)
        log.warning("round %s: %s (node %s) answered %s with an error: %s", server_round, name, node_id, stage,
                    _code_name(code))


def evaluation(recorder: RunRecorder, record: RoundRecord, name: str, res: EvaluateRes) -> None:
    """A department's evaluation reply: the global model's accuracy on its test, its epsilon, its test size; or
    that its evaluation failed, and why (in its own words, one public line)."""
    dept = record.departments.setdefault(name, DepartmentRound(status=keys.STATUS_FAILED))
    if res.metrics.get(keys.M_STATUS) == keys.STATUS_FAILED:
        dept.evaluate_status = keys.STATUS_FAILED
        dept.evaluate_reason = _text(res.metrics.get(keys.M_REASON)) or "no reason given"
        log.warning("aggregate_evaluate: round %s: %s's evaluation failed: %s", record.round, name,
                    dept.evaluate_reason)
        return
    dept.accuracy = float(res.metrics.get(keys.M_ACCURACY, 0.0))
    epsilon = res.metrics.get(keys.M_EPSILON)
    dept.epsilon = dept.epsilon if epsilon is None else _number(epsilon)
    delta = res.metrics.get(keys.M_DELTA)
    dept.delta = dept.delta if delta is None else _number(delta)
    dept.n_test = res.num_examples
    recorder.department(name).n_test = res.num_examples


NOT_ASKED = "not connected when the round started"
NO_REPLY = "asked, but no reply was recorded"


def round_finished(recorder: RunRecorder, record: RoundRecord, accuracy: float | None, seconds: float,
                   asked: set[str] | None = None) -> None:
    """The end of a round: every department the run knows has one entry. One that was asked (`asked`, by name)
    and has none failed; one that was not asked was not seen (it was not connected). A round that never aggregated
    says so."""
    for name in recorder.departments:
        if name not in record.departments:
            not_asked = asked is not None and name not in asked
            record.departments[name] = DepartmentRound(status=keys.STATUS_NOT_SEEN if not_asked
                                                       else keys.STATUS_FAILED,
                                                       reason=NOT_ASKED if not_asked else NO_REPLY)
    if record.aggregate is AggregateStatus.PENDING:
        record.keep_previous(NO_AGGREGATE)
    record.global_accuracy = accuracy
    record.seconds = round(seconds, SECONDS_DIGITS)


def log_round(record: RoundRecord, num_rounds: int, eval_failures: int) -> None:
    parts = ", ".join(_describe(name, d) for name, d in sorted(record.departments.items()))
    accuracy = record.global_accuracy
    log.info("round %s/%s: %.1fs, global accuracy %s, aggregate %s, %s evaluation failures; %s",
             record.round, num_rounds, record.seconds, "n/a" if accuracy is None else f"{accuracy:.4f}",
             record.describe_aggregate(), eval_failures, parts)


def _describe(name: str, d: DepartmentRound) -> str:
    """One department in a round's log line: status, epsilon, accuracy, and why it did not train or evaluate."""
    text = (f"{name}: {d.status} eps={d.epsilon if d.epsilon is None else round(d.epsilon, 3)} "
            f"acc={d.accuracy if d.accuracy is None else round(d.accuracy, 3)}")
    if d.status != keys.STATUS_TRAINED and d.reason:
        text += f" ({d.reason})"
    if d.evaluate_status is not None:
        text += f" [evaluation {d.evaluate_status}: {d.evaluate_reason}]"
    return text


def reported_delta(recorder: RunRecorder) -> float | None:
    """The largest delta any department reported in the run (None if none did). Each department's epsilon holds at
    its own delta, so at this one too ((eps, d)-DP implies (eps, d')-DP for d' >= d): one delta for the run's
    statement when sites' configs differ."""
    deltas = [d.delta for r in recorder.rounds for d in r.departments.values() if d.delta is not None]
    return max(deltas, default=None)


def run_summary(recorder: RunRecorder, *, delta: float | None, dp: bool, secure_aggregation: bool) -> RunSummary:
    """The run's end: the central accuracy if there is one (else the last round's federated one), each department's
    epsilon after the last round, and what protected the updates. The privacy statement is the caller's. `delta` is
    the simulation's; in deployment (None) it is the departments' own (`reported_delta`)."""
    last = recorder.rounds[-1] if recorder.rounds else None
    federated = last.global_accuracy if last else None
    central = recorder.central_accuracy
    return RunSummary(central_global_accuracy=central, global_accuracy=federated if central is None else central,
                      federated_global_accuracy=federated,
                      epsilon={name: d.epsilon for name, d in sorted(last.departments.items())} if last else {},
                      delta=delta if delta is not None else reported_delta(recorder), dp=dp,
                      secure_aggregation=secure_aggregation,
                      rounds_completed=len(recorder.rounds))


def _number(value: Scalar | None) -> float | None:
    """A numeric metric as a float (a department sending something else is recorded as not having sent it)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _text(value: Scalar | None) -> str | None:
    return None if value is None else str(value)


def idle_rounds(rounds: list[RoundRecord], min_departments: int) -> int:
    """How many of the last rounds, in a row, had fewer than `min_departments` departments that trained."""
    count = 0
    for record in reversed(rounds):
        if sum(d.status == keys.STATUS_TRAINED for d in record.departments.values()) >= min_departments:
            break
        count += 1
    return count


def idle_reason(rounds: list[RoundRecord], min_departments: int) -> str:
    """Why the last rounds were idle: each department's status (and reason) in the last one."""
    last = rounds[-1]
    statuses = ", ".join(f"{name}: {d.status}" + (f" ({d.reason})" if d.reason else "")
                         for name, d in sorted(last.departments.items())) or "no department answered"
    return (f"fewer than min-departments ({min_departments}) departments trained in "
            f"{idle_rounds(rounds, min_departments)} consecutive round(s); last round: {statuses}")
