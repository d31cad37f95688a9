"""Continue a run from its checkpoint: global weights, completed rounds and report, after checking the job.

The checkpoint is the source of truth: a round whose report was written but whose checkpoint was not (a crash
between the two) is run again. The departments' ledgers are theirs and persist: a department that trained in a
round that is run again is charged again (over-counting, never under-counting), and plans its noise from its
remaining budget over the remaining rounds, which the resumed run numbers as the original would have. The resumed
run has a new Flower run id but the same job id (`job_identity`), so each site's per-job epsilon cap counts the
charges of every run of the job.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.config import JobConfig, RunConfig
from common.errors import ConfigError
from server.checkpoint import JOB_ID, load_checkpoint, resume_config, warn_on_version_change
from server.records import ResumeRecord, RunReport, load_report, read_report
from server.report import REPORT_JSON, RunRecorder

log = logging.getLogger(__name__)


def job_identity(job: JobConfig, run_dir: Path) -> JobConfig:
    """`job` with its identity (`job-id`), which departments count their per-job epsilon cap on: the one the run
    config names; else, on resume, the checkpoint's (a resume is the same job); else a new one (uuid4 hex)."""
    job_id = job.job_id
    if not job_id and job.resume:
        job_id = str(load_checkpoint(run_dir).run_config.get(JOB_ID) or "")
        if not job_id:
            log.warning("resume: the checkpoint in %s records no job id (written before job ids): the resumed job "
                        "gets a new one; sites count its earlier charges under their own run id", run_dir)
    if not job_id:
        job_id = uuid.uuid4().hex
    log.info("server: job id %s", job_id)
    return dataclasses.replace(job, job_id=job_id)


def resume_job(run_dir: Path, asked: RunConfig) -> dict[str, bool | int | float | str]:
    """The run config that continues the run in `run_dir` (before submitting it): the checkpoint's, with what
    `asked` may change. ConfigError if there is nothing to resume or `asked` changes the job."""
    rc = resume_config(load_checkpoint(run_dir).run_config, {**asked, "out-dir": str(run_dir.resolve())}, run_dir)
    report = run_dir / REPORT_JSON
    try:
        finished = report.exists() and read_report(report).final is not None
    except ConfigError as exc:
        raise ConfigError(f"Cannot resume: {exc}") from exc
    if finished:
        raise ConfigError(f"{run_dir}: the run already completed its {rc['num-server-rounds']} rounds; "
                          "nothing to resume.")
    return rc


@dataclass
class ResumeStart:
    initial: list[np.ndarray]  # the global model after `completed` rounds
    recorder: RunRecorder  # the report with rounds 1..completed
    completed: int


def resume_state(run_dir: Path, model: torch.nn.Module, run_config: RunConfig,
                 budget: float | None) -> ResumeStart:
    """What the resumed run starts from; ConfigError if there is no usable checkpoint or the job differs."""
    ckpt = load_checkpoint(run_dir)
    resume_config(ckpt.run_config, run_config, run_dir)
    warn_on_version_change(ckpt.versions)
    initial = ckpt.arrays_for(model)
    recorder = RunRecorder(run_config, run_dir, budget, report=_report_so_far(ckpt.report, ckpt.round, run_config))
    recorder.report.resumes.append(ResumeRecord(after_round=ckpt.round, time=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                                checkpoint_versions=ckpt.versions))
    log.info("resume: %s: continuing after round %d of %s", run_dir, ckpt.round,
             run_config.get("num-server-rounds"))
    return ResumeStart(initial, recorder, ckpt.round)


def _report_so_far(saved: dict[str, Any], completed: int, run_config: RunConfig) -> RunReport:
    """The checkpoint's report with rounds 1..`completed`, every field as recorded; the run config is the
    resumed job's (it may differ in what `MAY_DIFFER_ON_RESUME` allows) and the run has not ended."""
    if not saved:  # a checkpoint written before round 1 ended
        return RunReport(config=dict(run_config))
    try:
        report = load_report({**saved, "final": None})
    except ConfigError as exc:
        raise ConfigError(f"Cannot resume: the checkpoint's report: {exc}") from exc
    return report.model_copy(update={"config": dict(run_config),
                                     "rounds": [r for r in report.rounds if r.round <= completed]})
