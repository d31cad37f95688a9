"""Utility study: what privacy costs in accuracy, under one fixed compute budget.

Arms, all on the same departments, model, tokenisation, batch size and learning rate:
- centralized: non-private training on the pooled training data of every department;
- federated: non-private FedAvg over the departments (SecAgg+ as configured);
- federated DP at each epsilon: every site's budget is that epsilon (delta as configured).

Each arm runs `repeats` times, with seeds seed, seed+1, ... (the seed sets the train/test split, the model's
initialisation and the batch order; DP noise and sampling come from the OS's entropy pool whatever the seed); the
tables give the median over an arm's runs and their range, so one lucky or unlucky DP run does not decide a goal.

The compute budget is the number of gradient steps of the configured (expected) batch size: a federated arm takes
`rounds x client.plan.finetune_work(n_d, job).steps` steps at each department d; the centralized arm takes their
sum on the pooled data. Accuracy is measured on the same global held-out test (the union of the departments' test
splits) and on each department's own test split.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from client.plan import finetune_work
from client.site import simulated_sites
from client.train import train_round
from common.config import check_known_keys
from common.data import DEPARTMENT, LABEL, TEXT, load_source, resolve_job
from common.errors import ConfigError
from common.files import write_atomic
from common.model import build_model, device
from common.text import encode, evaluate
from server.records import load_report
from simulations.machine import describe, machine_line
from simulations.run import SimulationFailedError, simulate

log = logging.getLogger(__name__)

STUDY_JSON = "study.json"
STUDY_DATA = "data.csv"  # the per-department subsample, when the study takes one
STUDY_MD = "study.md"
UTILITY_PNG = "utility.png"
DEFAULT_EPSILONS = (8.0, 3.0, 1.0)
CENTRALIZED, FEDERATED = "centralized", "federated"
GOAL_DP_POINTS = 3.0  # federated DP at eps=8 within this many points of federated non-private
GOAL_FED_POINTS = 2.0  # federated non-private within this many points of centralized
GOAL_EPSILON = 8.0
FIXED_BY_STUDY = ("dp", "sim-epsilon", "sim-site-epsilons", "out-dir")


@dataclass
class ArmRun:
    seed: int
    global_accuracy: float
    departments: dict[str, float]  # department -> accuracy on its own test split
    seconds: float
    epsilon_spent: dict[str, float] = field(default_factory=dict)


@dataclass
class Arm:
    name: str
    epsilon: float | None  # per-site budget; None = non-private
    steps: int  # gradient steps of the configured batch size, all departments together (per run)
    runs: list[ArmRun] = field(default_factory=list)

    @property
    def global_accuracy(self) -> float:
        """Median over the arm's runs."""
        return float(statistics.median(r.global_accuracy for r in self.runs))

    @property
    def departments(self) -> dict[str, float]:
        names = sorted({d for r in self.runs for d in r.departments})
        return {d: float(statistics.median(r.departments[d] for r in self.runs if d in r.departments))
                for d in names}

    @property
    def seconds(self) -> float:
        return float(statistics.median(r.seconds for r in self.runs))

    def seeds(self) -> list[int]:
        return [r.seed for r in self.runs]

    def to_dict(self) -> dict[str, Any]:
        spent = {d: max(r.epsilon_spent[d] for r in self.runs if d in r.epsilon_spent)
                 for d in sorted({d for r in self.runs for d in r.epsilon_spent})}
        return {"name": self.name, "epsilon": self.epsilon, "steps": self.steps,
                "global_accuracy": self.global_accuracy, "global_accuracy_range": self.accuracy_range(),
                "departments": self.departments, "seconds": self.seconds, "epsilon_spent": spent,
                "runs": [asdict(r) for r in self.runs]}

    def accuracy_range(self) -> list[float]:
        values = [r.global_accuracy for r in self.runs]
        return [min(values), max(values)]

    @classmethod
    def from_dict(cls, saved: dict[str, Any], base_seed: int) -> Arm:
        """An arm as study.json holds it; a study written before repeats existed holds one run of `base_seed`."""
        runs = saved.get("runs")
        if runs is None:
            runs = [{"seed": base_seed, "global_accuracy": saved["global_accuracy"],
                     "departments": saved["departments"], "seconds": saved["seconds"],
                     "epsilon_spent": saved.get("epsilon_spent", {})}]
        return cls(saved["name"], saved["epsilon"], saved["steps"], [ArmRun(**r) for r in runs])


