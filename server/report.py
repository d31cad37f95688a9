"""The run's record: per-round department status, accuracy and epsilon; report.json, rounds.csv and plots.

Files are rewritten atomically after every round, so an interrupted run leaves a valid report of what finished.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.files import write_atomic
from server.records import DepartmentSize, RoundRecord, RunReport, RunSummary, dump_report

log = logging.getLogger(__name__)

REPORT_JSON = "report.json"
ROUNDS_CSV = "rounds.csv"
ACCURACY_PNG = "accuracy.png"
EPSILON_PNG = "epsilon.png"


class RunRecorder:
    """The run's report as it is recorded (`report`, a typed `RunReport`), where it is written (`out_dir`, None:
    nowhere) and the budget line of the epsilon plot (`budget`: one budget shared by every site, simulation)."""

    def __init__(self, config: Mapping[str, Any], out_dir: Path | None, budget: float | None = None, *,
                 report: RunReport | None = None) -> None:
        self.report = report if report is not None else RunReport(config=dict(config))
        self.out_dir = out_dir
        self.budget = budget
        self.central_accuracy: float | None = None  # central evaluation after the last round (simulation)

    @property
    def config(self) -> dict[str, Any]:
        return self.report.config

    @property
    def departments(self) -> dict[str, DepartmentSize]:
        return self.report.departments

    @property
    def rounds(self) -> list[RoundRecord]:
        return self.report.rounds

    @property
    def final(self) -> RunSummary | None:
        return self.report.final

    def round(self, server_round: int) -> RoundRecord:
        if not self.rounds or self.rounds[-1].round != server_round:
            self.rounds.append(RoundRecord(round=server_round))
        return self.rounds[-1]

    def department(self, name: str) -> DepartmentSize:
        return self.departments.setdefault(name, DepartmentSize())

    def to_dict(self) -> dict[str, Any]:
        """The report as a JSON document (report.json's content)."""
        return dump_report(self.report)

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
        # Rounds without federated evaluation (evaluate-every) have no accuracy: the lines join the evaluated ones.
        evaluated = [r for r in self.rounds if r.global_accuracy is not None]
        ax.plot([r.round for r in evaluated], [r.global_accuracy for r in evaluated], "k-o", lw=2.5,
                label="global held-out")
        for name in names:
            points = [(r.round, r.departments[name].accuracy) for r in self.rounds
                      if name in r.departments and r.departments[name].accuracy is not None]
            ax.plot([x for x, _ in points], [y for _, y in points], "--o", label=name)
        finish(fig, ax, self.out_dir / ACCURACY_PNG, "accuracy", "Accuracy of the global model")
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name in names:
            ax.plot(xs, [r.departments[name].epsilon if name in r.departments else None for r in self.rounds],
                    "-o", label=name)
        if self.budget is not None:
            ax.axhline(self.budget, color="red", ls=":", label="budget")
        finish(fig, ax, self.out_dir / EPSILON_PNG, "epsilon spent (site ledger)", "Privacy spent per department")
