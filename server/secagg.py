"""The federated workflow: Flower's legacy `DefaultWorkflow`, with SecAgg+ for the fit stage when enabled.

This module and `server.strategy` are the server's only users of Flower's legacy API, which SecAgg+ requires in
Flower 1.41 (with the new `strategy.start()` API, `secaggplus_mod` fails on every client and the run "succeeds"
with the initial weights).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, cast

from flwr.app import Context
from flwr.server import Grid, LegacyContext, ServerConfig
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey

from common.config import JobConfig
from server.strategy import FedSiloStrategy

log = logging.getLogger(__name__)

SECAGG_MODULUS = 2**32  # Flower's mask modulus; sums overflow past modulus / quantization_range departments


OnHalt = Callable[[int, list[BaseException]], None]
STAGES = ("setup_stage", "share_keys_stage", "collect_masked_vectors_stage", "unmask_stage")


class ReportingSecAggPlusWorkflow(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow, unchanged, except that a halted round reports its departments' failures
    (Flower only logs them; the strategy never sees a halted round)."""

    def __init__(self, *args: Any, on_halt: OnHalt, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for name in STAGES:
            setattr(self, name, self._reporting(getattr(self, name), on_halt))

    @staticmethod
    def _reporting(stage: Callable[..., bool], on_halt: OnHalt) -> Callable[..., bool]:
        def run(grid: Grid, context: LegacyContext, state: Any) -> bool:
            ok = stage(grid, context, state)
            if not ok:
                cfg = context.state.config_records[MAIN_CONFIGS_RECORD]
                on_halt(cast(int, cfg[WorkflowKey.CURRENT_ROUND]), list(state.failures))
            return ok

        return run


def build_workflow(job: JobConfig, strategy: FedSiloStrategy) -> DefaultWorkflow:
    if not job.secagg:
        log.warning("build_workflow: SecAgg+ is OFF: the server sees each department's update in the clear.")
        return DefaultWorkflow()
    return DefaultWorkflow(fit_workflow=ReportingSecAggPlusWorkflow(
        num_shares=job.secagg_num_shares,
        reconstruction_threshold=job.secagg_reconstruction_threshold,
        max_weight=job.secagg_max_weight,
        clipping_range=job.secagg_clipping_range,
        quantization_range=job.secagg_quantization_range,
        modulus_range=SECAGG_MODULUS,
        on_halt=strategy.record_halt,
    ))


def run_workflow(grid: Grid, context: Context, job: JobConfig, strategy: FedSiloStrategy) -> None:
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=job.num_server_rounds),
                           strategy=strategy)
    build_workflow(job, strategy)(grid, legacy)
