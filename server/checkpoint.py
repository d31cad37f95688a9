"""Self-describing checkpoints of a run, written atomically after every completed round (and before round 1).

A checkpoint holds what resuming needs and what a reader needs to trust it: the global trainable weights by name,
the last completed round, the strategy's state (the run's report so far), the job's run config and the library
versions. `fedsilo simulate --resume OUT` / `fedsilo server run --resume RUN_DIR` continue from it.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import pickle
import platform
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.config import JobConfig, RunConfig
from common.errors import ConfigError, ParameterMismatchError
from common.files import write_atomic
from common.model import trainable_names

log = logging.getLogger(__name__)

CHECKPOINT = "global_model.pt"
FORMAT = "fedsilo-checkpoint/2"
VERSIONED = ("torch", "flwr", "opacus", "transformers", "peft")
# Run-config keys a resumed job may change: where the run lives, how it is started and how patient it is.
# Everything else (model, data, DP, SecAgg+, optimisation, rounds, labels, seed) must be what the checkpoint says.
MAY_DIFFER_ON_RESUME = frozenset({"out-dir", "resume", "min-departments", "round-retries", "stage-timeout",
                                  "max-idle-rounds", "evaluate-every"})
# The job's identity: a resume keeps the checkpoint's ("" asked: keep it; another id: refused). A checkpoint
# written before job ids has none: the resumed job gets a new one (its earlier charges count under their run id).
JOB_ID = "job-id"


def library_versions() -> dict[str, str]:
    return {pkg: version(pkg) for pkg in VERSIONED} | {"python": platform.python_version()}


@dataclass(frozen=True)
class Checkpoint:
    round: int  # last completed round (0: the job started, no round completed)
    run_config: dict[str, bool | int | float | str]  # the job (and simulation) config, kebab-case keys
    trainable: dict[str, np.ndarray]  # global trainable weights by name
    report: dict[str, Any]  # the run's report after `round` (the strategy's state)
    versions: dict[str, str]

    def arrays_for(self, model: torch.nn.Module) -> list[np.ndarray]:
        """The weights in the model's exchange order; raises unless names and shapes match the model."""
        names = trainable_names(model)
        if sorted(names) != sorted(self.trainable):
            missing, extra = sorted(set(names) - set(self.trainable)), sorted(set(self.trainable) - set(names))
            raise ParameterMismatchError(f"The checkpoint's weights do not fit this model (missing {missing[:3]}, "
                                         f"unexpected {extra[:3]}).")
        params = dict(model.named_parameters())
        for name in names:
            if tuple(self.trainable[name].shape) != tuple(params[name].shape):
                raise ParameterMismatchError(f"Checkpoint tensor {name} has shape {self.trainable[name].shape}, "
                                             f"the model's is {tuple(params[name].shape)}.")
        return [self.trainable[n] for n in names]


def save_checkpoint(out_dir: Path, model: torch.nn.Module, arrays: list[np.ndarray], job: JobConfig,
                    server_round: int, *, run_config: RunConfig | None = None,
                    report: dict[str, Any] | None = None) -> Path:
    names = trainable_names(model)
    payload = {
        "format": FORMAT,
        "round": server_round,
        "job_config": dataclasses.asdict(job),
        "run_config": dict(run_config or {}),
        "strategy": {"name": "FedSiloStrategy (FedAvg of updates)", "report": report or {}},
        "trainable": {n: torch.from_numpy(a.copy()) for n, a in zip(names, arrays, strict=True)},
        "versions": library_versions(),
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    path = out_dir / CHECKPOINT
    write_atomic(path, buf.getvalue())
    return path


def load_checkpoint(run_dir: Path) -> Checkpoint:
    """Read `run_dir`'s checkpoint; ConfigError if there is none or it is not a readable fedsilo checkpoint."""
    path = run_dir / CHECKPOINT
    if not path.is_file():
        raise ConfigError(f"{path} does not exist (no round of a run was started in {run_dir}).")
    try:
        doc = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as exc:
        raise ConfigError(f"{path} is not a readable checkpoint ({exc}).") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise ConfigError(f"{path} has checkpoint format {found!r}, expected {FORMAT!r}.")
    try:
        return Checkpoint(round=int(doc["round"]), run_config=dict(doc["run_config"]),
                          trainable={n: t.numpy() for n, t in doc["trainable"].items()},
                          report=dict(doc["strategy"]["report"]), versions=dict(doc["versions"]))
    except (KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"Checkpoint {path} lacks a field ({exc!r}).") from exc


def resume_config(saved: RunConfig, asked: RunConfig, run_dir: Path) -> dict[str, bool | int | float | str]:
    """The run config of a resumed job: the checkpoint's, with the keys `asked` may change.

    Raises ConfigError naming every key whose asked value differs from the checkpoint's (except
    MAY_DIFFER_ON_RESUME): a resumed job must train the same model the same way. The job keeps its identity:
    `job-id` is the checkpoint's (asked "" keeps it; a different one is refused).
    """
    if not saved:
        raise ConfigError(f"Cannot resume: the checkpoint in {run_dir} records no job config.")
    saved_id, asked_id = str(saved.get(JOB_ID) or ""), str(asked.get(JOB_ID) or "")
    differ = sorted(k for k, v in asked.items()
                    if k not in MAY_DIFFER_ON_RESUME and k != JOB_ID and k in saved and not _same(saved[k], v))
    if saved_id and asked_id and asked_id != saved_id:
        differ = sorted([*differ, JOB_ID])
    unknown = sorted(k for k in asked if k not in saved and k not in MAY_DIFFER_ON_RESUME and k != JOB_ID)
    if differ or unknown:
        details = ", ".join([f"{k}: checkpoint {saved[k]!r}, asked {asked[k]!r}" for k in differ]
                            + [f"{k}: not in the checkpoint" for k in unknown])
        raise ConfigError(f"Cannot resume {run_dir} with a different job ({details}). Only "
                          f"{', '.join(sorted(MAY_DIFFER_ON_RESUME))} may change; start a new run otherwise.")
    return {**saved, **{k: v for k, v in asked.items() if k in MAY_DIFFER_ON_RESUME}, "resume": True,
            JOB_ID: saved_id or asked_id}


def _same(a: bool | int | float | str, b: bool | int | float | str) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return float(a) == float(b)
    return a == b


def warn_on_version_change(saved: dict[str, str]) -> None:
    now = library_versions()
    changed = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
    if changed:
        log.warning("resume: library versions differ from the checkpoint's: %s", changed)