@dataclass
class Study:
    config: dict[str, Any]
    budget: dict[str, Any]
    machine: dict[str, Any]
    arms: list[Arm] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config, "budget": self.budget, "machine": self.machine,
                "arms": [a.to_dict() for a in self.arms], "goals": self.goals()}

    def arm(self, name: str) -> Arm | None:
        return next((a for a in self.arms if a.name == name), None)

    def goals(self) -> dict[str, Any]:
        central, fed = self.arm(CENTRALIZED), self.arm(FEDERATED)
        dp = next((a for a in self.arms if a.epsilon == GOAL_EPSILON), None)
        out: dict[str, Any] = {}
        if fed and dp:
            out["dp_eps8_gap_points"] = _gap(fed, dp, GOAL_DP_POINTS)
        if central and fed:
            out["federated_gap_points"] = _gap(central, fed, GOAL_FED_POINTS)
        return out


def _gap(reference: Arm, arm: Arm, goal: float) -> dict[str, Any]:
    """How many accuracy points `arm` is below `reference`: medians, and seed by seed where both ran a seed."""
    gap = 100 * (reference.global_accuracy - arm.global_accuracy)
    theirs = {r.seed: r.global_accuracy for r in arm.runs}
    per_seed = {str(r.seed): round(100 * (r.global_accuracy - theirs[r.seed]), 2) for r in reference.runs
                if r.seed in theirs}
    runs = "medians of " + " and ".join(f"{len(a.runs)} run{'s' if len(a.runs) > 1 else ''}" for a in (reference, arm))
    return {"value": round(gap, 2), "goal": goal, "met": gap <= goal, "runs": runs, "per_seed": per_seed}


def _gap_line(what: str, reference: str, g: dict[str, Any]) -> str:
    side = f"{g['value']:.2f} points below" if g["value"] >= 0 else f"{-g['value']:.2f} points above"
    seeds = ", ".join(f"seed {k}: {v:.2f}" for k, v in g.get("per_seed", {}).items())
    return (f"- {what} ({g['runs']}) is {side} {reference} (goal: at most {g['goal']:g} below: "
            f"{'met' if g['met'] else 'missed'})" + (f"; gap seed by seed: {seeds}." if seeds else "."))


def arm_name(epsilon: float) -> str:
    return f"federated-dp-eps{epsilon:g}"


def subsample(rc: dict[str, Any], per_department: int, out_dir: Path) -> dict[str, Any]:
    """Write at most `per_department` rows of each department (seeded) to out_dir/data.csv; the run config for it."""
    if per_department < 10:
        raise ConfigError(f"--per-department must be at least 10, got {per_department}.")
    _, sim = resolve_job({**rc, "dp": False})
    frame = load_source(sim.sim_data, sim.sim_text_column, sim.sim_label_column, sim.sim_department_column)
    seed = int(rc.get("seed", 0))
    parts = [g.sample(n=min(per_department, len(g)), random_state=seed) for _, g in frame.groupby(DEPARTMENT)]
    path = out_dir / STUDY_DATA
    write_atomic(path, pd.concat(parts)[[TEXT, LABEL, DEPARTMENT]].to_csv(index=False).encode())
    return {**rc, "sim-data": str(path.resolve()), "sim-text-column": TEXT, "sim-label-column": LABEL,
            "sim-department-column": DEPARTMENT}


