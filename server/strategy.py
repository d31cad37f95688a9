"""FedAvg of department updates (weighted by examples), applied to the global model, with validation and records.

Departments send *updates* (trained weights minus the global weights they started from). Under SecAgg+ the
server only ever sees their weighted sum; without it, each update is validated and a bad one is rejected by name.
The aggregate is validated too: if it is unusable the previous global model is kept and the round says why.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server import ClientManager
from flwr.server.strategy import FedAvg

from common import keys
from common.config import JobConfig
from common.params import add
from common.updates import AGGREGATE_NORM_SLACK, check_update, update_norm
from server.compat import ClientProxy
from server.report import DepartmentRound, RunRecorder

log = logging.getLogger(__name__)

CentralEval = Callable[[list[np.ndarray]], float]  # global arrays -> accuracy on the global held-out test
RoundHook = Callable[[RunRecorder], None]


def _scalar(metrics: dict[str, Scalar], key: str, default: Any = None) -> Any:
    return metrics.get(key, default)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
FAILURE_TEXT_CHARS = 400


def failure_text(exc: BaseException) -> str:
    """A department failure for the report: the end of its message (where the cause is), without the Ray
    traceback and terminal colours that precede it in simulation."""
    text = _ANSI.sub("", str(exc)).replace("\\n", "\n")
    lines = [line.strip() for line in text.splitlines() if re.search(r"\w", line)]
    tail = " | ".join(lines[-3:]) if lines else type(exc).__name__
    return tail[-FAILURE_TEXT_CHARS:]


def _decode(res: FitRes) -> list[np.ndarray] | str:
    """The arrays of a result, or why they cannot be decoded (a hostile or broken payload)."""
    try:
        return parameters_to_ndarrays(res.parameters)
    except (ValueError, TypeError, OSError, EOFError) as exc:
        return f"payload cannot be decoded ({type(exc).__name__})"


class FedSiloStrategy(FedAvg):
    def __init__(self, job: JobConfig, initial: list[np.ndarray], fingerprint: str, recorder: RunRecorder,
                 central_eval: CentralEval | None = None, on_round: RoundHook | None = None) -> None:
        super().__init__(fraction_fit=1.0, fraction_evaluate=1.0, min_fit_clients=job.min_departments,
                         min_evaluate_clients=job.min_departments, min_available_clients=job.min_departments,
                         initial_parameters=ndarrays_to_parameters(initial), accept_failures=True)
        self.job = job
        self.fingerprint = fingerprint
        self.recorder = recorder
        self.central_eval = central_eval
        self.on_round = on_round
        self.global_arrays = initial
        self._round_start = 0.0
        self.node_names: dict[int, str] = {}  # node id -> department name, learned from their replies
        self._asked: dict[str, set[int]] = {}  # "train"/"evaluate" -> node ids asked this round

    def _config(self, server_round: int) -> dict[str, Scalar]:
        return {keys.CFG_ROUND: server_round, keys.CFG_NUM_ROUNDS: self.job.num_server_rounds,
                keys.CFG_MODEL_FINGERPRINT: self.fingerprint}

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        self._round_start = time.perf_counter()
        self.global_arrays = parameters_to_ndarrays(parameters)
        pairs = super().configure_fit(server_round, parameters, client_manager)
        self._asked["train"] = {proxy.node_id for proxy, _ in pairs}
        return [(proxy, FitIns(ins.parameters, self._config(server_round))) for proxy, ins in pairs]

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[tuple[ClientProxy, FitRes] | BaseException]) -> tuple[Parameters | None,
                                                                                          dict[str, Scalar]]:
        record = self.recorder.round(server_round)
        record.fit_seconds = time.perf_counter() - self._round_start
        record.failures = len(failures)
        for exc in failures:
            log.warning("aggregate_fit: round %s: a department failed: %s", server_round, exc)
            record.errors.append(failure_text(exc))
        accepted: list[tuple[ClientProxy, FitRes]] = []
        for proxy, res in results:
            name = str(_scalar(res.metrics, keys.M_DEPARTMENT, f"node-{proxy.node_id}"))
            self._learn_name(proxy.node_id, name)
            status = str(_scalar(res.metrics, keys.M_STATUS, keys.STATUS_FAILED))
            self.recorder.department(name)["n_train"] = int(_scalar(res.metrics, keys.M_NUM_EXAMPLES, 0))
            dept = DepartmentRound(status=status, epsilon=_scalar(res.metrics, keys.M_EPSILON),
                                   reason=_scalar(res.metrics, keys.M_REASON),
                                   train_seconds=_scalar(res.metrics, keys.M_TRAIN_SECONDS))
            record.departments[name] = dept
            if status != keys.STATUS_TRAINED or res.num_examples <= 0:
                continue
            if not self.job.secagg:  # the server sees this department's own update: check it, name who sent it
                arrays = _decode(res)
                why = arrays if isinstance(arrays, str) else check_update(
                    arrays, self.global_arrays, max_norm=self.job.max_update_norm)
                if why is not None:
                    dept.status, dept.reason = keys.STATUS_FAILED, f"rejected update: {why}"
                    log.error("aggregate_fit: round %s: rejected the update of %s (node %s): %s", server_round, name,
                              proxy.node_id, why)
                    continue
            accepted.append((proxy, res))
        if not self.job.secagg:  # under SecAgg+ the workflow reports dropouts stage by stage
            self._record_missing(server_round, "train", {proxy.node_id for proxy, _ in results})
        if not accepted:
            record.aggregate = "kept_previous: no usable update"
            log.warning("aggregate_fit: round %s: no usable update; keeping the previous global model",
                        server_round)
            return ndarrays_to_parameters(self.global_arrays), {}
        if self.job.secagg:  # every result carries the same unmasked aggregate: check it once
            aggregate = _decode(accepted[0][1])
            why = aggregate if isinstance(aggregate, str) else check_update(
                aggregate, self.global_arrays, exact_dtype=False,
                max_norm=self.job.max_update_norm * (1 + AGGREGATE_NORM_SLACK))
            if why is not None:
                record.aggregate = f"kept_previous: unmasked aggregate unusable: {why}"
                log.error("aggregate_fit: round %s: the unmasked aggregate is unusable (%s); keeping the previous "
                          "global model", server_round, why)
                return ndarrays_to_parameters(self.global_arrays), {}
        averaged, _ = super().aggregate_fit(server_round, accepted, [])
        if averaged is None:
            record.aggregate = "kept_previous: aggregation failed"
            return ndarrays_to_parameters(self.global_arrays), {}
        new_global = add(self.global_arrays, parameters_to_ndarrays(averaged))
        why = check_update(new_global, self.global_arrays)
        if why is not None:
            record.aggregate = f"kept_previous: {why}"
            log.error("aggregate_fit: round %s: aggregate unusable (%s); keeping the previous global model",
                      server_round, why)
            return ndarrays_to_parameters(self.global_arrays), {}
        record.aggregate = "applied"
        record.update_norm = update_norm(parameters_to_ndarrays(averaged))
        self.global_arrays = new_global
        return ndarrays_to_parameters(new_global), {}

    def _learn_name(self, node_id: int, name: str) -> None:
        """Remember which department a node is; records made before it first answered (it dropped out before
        saying who it is) are renamed from `node-<id>`."""
        if self.node_names.get(node_id) == name:
            return
        self.node_names[node_id] = name
        placeholder = f"node-{node_id}"
        for record in self.recorder.rounds:
            if placeholder in record.departments:
                record.departments.setdefault(name, record.departments.pop(placeholder))
            for dropout in record.dropouts:
                if dropout["department"] == placeholder:
                    dropout["department"] = name

    def record_halt(self, server_round: int, failures: list[BaseException], attempt: int = 1) -> None:
        """Secure aggregation halted this round (too few departments answered); record why."""
        record = self.recorder.round(server_round)
        record.failures = len(failures)
        # Another attempt follows while retries are left (secagg.ReportingSecAggPlusWorkflow).
        record.attempts = max(record.attempts, min(attempt + 1, self.job.round_retries + 1))
        record.errors.extend(f"attempt {attempt}: {failure_text(exc)}" for exc in failures)
        record.aggregate = "kept_previous: secure aggregation halted (too few departments)"
        log.error("round %s: secure aggregation halted (attempt %d); %d department failure(s)", server_round,
                  attempt, len(failures))

    def record_dropouts(self, server_round: int, stage: str, node_ids: set[int], attempt: int = 1) -> None:
        """Departments that stopped answering in `stage` (a SecAgg+ stage, "train" or "evaluate")."""
        record = self.recorder.round(server_round)
        record.attempts = max(record.attempts, attempt)
        for node_id in sorted(node_ids):
            name = self.node_names.get(node_id, f"node-{node_id}")
            record.dropouts.append({"department": name, "node_id": node_id, "stage": stage, "attempt": attempt})
            if stage not in ("unmask", "evaluate"):  # its update was not aggregated
                record.departments[name] = DepartmentRound(status=keys.STATUS_DROPPED,
                                                           reason=f"dropped out during {stage} (attempt {attempt})")
        log.warning("round %s: %d department(s) dropped out during %s (attempt %d): %s", server_round,
                    len(node_ids), stage, attempt, ", ".join(self.node_names.get(n, f"node-{n}")
                                                             for n in sorted(node_ids)))

    def _record_missing(self, server_round: int, stage: str, answered: set[int]) -> None:
        missing = self._asked.get(stage, set()) - answered
        if missing:
            self.record_dropouts(server_round, stage, missing)

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        """Central evaluation on the global held-out test (simulation only), after the last round."""
        if self.central_eval is None or server_round != self.job.num_server_rounds:
            return None
        accuracy = self.central_eval(parameters_to_ndarrays(parameters))
        self.recorder.final["central_global_accuracy"] = accuracy
        return 0.0, {keys.M_ACCURACY: accuracy}

    def configure_evaluate(self, server_round: int, parameters: Parameters,
                           client_manager: ClientManager) -> list[tuple[ClientProxy, EvaluateIns]]:
        pairs = super().configure_evaluate(server_round, parameters, client_manager)
        self._asked["evaluate"] = {proxy.node_id for proxy, _ in pairs}
        return [(proxy, EvaluateIns(ins.parameters, self._config(server_round))) for proxy, ins in pairs]

    def aggregate_evaluate(self, server_round: int, results: list[tuple[ClientProxy, EvaluateRes]],
                           failures: list[tuple[ClientProxy, EvaluateRes] | BaseException]) -> tuple[
                               float | None, dict[str, Scalar]]:
        record = self.recorder.round(server_round)
        correct = total = 0
        for proxy, res in results:
            name = str(_scalar(res.metrics, keys.M_DEPARTMENT, f"node-{proxy.node_id}"))
            self._learn_name(proxy.node_id, name)
            dept = record.departments.setdefault(name, DepartmentRound(status=keys.STATUS_FAILED))
            dept.accuracy = float(_scalar(res.metrics, keys.M_ACCURACY, 0.0))
            dept.epsilon = _scalar(res.metrics, keys.M_EPSILON, dept.epsilon)
            dept.n_test = res.num_examples
            self.recorder.department(name)["n_test"] = res.num_examples
            correct += int(_scalar(res.metrics, keys.M_CORRECT, 0))
            total += res.num_examples
        self._record_missing(server_round, "evaluate", {proxy.node_id for proxy, _ in results})
        for name in self.recorder.departments:
            record.departments.setdefault(name, DepartmentRound(status=keys.STATUS_FAILED))
        if record.aggregate == "pending":
            record.aggregate = "kept_previous: no aggregate (secure aggregation halted or no department trained)"
        record.global_accuracy = correct / total if total else None
        record.seconds = time.perf_counter() - self._round_start
        self._log_round(server_round, record.global_accuracy, len(failures))
        self.recorder.write()
        if self.on_round is not None:
            self.on_round(self.recorder)
        return None, {keys.M_ACCURACY: record.global_accuracy or 0.0}

    def _log_round(self, server_round: int, accuracy: float | None, eval_failures: int) -> None:
        record = self.recorder.round(server_round)
        parts = ", ".join(f"{n}: {d.status} eps={d.epsilon if d.epsilon is None else round(d.epsilon, 3)} "
                          f"acc={d.accuracy if d.accuracy is None else round(d.accuracy, 3)}"
                          for n, d in sorted(record.departments.items()))
        log.info("round %s/%s: %.1fs, global accuracy %s, aggregate %s, %s evaluation failures; %s",
                 server_round, self.job.num_server_rounds, record.seconds,
                 "n/a" if accuracy is None else f"{accuracy:.4f}", record.aggregate, eval_failures, parts)
