"""The run's record: per-round department status, accuracy and epsilon; report.json, rounds.csv and plots.

Files are rewritten atomically after every round, so an interrupted run leaves a valid report of what finished.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.files import write_atomic

log = logging.getLogger(__name__)

REPORT_JSON = "report.json"
ROUNDS_CSV = "rounds.csv"
ACCURACY_PNG = "accuracy.png"
EPSILON_PNG = "epsilon.png"


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


@dataclass
class DepartmentRound:
    status: str
    epsilon: float | None = None
    accuracy: float | None = None
    n_test: int | None = None
    reason: str | None = None
    train_seconds: float | None = None  # the department's own local-training time this round (fit metric)


@dataclass
class RoundRecord:
    round: int
    seconds: float = 0.0  # configure_fit to the end of federated evaluation
    fit_seconds: float = 0.0  # configure_fit to aggregate_fit: the training round, SecAgg+ stages included
    global_accuracy: float | None = None
    departments: dict[str, DepartmentRound] = field(default_factory=dict)
    failures: int = 0
    aggregate: str = "pending"  # "applied" | "kept_previous: <why>"
    errors: list[str] = field(default_factory=list)  # failure messages of departments this round
    dropouts: list[dict[str, Any]] = field(default_factory=list)  # {department, node_id, stage, attempt}
    attempts: int = 1  # fit attempts (a round whose secure aggregation halted may be retried)
    peak_rss_mb: float | None = None  # peak resident memory of the server's process tree during the round
    update_norm: float | None = None  # L2 norm of the applied global update (new global - previous), if applied


@dataclass
class RunRecorder:
    config: dict[str, Any]
    out_dir: Path | None
    departments: dict[str, dict[str, int]] = field(default_factory=dict)  # name -> {n_train, n_test}
    rounds: list[RoundRecord] = field(default_factory=list)
    final: dict[str, Any] = field(default_factory=dict)
    budget: float | None = None  # one budget shared by every site (simulation), drawn on the epsilon plot
    resumes: list[dict[str, Any]] = field(default_factory=list)  # {after_round, versions} per `--resume`

    @classmethod
    def from_dict(cls, doc: dict[str, Any], config: dict[str, Any], out_dir: Path | None,
                  budget: float | None) -> RunRecorder:
        """The recorder of a run being resumed: its rounds as recorded in `doc` (a `to_dict()` snapshot)."""
        rounds = []
        for r in doc["rounds"]:
            rec = RoundRecord(round=int(r["round"]), seconds=float(r["seconds"]),
                              global_accuracy=r["global_accuracy"], failures=int(r["failures"]),
                              aggregate=str(r["aggregate"]), errors=list(r["errors"]),
                              dropouts=list(r.get("dropouts", [])), attempts=int(r.get("attempts", 1)),
                              peak_rss_mb=r.get("peak_rss_mb"), update_norm=r.get("update_norm"))
            rec.departments = {n: DepartmentRound(**d) for n, d in r["departments"].items()}
            rounds.append(rec)
        return cls(config=config, out_dir=out_dir, departments={n: dict(v) for n, v in doc["departments"].items()},
                   rounds=rounds, budget=budget, resumes=list(doc.get("resumes", [])))

    def round(self, server_round: int) -> RoundRecord:
        if not self.rounds or self.rounds[-1].round != server_round:
            self.rounds.append(RoundRecord(round=server_round))
        return self.rounds[-1]

    def department(self, name: str) -> dict[str, int]:
        return self.departments.setdefault(name, {"n_train": 0, "n_test": 0})

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "departments": self.departments,
            "rounds": [
                {"round": r.round, "seconds": round(r.seconds, 3), "fit_seconds": round(r.fit_seconds, 3),
                 "global_accuracy": _finite(r.global_accuracy),
                 "failures": r.failures, "aggregate": r.aggregate, "errors": r.errors,
                 "attempts": r.attempts, "dropouts": r.dropouts, "peak_rss_mb": r.peak_rss_mb,
                 "update_norm": r.update_norm,
                 "departments": {n: {k: v for k, v in vars(d).items() if v is not None or k != "reason"}
                                 for n, d in sorted(r.departments.items())}}
                for r in self.rounds
            ],
            "resumes": self.resumes,
            "final": self.final,
        }

    def write(self) -> None:
        if self.out_dir is None:
            return
        write_atomic(self.out_dir / REPORT_JSON, json.dumps(self.to_dict(), indent=2, allow_nan=False).encode())
        write_atomic(self.out_dir / ROUNDS_CSV, self._csv().encode())

    def _csv(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["round", "seconds", "global_accuracy", "department", "status", "epsilon", "accuracy",
                         "peak_rss_mb"])
        for r in self.rounds:
            for name, d in sorted(r.departments.items()):
                writer.writerow([r.round, f"{r.seconds:.3f}", r.global_accuracy, name, d.status, d.epsilon,
                                 d.accuracy, r.peak_rss_mb])
        return buf.getvalue()

    def plot(self) -> None:
        """Accuracy per round (global and per department) and epsilon spent per department per round."""
        if self.out_dir is None or not self.rounds:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator

        def finish(fig: Any, ax: Any, path: Path, ylabel: str, title: str) -> None:
            ax.set(xlabel="round", ylabel=ylabel, title=title)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            ax.legend()
            fig.tight_layout()
            fig.savefig(path, dpi=110)
            plt.close(fig)

        xs = [r.round for r in self.rounds]
        names = sorted({n for r in self.rounds for n in r.departments})
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ax.plot(xs, [r.global_accuracy for r in self.rounds], "k-o", lw=2.5, label="global held-out")
        for name in names:
            ax.plot(xs, [r.departments[name].accuracy if name in r.departments else None for r in self.rounds],
                    "--o", label=name)
        finish(fig, ax, self.out_dir / ACCURACY_PNG, "accuracy", "Accuracy of the global model")
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name in names:
            ax.plot(xs, [r.departments[name].epsilon if name in r.departments else None for r in self.rounds],
                    "-o", label=name)
        if self.budget is not None:
            ax.axhline(self.budget, color="red", ls=":", label="budget")
        finish(fig, ax, self.out_dir / EPSILON_PNG, "epsilon spent (site ledger)", "Privacy spent per department")
