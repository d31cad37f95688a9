"""FedAvg of department updates (weighted by examples), applied to the global model, with validation and records.

Departments send *updates* (trained weights minus the global weights they started from). Under SecAgg+ the
server only ever sees their weighted sum; without it, each update is validated and a bad one is rejected by name.
The aggregate is validated too: if it is unusable the previous global model is kept and the round says why.

Composed the Flower way: `FedSiloStrategy` wraps Flower's `FedAvg` (which does the averaging, as
`flwr.server.strategy.DifferentialPrivacyServerSideFixedClipping` wraps a strategy), the decisions are pure
functions (`server.aggregation`) and what a round did is written by `server.recording`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
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
from flwr.server.strategy import FedAvg, Strategy

from common import keys
from common.config import JobConfig
from server import aggregation, recording
from server.aggregation import Outcome
from server.compat import ClientProxy
from server.records import RoundRecord
from server.report import RunRecorder

log = logging.getLogger(__name__)


def _no_aggregate_metrics(_: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
    return {}

CentralEval = Callable[[list[np.ndarray]], float]  # global arrays -> accuracy on the global held-out test
RoundHook = Callable[[RunRecorder], None]
FitFailures = list[tuple[ClientProxy, FitRes] | BaseException]


class FedSiloStrategy(Strategy):
    """Flower's FedAvg of the departments' updates, wrapped with fedsilo's screening of updates and aggregates,
    department names, the run's records and the workflow's callbacks (`record_halt`, `record_dropouts`)."""

    def __init__(self, job: JobConfig, initial: list[np.ndarray], fingerprint: str, recorder: RunRecorder,
                 central_eval: CentralEval | None = None, on_round: RoundHook | None = None) -> None:
        self.fedavg = FedAvg(fraction_fit=1.0, fraction_evaluate=1.0, min_fit_clients=job.min_departments,
                             min_evaluate_clients=job.min_departments, min_available_clients=job.min_departments,
                             initial_parameters=ndarrays_to_parameters(initial), accept_failures=True,
                             # departments' metrics are recorded one by one (server/recording.py), never averaged
                             fit_metrics_aggregation_fn=_no_aggregate_metrics)
        self.job = job
        self.fingerprint = fingerprint
        self.recorder = recorder
        self.central_eval = central_eval
        self.on_round = on_round
        self.global_arrays = initial
        self.round_start = 0.0
        # node id -> department name, learned from their replies (and, on resume, from the report)
        self.node_names: dict[int, str] = recording.known_nodes(recorder)
        # node id -> the name it was registered with at the SuperLink (`use_registry`; empty in simulation)
        self.registry: Callable[[], Mapping[int, str]] = dict
        self._registered: dict[int, str] = {}
        self._looked_up: set[int] = set()  # nodes the registry was asked about (once each)
        # node id -> the code of its error reply in the last exchange (`use_error_replies`; the grid knows it)
        self.error_replies: Callable[[], Mapping[int, int]] = dict
        self.asked: dict[str, set[int]] = {}  # "train"/"evaluate" -> node ids asked this round

    def __repr__(self) -> str:
        return f"FedSiloStrategy({self.fedavg!r})"

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return self.fedavg.initialize_parameters(client_manager)

    def _config(self, server_round: int) -> dict[str, Scalar]:
        return {keys.CFG_ROUND: server_round, keys.CFG_NUM_ROUNDS: self.job.num_server_rounds,
                keys.CFG_MODEL_FINGERPRINT: self.fingerprint, keys.CFG_JOB_ID: self.job.job_id}

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        self.round_start = time.perf_counter()
        self.global_arrays = parameters_to_ndarrays(parameters)
        pairs = self.fedavg.configure_fit(server_round, parameters, client_manager)
        self.asked["train"] = {proxy.node_id for proxy, _ in pairs}
        return [(proxy, FitIns(ins.parameters, self._config(server_round))) for proxy, ins in pairs]

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: FitFailures) -> tuple[Parameters | None, dict[str, Scalar]]:
        record = recording.fit_started(self.recorder, server_round, time.perf_counter() - self.round_start,
                                       failures)
        trained = [(proxy, res) for proxy, res in results if self._trained(record, proxy, res)]
        accepted = [(proxy, res) for proxy, res in trained if self._accept(server_round, record, proxy, res)]
        if not self.job.secagg:  # under SecAgg+ the workflow reports dropouts stage by stage
            self.record_missing(server_round, "train", {proxy.node_id for proxy, _ in results})
        if not trained:
            decided = self._nothing_trained(server_round, len(results))
        elif self.job.secagg and len(trained) < aggregation.MIN_SUMMANDS:
            log.warning("aggregate_fit: round %s: %s; keeping the previous global model", server_round,
                        aggregation.TOO_FEW_SUMMANDS)
            decided = aggregation.keep_previous(self.global_arrays, aggregation.TOO_FEW_SUMMANDS)
        else:
            decided = self._aggregate(server_round, accepted)
        recording.outcome(record, decided)
        self.global_arrays = decided.arrays
        return ndarrays_to_parameters(decided.arrays), {}

    def _trained(self, record: RoundRecord, proxy: ClientProxy, res: FitRes) -> bool:
        """Record a department's fit reply; whether it trained (its update is a candidate for the average)."""
        name = self._learn_name(proxy.node_id, res.metrics)
        return aggregation.takes_part(recording.fit_result(self.recorder, record, name, res).status, res)

    def _accept(self, server_round: int, record: RoundRecord, proxy: ClientProxy, res: FitRes) -> bool:
        """Whether a department's update (it trained) is to be averaged."""
        if self.job.secagg:  # masked: only the sum can be checked (in `_aggregate`)
            return True
        why = aggregation.screen_update(res, self.global_arrays, self.job.max_update_norm)
        if why is not None:
            name = self.name_of(proxy.node_id)  # as `_trained` recorded it
            recording.rejected(record.departments[name], server_round, name, proxy.node_id, why)
        return why is None

    def _nothing_trained(self, server_round: int, replies: int) -> Outcome:
        """No department trained (all declined, failed or dropped): nothing is averaged (no total weight to divide
        by) and the previous global model stays."""
        log.warning("aggregate_fit: round %s: no department trained (%d replied); keeping the previous global model",
                    server_round, replies)
        return aggregation.keep_previous(self.global_arrays, aggregation.NO_DEPARTMENT_TRAINED)

    def _aggregate(self, server_round: int, accepted: list[tuple[ClientProxy, FitRes]]) -> Outcome:
        """FedAvg of the accepted updates added to the global model, or the previous model and why."""
        if not accepted:
            log.warning("aggregate_fit: round %s: no usable update; keeping the previous global model", server_round)
            return aggregation.keep_previous(self.global_arrays, aggregation.NO_USABLE_UPDATE)
        if self.job.secagg:
            why = aggregation.screen_unmasked_aggregate(accepted[0][1], self.global_arrays, self.job.max_update_norm)
            if why is not None:
                log.error("aggregate_fit: round %s: the unmasked aggregate is unusable (%s); keeping the previous "
                          "global model", server_round, why)
                return aggregation.keep_previous(self.global_arrays,
                                                 f"{aggregation.UNMASKED_AGGREGATE_UNUSABLE}: {why}")
        averaged, _ = self.fedavg.aggregate_fit(server_round, accepted, [])
        decided = aggregation.apply_average(self.global_arrays, averaged)
        if not decided.applied and decided.reason != aggregation.AGGREGATION_FAILED:
            log.error("aggregate_fit: round %s: aggregate unusable (%s); keeping the previous global model",
                      server_round, decided.reason)
        return decided

    def use_registry(self, registry: Callable[[], Mapping[int, str]]) -> None:
        """Where to look up the names nodes were registered with (the grid's node information, deployment)."""
        self.registry = registry

    def use_error_replies(self, error_replies: Callable[[], Mapping[int, int]]) -> None:
        """Where to look up which nodes answered the last exchange with an error, and its code."""
        self.error_replies = error_replies

    def name_of(self, node_id: int) -> str:
        """A node's department name: the one it reported, else its registration name, else `node-<id>`."""
        if node_id not in self.node_names and node_id not in self._looked_up:
            try:  # a node not seen before: ask the SuperLink once more
                self._registered.update(self.registry())
            except Exception as exc:  # noqa: BLE001 (a name is not worth the job: the node stays node-<id>)
                log.warning("could not look up the registration name of node %s: %s: %s", node_id,
                            type(exc).__name__, exc)
            self._looked_up.update(self._registered, {node_id})
        return recording.name_of(self.node_names, self._registered, node_id)

    def _learn_name(self, node_id: int, metrics: dict[str, Scalar]) -> str:
        """The department's name from its reply (remembered for its node), or `name_of` if it did not say."""
        if keys.M_DEPARTMENT not in metrics:
            return self.name_of(node_id)
        name = str(metrics[keys.M_DEPARTMENT])
        recording.learn_name(self.recorder, self.node_names, node_id, name, self._registered.get(node_id))
        return name

    def record_halt(self, server_round: int, failures: list[BaseException], attempt: int = 1) -> None:
        """Secure aggregation halted this round (too few departments answered); record why."""
        recording.halt(self.recorder, server_round, failures, attempt, self.job.round_retries)

    def record_dropouts(self, server_round: int, stage: str, node_ids: set[int], attempt: int = 1) -> None:
        """Departments that stopped answering in `stage` (a SecAgg+ stage, "train" or "evaluate")."""
        recording.dropouts(self.recorder, self.name_of, server_round, stage, node_ids, attempt)

    def record_missing(self, server_round: int, stage: str, answered: set[int]) -> None:
        """The departments asked in `stage` ("train" or "evaluate") without an answer: those whose node answered
        with an error (their ClientApp failed outside the department's own code, which answers its failures
        itself) failed; the others (gone, unavailable, silent) are dropouts."""
        missing = self.asked.get(stage, set()) - answered
        codes = self.error_replies()
        failed = {node_id: codes[node_id] for node_id in missing
                  if node_id in codes and not recording.node_gone(codes[node_id])}
        recording.error_replies(self.recorder, self.name_of, server_round, stage, failed)
        if missing - set(failed):
            self.record_dropouts(server_round, stage, missing - set(failed))

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        """Central evaluation on the global held-out test (simulation only), after the last round."""
        if self.central_eval is None or server_round != self.job.num_server_rounds:
            return None
        accuracy = self.central_eval(parameters_to_ndarrays(parameters))
        self.recorder.central_accuracy = accuracy
        return 0.0, {keys.M_ACCURACY: accuracy}

    def evaluates(self, server_round: int) -> bool:
        """Whether `server_round` has a federated evaluation: every `evaluate-every` rounds, and the last round."""
        return server_round % self.job.evaluate_every == 0 or server_round >= self.job.num_server_rounds

    def configure_evaluate(self, server_round: int, parameters: Parameters,
                           client_manager: ClientManager) -> list[tuple[ClientProxy, EvaluateIns]]:
        if not self.evaluates(server_round):
            # Flower's workflow skips the exchange when no department is asked (and so never calls
            # aggregate_evaluate): the round ends here, with no accuracy.
            log.info("configure_evaluate: round %s: no federated evaluation (evaluate-every %d)", server_round,
                     self.job.evaluate_every)
            self.asked["evaluate"] = set()
            self._finish_round(server_round, None, 0)
            return []
        pairs = self.fedavg.configure_evaluate(server_round, parameters, client_manager)
        self.asked["evaluate"] = {proxy.node_id for proxy, _ in pairs}
        return [(proxy, EvaluateIns(ins.parameters, self._config(server_round))) for proxy, ins in pairs]

    def aggregate_evaluate(self, server_round: int, results: list[tuple[ClientProxy, EvaluateRes]],
                           failures: list[tuple[ClientProxy, EvaluateRes] | BaseException]) -> tuple[
                               float | None, dict[str, Scalar]]:
        record = self.recorder.round(server_round)
        for proxy, res in results:
            recording.evaluation(self.recorder, record, self._learn_name(proxy.node_id, res.metrics), res)
        self.record_missing(server_round, "evaluate", {proxy.node_id for proxy, _ in results})
        accuracy = aggregation.federated_accuracy([res for _, res in results])
        self._finish_round(server_round, accuracy, len(failures))
        return None, {keys.M_ACCURACY: accuracy or 0.0}

    def _finish_round(self, server_round: int, accuracy: float | None, eval_failures: int) -> None:
        """The round's record is complete: written, logged, and handed to the round hook (checkpoint, progress)."""
        record = self.recorder.round(server_round)
        asked = {self.name_of(node_id) for node_id in self.asked.get("train", set())}
        recording.round_finished(self.recorder, record, accuracy, time.perf_counter() - self.round_start, asked)
        recording.log_round(record, self.job.num_server_rounds, eval_failures)
        self.recorder.write()
        if self.on_round is not None:
            self.on_round(self.recorder)
