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
from flwr.compat.server.typing import Workflow
from flwr.server import Grid, LegacyContext, ServerConfig
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.default_workflows import default_evaluate_workflow, default_fit_workflow

from common.config import JobConfig
from server.strategy import FedSiloStrategy

log = logging.getLogger(__name__)

SECAGG_MODULUS = 2**32  # Flower's mask modulus; sums overflow past modulus / quantization_range departments


OnHalt = Callable[[int, list[BaseException], int], None]  # round, failures, attempt
OnDropout = Callable[[int, str, set[int], int], None]  # round, stage, node ids, attempt
STAGES = ("setup_stage", "share_keys_stage", "collect_masked_vectors_stage", "unmask_stage")


def _current_round(context: Context) -> int:
    return cast(int, context.state.config_records[MAIN_CONFIGS_RECORD][WorkflowKey.CURRENT_ROUND])


class ReportingSecAggPlusWorkflow(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow, unchanged, except that it reports which departments dropped out in which stage
    and a halted round's failures (Flower only logs them; the strategy never sees a halted round), and retries a
    halted round up to `retries` times (each attempt is Flower's whole protocol, from a fresh setup)."""

    def __init__(self, *args: Any, on_halt: OnHalt, on_dropout: OnDropout, retries: int = 0,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._retries = retries
        self._attempt = 1
        self._halted = False
        for name in STAGES:
            setattr(self, name, self._reporting(name.removesuffix("_stage"), getattr(self, name), on_halt,
                                                on_dropout))

    def __call__(self, grid: Grid, context: Context) -> None:
        for attempt in range(1, self._retries + 2):
            self._attempt, self._halted = attempt, False
            super().__call__(grid, context)
            if not self._halted:
                return
            if attempt <= self._retries:
                log.warning("round %s: secure aggregation halted; retrying the round (attempt %d of %d)",
                            _current_round(context), attempt + 1, self._retries + 1)

    def _reporting(self, stage_name: str, stage: Callable[..., bool], on_halt: OnHalt,
                   on_dropout: OnDropout) -> Callable[..., bool]:
        def run(grid: Grid, context: LegacyContext, state: Any) -> bool:
            before = set(state.active_node_ids)
            ok = stage(grid, context, state)
            if stage_name == "setup":  # the stage samples the departments: all of them were asked
                before = set(state.sampled_node_ids)
            dropped = before - set(state.active_node_ids)
            if dropped:
                on_dropout(_current_round(context), stage_name, dropped, self._attempt)
            if not ok:
                self._halted = True
                on_halt(_current_round(context), list(state.failures), self._attempt)
            return ok

        return run


def skip_completed(workflow: Workflow, completed_rounds: int) -> Workflow:
    """`workflow` for rounds after `completed_rounds`; a no-op for the rounds a resumed run already has."""
    if completed_rounds == 0:
        return workflow

    def run(grid: Grid, context: Context) -> None:
        current = _current_round(context)
        if current <= completed_rounds:
            log.info("round %s: completed before the resume (checkpoint); skipping", current)
            return
        workflow(grid, context)

    return run


def build_workflow(job: JobConfig, strategy: FedSiloStrategy, completed_rounds: int = 0) -> DefaultWorkflow:
    """Flower's default workflow (SecAgg+ for the fit stage when enabled) that starts after `completed_rounds`."""
    fit: Workflow
    if not job.secagg:
        log.warning("build_workflow: SecAgg+ is OFF: the server sees each department's update in the clear.")
        fit = default_fit_workflow
    else:
        fit = ReportingSecAggPlusWorkflow(
            num_shares=job.secagg_num_shares,
            reconstruction_threshold=job.secagg_reconstruction_threshold,
            max_weight=job.secagg_max_weight,
            clipping_range=job.secagg_clipping_range,
            quantization_range=job.secagg_quantization_range,
            modulus_range=SECAGG_MODULUS,
            on_halt=strategy.record_halt,
            on_dropout=strategy.record_dropouts,
            retries=job.round_retries,
        )
    return DefaultWorkflow(fit_workflow=skip_completed(fit, completed_rounds),
                           evaluate_workflow=skip_completed(default_evaluate_workflow, completed_rounds))


def run_workflow(grid: Grid, context: Context, job: JobConfig, strategy: FedSiloStrategy,
                 completed_rounds: int = 0) -> None:
    """Run the job's rounds after `completed_rounds` (0 for a new run, the checkpoint's round when resuming)."""
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=job.num_server_rounds),
                           strategy=strategy)
    build_workflow(job, strategy, completed_rounds)(grid, legacy)
