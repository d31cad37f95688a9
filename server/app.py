"""The coordination ServerApp: thin wiring of config, model, strategy, workflow and report."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from client.app import run_out_dir
from client.site import simulated_sites
from common.accountant_check import privacy_statement
from common.config import JobConfig, SimulationConfig, as_run_config
from common.data import resolve_job
from common.memory import PeakMemoryMonitor
from common.model import base_fingerprint, build_model, device
from common.params import get_trainable, set_trainable
from common.text import encode, evaluate
from server.checkpoint import save_checkpoint
from server.report import RunRecorder
from server.resume import resume_state
from server.secagg import run_workflow
from server.strategy import CentralEval, FedSiloStrategy, RoundHook

log = logging.getLogger(__name__)


def central_evaluator(job: JobConfig, sim: SimulationConfig, out_dir: Path) -> CentralEval:
    """Accuracy on the union of the simulated departments' test splits (the global held-out test)."""
    labels = job.label_names
    built = build_model(job, len(labels))
    splits = [site.load_split(labels) for site in simulated_sites(job, sim, out_dir)]
    texts = [t for s in splits for t in s.test_texts]
    data = encode(built.tokenizer, texts, np.concatenate([s.test_labels for s in splits]), job.max_length)

    def evaluate_global(arrays: list[np.ndarray]) -> float:
        set_trainable(built.model, arrays)
        result = evaluate(built.model, data, device())
        log.info("central evaluation: accuracy %.4f on %d held-out examples", result.accuracy, result.n)
        return result.accuracy

    return evaluate_global


def build_server_app(overrides: Mapping[str, bool | int | float | str] | None = None, *, simulation: bool = False,
                     on_round: RoundHook | None = None) -> ServerApp:
    fixed = dict(overrides or {})
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        rc = {**context.run_config, **fixed}
        job, sim = resolve_job(rc)
        out_dir = run_out_dir(job, context.run_id)
        built = build_model(job, len(job.label_names))
        run_config = as_run_config(job, sim)
        shared_budget = sim.sim_epsilon if simulation and not sim.site_epsilon_overrides() else None
        if job.resume:
            start = resume_state(out_dir, built.model, run_config, shared_budget)
            initial, recorder, completed = start.initial, start.recorder, start.completed
        else:
            initial, completed = get_trainable(built.model), 0
            recorder = RunRecorder(config=run_config, out_dir=out_dir, budget=shared_budget)
        central = central_evaluator(job, sim, out_dir) if simulation and sim.sim_global_eval else None
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

        strategy = FedSiloStrategy(job, initial, base_fingerprint(built.model), recorder, central, after_round)
        log.info("server: job with %d rounds, model %s (%s), %d trainable tensors, DP %s, SecAgg+ %s; out %s",
                 job.num_server_rounds, job.model, job.finetune, len(initial), job.dp, job.secagg, out_dir)
        if completed == 0:
            checkpoint(initial, 0)  # from now on the run can be resumed, even before its first round ends
        with memory:
            run_workflow(grid, context, job, strategy, completed)
        last = recorder.rounds[-1] if recorder.rounds else None
        eps = {name: d.epsilon for name, d in sorted(last.departments.items())} if last else {}
        recorder.final.update({
            "global_accuracy": recorder.final.get("central_global_accuracy",
                                                  last.global_accuracy if last else None),
            "federated_global_accuracy": last.global_accuracy if last else None,
            "epsilon": eps, "delta": sim.sim_delta if simulation else None, "dp": job.dp,
            "secure_aggregation": job.secagg, "rounds_completed": len(recorder.rounds),
        })
        if job.dp:
            accountants = ({s.accountant for s in simulated_sites(job, sim, out_dir)} if simulation
                           else {"each site's ledger accountant (default rdp)"})
            recorder.final["privacy"] = privacy_statement(eps, sim.sim_delta if simulation else None,
                                                          ", ".join(sorted(accountants)))
        recorder.write()
        recorder.plot()

    return app


app = build_server_app()
