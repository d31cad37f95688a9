"""A round's aggregation decisions as pure functions: which department updates count, and whether the averaged
update becomes the new global model or the previous one is kept (and why).

Nothing here logs, records or keeps state; `server.strategy` calls these around Flower's FedAvg and
`server.recording` writes what they decide into the run's report.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.common import EvaluateRes, FitRes, Parameters, parameters_to_ndarrays

from common import keys
from common.params import add
from common.updates import AGGREGATE_NORM_SLACK, check_update, update_norm

NO_DEPARTMENT_TRAINED = "no department trained"  # every department declined, failed or dropped: nothing to average
NO_USABLE_UPDATE = "no usable update"  # some trained, but every update was rejected
# Under SecAgg+ the server unmasks only a sum of at least this many departments' updates (one is not a sum).
MIN_SUMMANDS = 2
TOO_FEW_SUMMANDS = ("only one department trained: under SecAgg+ the sum of one update is that update, so it was not "
                    "unmasked")
AGGREGATION_FAILED = "aggregation failed"
UNMASKED_AGGREGATE_UNUSABLE = "unmasked aggregate unusable"


@dataclass(frozen=True)
class Outcome:
    """What a round's aggregation decided: the global model after the round, and why the previous one was kept
    (`reason`, None when the averaged update was applied)."""

    arrays: list[np.ndarray]
    reason: str | None = None
    update_norm: float | None = None  # L2 norm of the applied update (new global - previous)

    @property
    def applied(self) -> bool:
        return self.reason is None


def decode(parameters: Parameters) -> list[np.ndarray] | str:
    """The arrays of a result, or why they cannot be decoded (a hostile or broken payload)."""
    try:
        return parameters_to_ndarrays(parameters)
    except (ValueError, TypeError, OSError, EOFError) as exc:
        return f"payload cannot be decoded ({type(exc).__name__})"


def takes_part(status: str, res: FitRes) -> bool:
    """Whether a department's result is an update to aggregate (it trained, on at least one example)."""
    return status == keys.STATUS_TRAINED and res.num_examples > 0


def weighs_in(res: FitRes) -> bool:
    """Whether a result has weight in the average: FedAvg and SecAgg+ both weigh an update by its examples."""
    return res.num_examples > 0


def screen_update(res: FitRes, global_arrays: list[np.ndarray], max_norm: float) -> str | None:
    """Why one department's own update (seen in the clear, without SecAgg+) is unusable, or None if it is fine."""
    arrays = decode(res.parameters)
    return arrays if isinstance(arrays, str) else check_update(arrays, global_arrays, max_norm=max_norm)


def screen_unmasked_aggregate(res: FitRes, global_arrays: list[np.ndarray], max_norm: float) -> str | None:
    """Why SecAgg+'s unmasked (dequantised) aggregate is unusable, or None. Every result carries the same one, so
    one is checked; its norm may exceed the per-department bound by `AGGREGATE_NORM_SLACK`."""
    arrays = decode(res.parameters)
    if isinstance(arrays, str):
        return arrays
    return check_update(arrays, global_arrays, exact_dtype=False, max_norm=max_norm * (1 + AGGREGATE_NORM_SLACK))


def keep_previous(global_arrays: list[np.ndarray], reason: str) -> Outcome:
    return Outcome(arrays=global_arrays, reason=reason)


def apply_average(global_arrays: list[np.ndarray], averaged: Parameters | None) -> Outcome:
    """The global model plus FedAvg's weighted average of the updates, unless that is missing or unusable."""
    if averaged is None:
        return keep_previous(global_arrays, AGGREGATION_FAILED)
    update = parameters_to_ndarrays(averaged)
    new_global = add(global_arrays, update)
    why = check_update(new_global, global_arrays)
    if why is not None:
        return keep_previous(global_arrays, why)
    return Outcome(arrays=new_global, update_norm=update_norm(update))


def federated_accuracy(results: list[EvaluateRes]) -> float | None:
    """The global model's accuracy over every department's test that answered (correct / examples)."""
    correct = sum(int(res.metrics.get(keys.M_CORRECT, 0)) for res in results)
    total = sum(res.num_examples for res in results)
    return correct / total if total else None
