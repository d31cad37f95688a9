"""A finished run's directory built in-process (no Ray): what `fedsilo simulate` leaves after training.

The global weights are the initial ones moved by seeded noise (LoRA's B and the head become non-zero, so a merged
export differs from the base); each department's ledger holds real charges, and the report states the epsilons
those charges reached, exactly as a department reports them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from client.ledger import LedgerFile
from client.site import simulated_sites
from common.config import as_run_config
from common.data import resolve_job
from common.model import build_model
from common.params import get_trainable, set_trainable
from server.checkpoint import save_checkpoint
from server.recording import run_summary
from server.records import AggregateStatus, DepartmentRound
from server.report import RunRecorder

LABELS = ("negative", "neutral", "positive")
WORDS = {"negative": "awful bad terrible", "neutral": "fine okay plain", "positive": "great good lovely"}


def write_data(path: Path, rows_per_department: int = 30) -> Path:
    rows = [{"text": f"{WORDS[label]} item {i} from {dept}", "label": label, "department": dept}
            for dept in ("cardiology", "radiology") for i in range(rows_per_department)
            for label in (LABELS[i % 3],)]
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def build_trained_run(run_dir: Path, *, model: str = "tiny-random", finetune: str = "lora", dp: bool = True,
                      data: Path | None = None, noise: float = 0.5) -> Path:
    """`noise`: the std of the seeded moves of the trainable weights (MiniLM: keep it near what training does)."""
    run_dir.mkdir(parents=True)
    data = data or write_data(run_dir.parent / f"{run_dir.name}-data.csv")
    rc = {"model": model, "finetune": finetune, "dp": dp, "sim-data": str(data), "out-dir": str(run_dir),
          "num-server-rounds": 2, "sim-epsilon": 8.0, "max-length": 32}
    job, sim = resolve_job(rc)
    run_config = as_run_config(job, sim)
    built = build_model(job, len(job.label_names))
    rng = np.random.default_rng(7)
    arrays = [a + rng.normal(0.0, noise, a.shape).astype(np.float32) for a in get_trainable(built.model)]
    set_trainable(built.model, arrays)
    recorder = RunRecorder(config=run_config, out_dir=run_dir, budget=sim.sim_epsilon)
    for server_round in (1, 2):
        record = recorder.round(server_round)
        for site in simulated_sites(job, sim, run_dir):
            split = site.load_split(job.label_names)
            size = recorder.department(site.name)
            size.n_train, size.n_test = len(split.train_texts), len(split.test_texts)
            epsilon = None
            if dp:
                ledger_file = LedgerFile(Path(site.ledger), site.name, site.epsilon, site.delta, site.accountant)
                with ledger_file.open() as ledger:
                    epsilon = ledger_file.charge(ledger, run_id="1", server_round=server_round,
                                                 charge=(1.1, 0.25, 4)).epsilon_after
            record.departments[site.name] = DepartmentRound(status="trained", epsilon=epsilon, accuracy=0.5,
                                                            n_test=len(split.test_texts))
        record.aggregate = AggregateStatus.APPLIED
        record.global_accuracy = 0.5
    recorder.report.final = run_summary(recorder, delta=sim.sim_delta, dp=dp, secure_aggregation=job.secagg)
    recorder.write()
    save_checkpoint(run_dir, built.model, arrays, job, 2, run_config=run_config, report=recorder.to_dict())
    return run_dir
