"""Self-describing checkpoints of the global model: trainable weights by name, round, job config, versions."""

from __future__ import annotations

import dataclasses
import io
import platform
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

from common.config import JobConfig
from common.model import trainable_names
from server.report import write_atomic

CHECKPOINT = "global_model.pt"
VERSIONED = ("torch", "flwr", "opacus", "transformers", "peft")


def save_checkpoint(out_dir: Path, model: torch.nn.Module, arrays: list[np.ndarray], job: JobConfig,
                    server_round: int) -> Path:
    names = trainable_names(model)
    payload = {
        "format": "fedsilo-checkpoint/1",
        "round": server_round,
        "job_config": dataclasses.asdict(job),
        "trainable": {n: torch.from_numpy(a.copy()) for n, a in zip(names, arrays, strict=True)},
        "versions": {pkg: version(pkg) for pkg in VERSIONED} | {"python": platform.python_version()},
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    path = out_dir / CHECKPOINT
    write_atomic(path, buf.getvalue())
    return path
