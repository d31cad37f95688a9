"""The coordination ServerApp: thin wiring of config, model, strategy, workflow and report."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.accountant_check import privacy_statement
from common.compat import quicken_object_pulls
from common.config import JobConfig, SimulationConfig, as_run_config
from common.data import resolve_job
from common.errors import JobEndedEarlyError
from common.logs import configure_app_logging
from common.memory import PeakMemoryMonitor
from common.model import base_fingerprint, build_model
from common.params import get_trainable
from common.paths import run_out_dir
from server.checkpoint import save_checkpoint
from server.recording import idle_reason, idle_rounds, run_summary
from server.report import RunRecorder
from server.resume import job_identity, resume_state
from server.secagg import run_workflow
from server.strategy import CentralEval, FedSiloStrategy, RoundHook

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SimulatedSites:
    """What a simulation tells the ServerApp about the departments it simulates. In deployment the server knows none
    of this: each site keeps its own budget, delta and accountant, and there is no pooled test set."""

    shared_budget: float | None  # the epsilon budget every department has, when they all have the same one
    delta: float
    accountants: frozenset[str]
    central_eval: CentralEval | None  # accuracy on the union of the departments' test splits


SitesView = Callable[[JobConfig, SimulationConfig, Path], SimulatedSites]


def finish_run(recorder: RunRecorder, job: JobConfig, sites: SimulatedSites | None, ended_early: str | None) -> None:
    """Write the run's final record (accuracy, privacy spent, outcome) into its report, and the plots."""
    final = run_summary(recorder, delta=sites.delta if sites is not None else None, dp=job.dp,
                        secure_aggregation=job.secagg)
    if ended_early is not None:
        final.outcome, final.outcome_reason = "ended_early", ended_early
    if job.dp:
        accountants = sites.accountants if sites is not None else {"each site's ledger accountant (default rdp)"}
        final.privacy = privacy_statement(final.epsilon, final.delta, ", ".join(sorted(accountants)))
    recorder.report.final = final
    recorder.write()
    recorder.plot()


def build_server_app(overrides: Mapping[str, bool | int | float | str] | None = None, *,
                     simulated_sites: SitesView | None = None, on_round: RoundHook | None = None) -> ServerApp:
    """The ServerApp; `overrides` are merged over the run config. A simulation passes `simulated_sites`, which
    describes its departments (budgets, delta, accountants, a central evaluator) for the report."""
    fixed = dict(overrides or {})
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        configure_app_logging()  # under a SuperLink: fedsilo's lines (one per round) in the job's log
        quicken_object_pulls(log, "server")  # the replies' objects, under a SuperLink
        rc = {**context.run_config, **fixed}
        job, sim = resolve_job(rc)
        out_dir = run_out_dir(job.out_dir, context.run_id)
        job = job_identity(job, out_dir)  # sent to departments with every round; kept in the checkpoint
        sites = simulated_sites(job, sim, out_dir) if simulated_sites is not None else None
        built = build_model(job, len(job.label_names))
        run_config = as_run_config(job, sim)
        shared_budget = sites.shared_budget if sites is not None else None
        if job.resume:
            start = resume_state(out_dir, built.model, run_config, shared_budget)
            initial, recorder, completed = start.initial, start.recorder, start.completed
        else:
            initial, completed = get_trainable(built.model), 0
            recorder = RunRecorder(config=run_config, out_dir=out_dir, budget=shared_budget)
        central = sites.central_eval if sites is not None else None
        memory = PeakMemoryMonitor()

        def checkpoint(arrays: list[np.ndarray], server_round: int) -> None:
            if job.out_dir:
                save_checkpoint(out_dir, built.model, arrays, job, server_round, run_config=run_config,
                                report=recorder.to_dict())

        def after_round(rec: RunRecorder) -> None:
            rec.rounds[-1].peak_rss_mb = memory.take_peak_mib()
            rec.write()
            checkpoint(strategy.global_arrays, rec.rounds[-1].round)
            if on_round is not None:
                on_round(rec)
            if job.max_idle_rounds and idle_rounds(rec.rounds, job.min_departments) >= job.max_idle_rounds:
                raise JobEndedEarlyError(idle_reason(rec.rounds, job.min_departments))

        strategy = FedSiloStrategy(job, initial, base_fingerprint(built.model), recorder, central, after_round)
        log.info("server: job with %d rounds, model %s (%s), %d trainable tensors, DP %s, SecAgg+ %s; out %s",
                 job.num_server_rounds, job.model, job.finetune, len(initial), job.dp, job.secagg, out_dir)
        if completed == 0:
            checkpoint(initial, 0)  # from now on the run can be resumed, even before its first round ends
        ended_early = None
        with memory:
            try:
                run_workflow(grid, context, job, strategy, completed)
            except JobEndedEarlyError as exc:
                ended_early = str(exc)
                log.error("server: job ended early after round %d: %s", len(recorder.rounds), exc)
        finish_run(recorder, job, sites, ended_early)

    return app


app = build_server_app()
