"""A finished run's directory, read back: its report, checkpoint, job, global model and (where present) ledgers.

Used by the tools that work on a run after it ended (`fedsilo audit`, `fedsilo export`). A simulation's run
directory holds its departments' ledgers under `sites/`; a deployment's holds none (each site keeps its own).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from client.ledger import Ledger, LedgerFile
from client.site import simulated_sites
from common.config import JobConfig, SimulationConfig
from common.data import resolve_job
from common.errors import ConfigError, ModelError, ParameterMismatchError
from common.model import build_model
from common.params import set_trainable
from server.checkpoint import CHECKPOINT, Checkpoint, load_checkpoint
from server.records import RunReport, read_report
from server.report import REPORT_JSON

SITES_DIR = "sites"


@dataclass(frozen=True)
class FinishedRun:
    run_dir: Path
    report: RunReport
    checkpoint: Checkpoint
    job: JobConfig
    sim: SimulationConfig

    @property
    def is_simulation(self) -> bool:
        return (self.run_dir / SITES_DIR).is_dir()


def load_run(run_dir: Path) -> FinishedRun:
    """Read `run_dir`'s report and checkpoint; `ConfigError` unless it is the directory of a run with both."""
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is not a directory.")
    report_path, checkpoint_path = run_dir / REPORT_JSON, run_dir / CHECKPOINT
    for path in (report_path, checkpoint_path):
        if not path.is_file():
            raise ConfigError(f"{run_dir} holds no {path.name}: not the output directory of a finished run.")
    report = read_report(report_path)
    checkpoint = load_checkpoint(run_dir)
    job, sim = resolve_job(checkpoint.run_config or report.config)
    return FinishedRun(run_dir=run_dir, report=report, checkpoint=checkpoint, job=job, sim=sim)


def global_model(run: FinishedRun) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """The model the run's job builds, holding the checkpoint's global weights."""
    built = build_model(run.job, len(run.job.label_names))
    try:
        set_trainable(built.model, run.checkpoint.arrays_for(built.model))
    except ParameterMismatchError as exc:
        raise ModelError(f"The checkpoint's tensors do not match the model its job config builds: {exc}") from exc
    return built.model, built.tokenizer


def simulation_ledgers(run: FinishedRun) -> dict[str, Ledger]:
    """The ledgers a simulation kept for its departments (those that exist), by department."""
    if not run.is_simulation:
        return {}
    ledgers = {}
    for site in simulated_sites(run.job, run.sim, run.run_dir.resolve()):
        path = Path(site.ledger)
        if path.exists():
            ledgers[site.name] = LedgerFile(path, site.name, site.epsilon, site.delta, site.accountant).read()
    return ledgers