def _budget(rc: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    job, sim = resolve_job({**rc, "dp": False})
    sites = simulated_sites(job, sim, out_dir)
    per_round = {}
    for site in sites:
        n = len(site.load_split(job.label_names).train_texts)
        per_round[site.name] = finetune_work(n, job).steps
    total = job.num_server_rounds * sum(per_round.values())
    return {"rounds": job.num_server_rounds, "local_epochs": job.local_epochs, "batch_size": job.batch_size,
            "steps_per_round": per_round, "total_steps": total}


def run_centralized(rc: dict[str, Any], out_dir: Path, steps: int) -> ArmRun:
    """Non-private training on the pooled departments, `steps` steps of the job's batch size."""
    job, sim = resolve_job({**rc, "dp": False})
    labels = job.label_names
    splits = {s.name: s.load_split(labels) for s in simulated_sites(job, sim, out_dir)}
    built = build_model(job, len(labels))
    train = encode(built.tokenizer, [t for s in splits.values() for t in s.train_texts],
                   np.concatenate([s.train_labels for s in splits.values()]), job.max_length)
    start = time.perf_counter()
    train_round(built.model, train, job, batch_size=job.batch_size, steps=steps, noise_multiplier=None, dev=device(),
                seed=job.seed)
    per_dept = {}
    correct = total = 0
    for name, split in splits.items():
        result = evaluate(built.model, encode(built.tokenizer, split.test_texts, split.test_labels, job.max_length),
                          device())
        per_dept[name] = result.accuracy
        correct += result.correct
        total += result.n
    return ArmRun(job.seed, correct / total, per_dept, time.perf_counter() - start)


def run_federated(rc: dict[str, Any], run_dir: Path, epsilon: float | None) -> ArmRun:
    arm_rc = {**rc, "dp": epsilon is not None}
    if epsilon is not None:
        arm_rc["sim-epsilon"] = epsilon
    start = time.perf_counter()
    report = load_report(simulate(arm_rc, run_dir))
    if report.final is None or report.final.global_accuracy is None:
        raise SimulationFailedError(f"{run_dir}: the run's report has no final global accuracy.")
    last = report.rounds[-1]
    per_dept = {n: d.accuracy for n, d in last.departments.items() if d.accuracy is not None}
    spent = {n: e for n, e in report.final.epsilon.items() if e is not None} if epsilon is not None else {}
    return ArmRun(int(arm_rc.get("seed", 0)), report.final.global_accuracy, per_dept, time.perf_counter() - start,
                  spent)


def _check_study_args(rc: dict[str, Any], epsilons: Sequence[float], repeats: int) -> None:
    fixed = sorted(set(rc) & set(FIXED_BY_STUDY))
    if fixed:
        raise ConfigError(f"The utility study sets {', '.join(fixed)} itself; do not pass them.")
    if not epsilons or any(e <= 0 for e in epsilons):
        raise ConfigError(f"The study needs positive epsilons, got {list(epsilons)}.")
    if repeats < 1:
        raise ConfigError(f"--repeats must be at least 1, got {repeats}.")
    check_known_keys(rc)


def _restore(study: Study, saved: dict[str, Any], epsilons: Sequence[float], base_seed: int, out_dir: Path) -> None:
    """`study` (new, with this invocation's settings) continues the saved one: same settings required."""
    if saved["budget"] != study.budget or {k: v for k, v in saved["config"].items() if k != "epsilons"} != {
            k: v for k, v in study.config.items() if k != "epsilons"}:
        raise ConfigError(f"--resume: {out_dir / STUDY_JSON} was made with other settings; use the same ones.")
    study.machine = saved["machine"]
    study.arms = [Arm.from_dict(a, base_seed) for a in saved["arms"]]
    study.config["epsilons"] = sorted({*saved["config"]["epsilons"], *epsilons})


def run_study(rc: dict[str, Any], out_dir: Path, epsilons: Sequence[float] = DEFAULT_EPSILONS,
              on_arm: Callable[[Study], None] | None = None, per_department: int | None = None,
              resume: bool = False, repeats: int = 1) -> Study:
    """Run every arm (centralized, federated, then federated DP from the largest epsilon down) `repeats` times,
    seeds seed, seed+1, ...: first every arm once, then the second run of each, and so on.

    study.json, study.md and utility.png are rewritten after every run, so an interrupted study leaves the runs it
    finished; `resume` runs only the runs that study.json lacks (same settings required; more repeats or other
    epsilons may be asked for, and the arms already there are kept).
    """
    _check_study_args(rc, epsilons, repeats)
    saved: dict[str, Any] | None = None
    if (out_dir / STUDY_JSON).exists():
        if not resume:
            raise ConfigError(f"{out_dir} already holds a study ({STUDY_JSON}); choose another --out or --resume.")
        saved = json.loads((out_dir / STUDY_JSON).read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    source = str(rc.get("sim-data", "hutto"))
    if per_department is not None:
        rc = subsample(rc, per_department, out_dir)
    budget = _budget(rc, out_dir)
    budget["per_department"] = per_department
    job, sim = resolve_job({**rc, "dp": False})
    config = {"model": job.model, "finetune": job.finetune, "lora_r": job.lora_r, "batch_size": job.batch_size,
              "learning_rate": job.learning_rate, "optimizer": job.optimizer, "clip_norm": job.clip_norm,
              "max_length": job.max_length, "grad_sample_mode": job.grad_sample_mode, "secagg": job.secagg,
              "data": source, "test_fraction": sim.sim_test_fraction, "delta": sim.sim_delta,
              "epsilons": sorted(epsilons), "overrides": rc}
    study = Study(config=config, budget=budget, machine=describe())
    if saved is not None:
        _restore(study, saved, epsilons, job.seed, out_dir)
    log.info("study: budget %s", budget)
    steps = int(budget["total_steps"])
    arms: list[tuple[str, float | None]] = [(CENTRALIZED, None), (FEDERATED, None)]
    arms += [(arm_name(e), e) for e in sorted(epsilons, reverse=True)]
    for i in range(repeats):
        seed = job.seed + i
        seeded = {**rc, "seed": seed}
        for name, epsilon in arms:
            arm = study.arm(name)
            if arm is not None and seed in arm.seeds():
                log.info("study: %s seed %d already done (resume)", name, seed)
                continue
            run_dir = out_dir / (name if i == 0 else f"{name}-seed{seed}")
            run = (run_centralized(seeded, out_dir, steps) if name == CENTRALIZED
                   else run_federated(seeded, run_dir, epsilon))
            log.info("study: %s seed %d accuracy %.4f in %.0fs", name, seed, run.global_accuracy, run.seconds)
            if arm is None:
                arm = Arm(name, epsilon, steps)
                study.arms.append(arm)
            arm.runs.append(run)
            write_study(study, out_dir)
            if on_arm is not None:
                on_arm(study)
    study.machine["load_average_end"] = describe()["load_average"]
    write_study(study, out_dir)
    return study


def write_study(study: Study, out_dir: Path) -> None:
    write_atomic(out_dir / STUDY_JSON, json.dumps(study.to_dict(), indent=2, allow_nan=False).encode())
    write_atomic(out_dir / STUDY_MD, study_markdown(study).encode())
    plot_study(study, out_dir / UTILITY_PNG)


def study_markdown(study: Study, plot: str | None = UTILITY_PNG) -> str:
    b = study.budget
    depts = sorted({d for a in study.arms for d in a.departments})
    lines = [
        "## Utility study",
        "",
        f"Machine: {machine_line(study.machine)}.",
        "",
        f"Compute budget (every arm): {b['rounds']} round(s) x {b['local_epochs']:g} local epoch of each "
        f"department's training data, expected batch {b['batch_size']} = {b['total_steps']} gradient steps in all "
        f"(per department per round: {', '.join(f'{k} {v}' for k, v in b['steps_per_round'].items())}); the "
        "centralized arm takes the same number of steps on the pooled data. "
        + (f"Data: {study.config['data']}, at most {b['per_department']} rows per department (seeded sample, "
           f"split {1 - study.config['test_fraction']:g}/{study.config['test_fraction']:g} train/test). "
           if b.get("per_department") else f"Data: {study.config['data']}. ") +
        f"Model {study.config['model']} ({study.config['finetune']}, r={study.config['lora_r']}), "
        f"{study.config['optimizer']} lr {study.config['learning_rate']:g}, clip {study.config['clip_norm']:g}, "
        f"delta {study.config['delta']:g}, SecAgg+ {'on' if study.config['secagg'] else 'off'}. Accuracy on the "
        "union of the departments' held-out splits, and on each department's own split.",
        "",
        "Every figure is the median over an arm's runs (seeds in the runs column; DP noise is drawn from the OS's "
        "entropy pool, so DP runs differ even with one seed); range = lowest and highest global accuracy of the runs.",
        "",
        "| arm | epsilon per site | runs (seeds) | global accuracy | range | " + " | ".join(depts) +
        " | minutes per run |",
        "|---|---|---|---|---|" + "---|" * len(depts) + "---|",
    ]
    for a in study.arms:
        eps = "none (non-private)" if a.epsilon is None else f"{a.epsilon:g}"
        cells = " | ".join(f"{a.departments[d]:.4f}" if d in a.departments else "" for d in depts)
        low, high = a.accuracy_range()
        seeds = ", ".join(str(x) for x in a.seeds())
        lines.append(f"| {a.name} | {eps} | {len(a.runs)} ({seeds}) | {a.global_accuracy:.4f} | "
                     f"{low:.4f}-{high:.4f} | {cells} | {a.seconds / 60:.1f} |")
    goals = study.goals()
    if goals:
        lines.append("")
    if "dp_eps8_gap_points" in goals:
        lines.append(_gap_line("Federated DP at epsilon=8", "federated non-private", goals["dp_eps8_gap_points"]))
    if "federated_gap_points" in goals:
        lines.append(_gap_line("Federated non-private", "centralized", goals["federated_gap_points"]))
    if plot:
        lines += ["", f"![accuracy vs epsilon]({plot})"]
    return "\n".join(lines) + "\n"


def plot_study(study: Study, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dp = sorted((a for a in study.arms if a.epsilon is not None), key=lambda a: a.epsilon or 0.0)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if dp:
        xs = [a.epsilon for a in dp]
        ys = [a.global_accuracy for a in dp]
        spread = [[a.global_accuracy - a.accuracy_range()[0] for a in dp],
                  [a.accuracy_range()[1] - a.global_accuracy for a in dp]]
        ax.errorbar(xs, ys, yerr=spread, fmt="k-o", lw=2.5, capsize=4, label="federated DP (global, median; range)")
        for dept in sorted({d for a in dp for d in a.departments}):
            ax.plot(xs, [a.departments.get(dept) for a in dp], "--o", lw=1, alpha=0.7, label=f"  {dept}")
        ax.set_xscale("log")
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
    styles = {CENTRALIZED: ("tab:blue", "-"), FEDERATED: ("tab:green", "-.")}
    for name, (color, ls) in styles.items():
        arm = study.arm(name)
        if arm is not None:
            ax.axhline(arm.global_accuracy, color=color, ls=ls, label=f"{name} non-private")
    ax.set(xlabel=f"epsilon per site (delta {study.config['delta']:g})", ylabel="held-out accuracy",
           title="Accuracy vs privacy budget, one compute budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_study(out_dir: Path) -> Study:
    path = out_dir / STUDY_JSON
    if not path.is_file():
        raise ConfigError(f"{out_dir} holds no study ({STUDY_JSON}).")
    try:
        saved = json.loads(path.read_text())
        return Study(config=saved["config"], budget=saved["budget"], machine=saved["machine"],
                     arms=[Arm.from_dict(a, int(saved["config"]["overrides"].get("seed", 0)))
                           for a in saved["arms"]])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path} is not a study written by fedsilo: {exc}") from exc


def run_study_command(rc: dict[str, Any], out_dir: Path, epsilons: Sequence[float], docs: Path | None,
                      per_department: int | None = None, resume: bool = False, render: bool = False,
                      repeats: int = 1) -> str:
    """`fedsilo study utility`: run (or, with `render`, only re-render what out_dir holds), optionally rewrite the
    docs section; returns the markdown table."""
    if render:
        study = load_study(out_dir)
        write_study(study, out_dir)
    else:
        study = run_study(rc, out_dir, epsilons, per_department=per_department, resume=resume, repeats=repeats)
    if docs is not None:
        from simulations.docs import update_section

        plot_study(study, docs.parent / UTILITY_PNG)
        update_section(docs, "study", study_markdown(study, plot=UTILITY_PNG))
    return study_markdown(study, plot=None)
