"""Utility study: what privacy costs in accuracy, under one compute budget, each arm tuned the same way.

Arms, all on the same departments, model and tokenisation:
- centralized: non-private training on the pooled training data of every department (a head-only phase on the
  pooled cached head inputs, as the federated arms' probe phase, then fine-tuning);
- federated: non-private FedAvg over the departments (SecAgg+ as configured);
- federated DP at each epsilon: every site's budget is that epsilon (delta as configured).

Tuning: a grid of run-config values is declared in advance (`DEFAULT_GRID_FACTORS`, or `--grid KEY=V1,V2,...`), the
same points for every arm (the same tuning effort). With the base seed, each arm runs every point on a tuning data
set made of the departments' *training* rows only (each site's own split: the test rows never enter it), split
again into train and validation (`VALIDATION_FRACTION`); the point with the best global validation accuracy wins
(ties: the first declared). The arm's runs then use that point on the real data and report test accuracy. The
tuning runs' own privacy cost is not counted in the DP arms' epsilon.

Each arm runs `repeats` times, with seeds seed, seed+1, ... (the seed sets the model's initialisation and the batch
order; DP noise and sampling come from the OS's entropy pool whatever the seed); the train/test split stays the base
seed's in every repeat (`sim-split-seed`), so the test rows are the same ones, never seen by tuning. The tables give
the median over an arm's runs and their range, so one lucky or unlucky DP run does not decide a goal.

The compute budget is counted in examples processed: a federated arm's department d takes, per fine-tuning round,
`client.plan.finetune_work(n_d, job)` (about `local-epochs` of its rows), after `probe-rounds` head-only rounds of
`probe-epochs`; the centralized arm first trains the head alone for `probe-rounds x probe-epochs` epochs of the
pooled rows (non-private), then fine-tunes on as many examples as the federated fine-tuning rounds process at all
departments together, with its own batch size. Accuracy is measured on the same global held-out test (the union of
the departments' test splits) and on each department's own test split; the majority-class accuracy of that global
test (the most frequent training class) is the floor a model must beat.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import re
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from client.plan import finetune_work, probe_work
from client.site import simulated_sites
from client.train import head_inputs, train_head, train_round
from common.config import JobConfig, check_known_keys
from common.data import DEPARTMENT, LABEL, TEXT, load_source, resolve_job
from common.errors import ConfigError
from common.files import write_atomic
from common.model import build_model, device, head_module
from common.privacy import local_work
from common.settings import settings_fields
from common.text import encode, evaluate
from server.records import load_report
from simulations.machine import describe, machine_line
from simulations.run import SimulationFailedError, simulate

log = logging.getLogger(__name__)

STUDY_JSON = "study.json"
STUDY_DATA = "data.csv"  # the per-department subsample, when the study takes one
TUNING_DATA = "tuning.csv"  # the departments' training rows (base seed), split again into train and validation
TUNING_DIR = "tuning"
STUDY_MD = "study.md"
UTILITY_PNG = "utility.png"
DEFAULT_EPSILONS = (8.0, 3.0, 1.0)
CENTRALIZED, FEDERATED = "centralized", "federated"
# The grid declared in advance: multiples of the configured value, the same points for every arm (equal tuning
# effort). clip-norm is not gridded by default: it does nothing in the non-private arms.
DEFAULT_GRID_FACTORS: dict[str, tuple[float, ...]] = {"learning-rate": (0.5, 1.0, 2.0)}
VALIDATION_FRACTION = 0.2  # share of each department's training rows the tuning runs validate on
GOAL_EPSILON = 8.0
SMALL_DATA = "hutto-small"
# Goals, in accuracy points: gaps are "at most this many below"; above_majority is "at least this many above".
# None: reported, no goal. The small-department scenario has goals of its own.
GOALS: dict[str, dict[str, float | None]] = {
    "default": {"dp_eps8": 2.0, "dp_eps3": 4.0, "dp_eps1": None, "federated": 2.0, "above_majority": None},
    SMALL_DATA: {"dp_eps8": 6.0, "dp_eps3": None, "dp_eps1": None, "federated": None, "above_majority": 10.0},
}
GOAL_DP_POINTS = GOALS["default"]["dp_eps8"]  # federated DP at eps=8 within this many points of federated non-private
GOAL_FED_POINTS = GOALS["default"]["federated"]  # federated non-private within this many points of centralized
FIXED_BY_STUDY = ("dp", "sim-epsilon", "sim-site-epsilons", "sim-split-seed", "out-dir")
# What a grid may tune: training hyperparameters. The compute budget (rounds, epochs, step bounds), the privacy
# settings the study fixes, the seed and the protocol's settings are not tuned.
TUNABLE = ("learning-rate", "batch-size", "clip-norm", "lora-r", "lora-alpha", "probe-learning-rate",
           "probe-batch-size", "probe-epsilon-share")
Point = dict[str, float | int]


@dataclass
class ArmRun:
    seed: int
    global_accuracy: float
    departments: dict[str, float]  # department -> accuracy on its own test split
    seconds: float
    epsilon_spent: dict[str, float] = field(default_factory=dict)


@dataclass
class Trial:
    """One tuning run: an arm at one grid point, on the tuning data (base seed), scored on validation rows."""

    arm: str
    point: int  # index in the grid's points, in declaration order
    values: Point
    validation_accuracy: float
    seconds: float


@dataclass
class Arm:
    name: str
    epsilon: float | None  # per-site budget; None = non-private
    steps: int  # fine-tuning gradient steps per run, all departments together (centralized: on the pooled rows)
    runs: list[ArmRun] = field(default_factory=list)
    point: Point = field(default_factory=dict)  # the grid point the arm's runs use
    examples: dict[str, float] = field(default_factory=dict)  # fine-tuning examples per department per run
    head_examples: float = 0.0  # examples of the head-only phase per run, all departments together

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
        return {"name": self.name, "epsilon": self.epsilon, "steps": self.steps, "point": self.point,
                "examples": self.examples, "head_examples": self.head_examples,
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
        return cls(saved["name"], saved["epsilon"], saved["steps"], [ArmRun(**r) for r in runs],
                   dict(saved.get("point", {})), dict(saved.get("examples", {})),
                   float(saved.get("head_examples", 0.0)))


@dataclass
class Study:
    config: dict[str, Any]
    budget: dict[str, Any]
    machine: dict[str, Any]
    arms: list[Arm] = field(default_factory=list)
    trials: list[Trial] = field(default_factory=list)
    chosen: dict[str, int] = field(default_factory=dict)  # arm -> index of its grid point
    majority: dict[str, Any] = field(default_factory=dict)  # the majority class and its global test accuracy

    def to_dict(self) -> dict[str, Any]:
        points = self.points()
        return {"config": self.config, "budget": self.budget, "machine": self.machine,
                "grid": self.config.get("grid", {}), "validation_fraction": self.config.get("validation_fraction"),
                "seeds": self.seeds(), "trials": [asdict(t) for t in self.trials],
                "chosen": {a: {"point": i, "values": points[i] if i < len(points) else {}}
                           for a, i in self.chosen.items()},
                "majority": self.majority, "arms": [a.to_dict() for a in self.arms], "goals": self.goals()}

    def points(self) -> list[Point]:
        return grid_points(self.config.get("grid", {}))

    def seeds(self) -> list[int]:
        return sorted({s for a in self.arms for s in a.seeds()})

    def arm(self, name: str) -> Arm | None:
        return next((a for a in self.arms if a.name == name), None)

    def trial(self, arm: str, point: int) -> Trial | None:
        return next((t for t in self.trials if t.arm == arm and t.point == point), None)

    def goals(self) -> dict[str, Any]:
        table = GOALS.get(str(self.config.get("data")), GOALS["default"])
        central, fed = self.arm(CENTRALIZED), self.arm(FEDERATED)
        out: dict[str, Any] = {}
        for epsilon in (8.0, 3.0, 1.0):
            dp = next((a for a in self.arms if a.epsilon == epsilon), None)
            if fed and dp:
                out[f"dp_eps{epsilon:g}_gap_points"] = _gap(fed, dp, table[f"dp_eps{epsilon:g}"])
        if central and fed:
            out["federated_gap_points"] = _gap(central, fed, table["federated"])
        dp8 = next((a for a in self.arms if a.epsilon == GOAL_EPSILON), None)
        if dp8 and self.majority:
            above = 100 * (dp8.global_accuracy - float(self.majority["accuracy"]))
            goal = table["above_majority"]
            out["dp_eps8_above_majority_points"] = {
                "value": round(above, 2), "goal": goal, "met": None if goal is None else above >= goal,
                "runs": f"median of {len(dp8.runs)} run{'s' if len(dp8.runs) > 1 else ''}"}
        return out


def _gap(reference: Arm, arm: Arm, goal: float | None) -> dict[str, Any]:
    """How many accuracy points `arm` is below `reference`: medians, and seed by seed where both ran a seed."""
    gap = 100 * (reference.global_accuracy - arm.global_accuracy)
    theirs = {r.seed: r.global_accuracy for r in arm.runs}
    per_seed = {str(r.seed): round(100 * (r.global_accuracy - theirs[r.seed]), 2) for r in reference.runs
                if r.seed in theirs}
    runs = "medians of " + " and ".join(f"{len(a.runs)} run{'s' if len(a.runs) > 1 else ''}" for a in (reference, arm))
    return {"value": round(gap, 2), "goal": goal, "met": None if goal is None else gap <= goal, "runs": runs,
            "per_seed": per_seed}


def _gap_line(what: str, reference: str, g: dict[str, Any]) -> str:
    side = f"{g['value']:.2f} points below" if g["value"] >= 0 else f"{-g['value']:.2f} points above"
    seeds = ", ".join(f"seed {k}: {v:.2f}" for k, v in g.get("per_seed", {}).items())
    verdict = "no goal: reported" if g["goal"] is None else (
        f"goal: at most {g['goal']:g} below: {'met' if g['met'] else 'missed'}")
    return (f"- {what} ({g['runs']}) is {side} {reference} ({verdict})"
            + (f"; gap seed by seed: {seeds}." if seeds else "."))


def arm_name(epsilon: float) -> str:
    return f"federated-dp-eps{epsilon:g}"


# --- the grid ---------------------------------------------------------------------------------------------------

def griddable_keys() -> dict[str, type]:
    """The run-config keys a grid may tune (`TUNABLE`) and their type."""
    return {f.key: f.kind for f in settings_fields(JobConfig) if f.kind in (int, float) and f.key in TUNABLE}


def parse_grid(items: Sequence[str]) -> dict[str, list[float | int]]:
    """`--grid KEY=V1,V2,...` options (repeatable) as a grid, keys in the order given."""
    kinds = griddable_keys()
    grid: dict[str, list[float | int]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise ConfigError(f"--grid wants KEY=V1,V2,... (e.g. learning-rate=0.0025,0.005,0.01), got {item!r}.")
        if key not in kinds:
            raise ConfigError(f"--grid: {key!r} is not a run-config key the study can tune; tunable keys: "
                              f"{', '.join(sorted(kinds))}.")
        if key in grid:
            raise ConfigError(f"--grid names {key!r} twice; give all its values in one option.")
        parsed: list[float | int] = []
        for text in values.split(","):
            try:
                value = float(text)
            except ValueError:
                raise ConfigError(f"--grid {key}: {text.strip()!r} is not a number.") from None
            if not math.isfinite(value):
                raise ConfigError(f"--grid {key}: {text.strip()!r} is not a finite number.")
            if kinds[key] is int:
                if not value.is_integer():
                    raise ConfigError(f"--grid {key}: takes whole numbers, got {text.strip()!r}.")
                parsed.append(int(value))
            else:
                parsed.append(value)
        if len(set(parsed)) != len(parsed):
            raise ConfigError(f"--grid {key}: a value is repeated in {values.strip()!r}.")
        grid[key] = parsed
    return grid


def default_grid(job: JobConfig) -> dict[str, list[float | int]]:
    """`DEFAULT_GRID_FACTORS` applied to the job's configured values."""
    kinds = griddable_keys()
    grid: dict[str, list[float | int]] = {}
    for key, factors in DEFAULT_GRID_FACTORS.items():
        base = getattr(job, key.replace("-", "_"))
        grid[key] = [max(1, round(base * f)) if kinds[key] is int else float(base * f) for f in factors]
    return grid


def grid_points(grid: Mapping[str, Sequence[float | int]]) -> list[Point]:
    """Every combination of the grid's values, the first key varying slowest; [{}] for an empty grid."""
    keys = list(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(grid[k] for k in keys))]


def choose(trials: Sequence[Trial]) -> int:
    """The grid point with the best validation accuracy among an arm's trials; ties go to the first declared."""
    if not trials:
        raise ConfigError("No tuning trial to choose from.")
    return min(trials, key=lambda t: (-t.validation_accuracy, t.point)).point


def _point_label(point: Point) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in point.items()) or "as configured"


# --- data, budget, baselines ------------------------------------------------------------------------------------

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


def tuning_data(rc: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Write every department's training rows, as its own site splits them under the run config's seed, to
    out_dir/tuning.csv (the test rows never enter it); the run config that splits them again into train and
    validation (`VALIDATION_FRACTION` held out), with the job's label set."""
    job, sim = resolve_job({**rc, "dp": False})
    parts = []
    for site in simulated_sites(job, sim, out_dir):
        split = site.load_split(job.label_names)
        parts.append(pd.DataFrame({TEXT: split.train_texts, LABEL: [job.label_names[i] for i in split.train_labels],
                                   DEPARTMENT: site.name}))
    path = out_dir / TUNING_DATA
    write_atomic(path, pd.concat(parts, ignore_index=True).to_csv(index=False).encode())
    return {**rc, "sim-data": str(path.resolve()), "sim-text-column": TEXT, "sim-label-column": LABEL,
            "sim-department-column": DEPARTMENT, "sim-test-fraction": VALIDATION_FRACTION,
            "labels": ",".join(job.label_names), "seed": job.seed}


def _budget(rc: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """The federated arms' work per run: head-only (probe) rounds, then fine-tuning rounds, in examples."""
    job, sim = resolve_job({**rc, "dp": False})
    probe_rounds = min(job.probe_rounds, job.num_server_rounds)
    finetune_rounds = job.num_server_rounds - probe_rounds
    departments: dict[str, dict[str, float]] = {}
    for site in simulated_sites(job, sim, out_dir):
        n = len(site.load_split(job.label_names).train_texts)
        work, probe = finetune_work(n, job), probe_work(n, job)
        departments[site.name] = {
            "train_rows": n, "steps_per_round": work.steps, "expected_batch": round(work.expected_batch, 2),
            "examples": round(finetune_rounds * work.steps * work.expected_batch, 1),
            "head_examples": round(probe_rounds * probe.steps * probe.expected_batch, 1)}
    return {"rounds": job.num_server_rounds, "probe_rounds": probe_rounds, "finetune_rounds": finetune_rounds,
            "local_epochs": job.local_epochs, "probe_epochs": job.probe_epochs, "batch_size": job.batch_size,
            "departments": departments,
            "examples": round(sum(d["examples"] for d in departments.values()), 1),
            "head_examples": round(sum(d["head_examples"] for d in departments.values()), 1),
            "total_steps": finetune_rounds * sum(int(d["steps_per_round"]) for d in departments.values())}


def centralized_schedule(budget: dict[str, Any], job: JobConfig) -> dict[str, int]:
    """The centralized arm's work on the pooled training rows: a non-private head-only phase of the federated
    probe's epochs (`probe-rounds x probe-epochs`), then as many fine-tuning examples as the federated arms process
    at every department together, in batches of the job's batch size (at most a quarter of the rows)."""
    n = int(sum(d["train_rows"] for d in budget["departments"].values()))
    probe = probe_work(n, job)
    head_steps = int(budget["probe_rounds"]) * probe.steps
    batch = local_work(n, job.batch_size, 1.0).batch_size
    steps = round(float(budget["examples"]) / batch)
    return {"rows": n, "head_batch": probe.batch_size, "head_steps": head_steps,
            "head_examples": head_steps * probe.batch_size, "batch": batch, "steps": steps,
            "examples": steps * batch}


def majority_baseline(rc: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """The global test accuracy of always answering the most frequent training class (ties: the first label)."""
    job, sim = resolve_job({**rc, "dp": False})
    splits = [s.load_split(job.label_names) for s in simulated_sites(job, sim, out_dir)]
    train = np.concatenate([s.train_labels for s in splits])
    test = np.concatenate([s.test_labels for s in splits])
    label = int(np.bincount(train, minlength=len(job.label_names)).argmax())
    return {"label": job.label_names[label], "accuracy": float(np.mean(test == label)), "seed": job.seed,
            "test_rows": len(test)}


# --- the arms ---------------------------------------------------------------------------------------------------

def run_centralized(rc: dict[str, Any], out_dir: Path) -> ArmRun:
    """Non-private training on the pooled departments (`centralized_schedule`): the head alone on its cached
    inputs, then every trainable weight."""
    job, sim = resolve_job({**rc, "dp": False})
    schedule = centralized_schedule(_budget(rc, out_dir), job)
    labels = job.label_names
    splits = {s.name: s.load_split(labels) for s in simulated_sites(job, sim, out_dir)}
    built = build_model(job, len(labels))
    train = encode(built.tokenizer, [t for s in splits.values() for t in s.train_texts],
                   np.concatenate([s.train_labels for s in splits.values()]), job.max_length)
    start = time.perf_counter()
    if schedule["head_steps"]:
        head = head_module(built.model)
        train_head(head, head_inputs(built.model, head, train, device()), train.labels, job,
                   batch_size=schedule["head_batch"], steps=schedule["head_steps"], noise_multiplier=None,
                   dev=device(), seed=job.seed)
    if schedule["steps"]:
        train_round(built.model, train, job, batch_size=schedule["batch"], steps=schedule["steps"],
                    noise_multiplier=None, dev=device(), seed=job.seed)
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


def _arm_work(name: str, budget: dict[str, Any], job: JobConfig) -> tuple[int, dict[str, float], float]:
    """(fine-tuning steps, fine-tuning examples per department, head-phase examples) of one run of an arm."""
    if name == CENTRALIZED:
        schedule = centralized_schedule(budget, job)
        return schedule["steps"], {"pooled": float(schedule["examples"])}, float(schedule["head_examples"])
    return (int(budget["total_steps"]), {d: float(v["examples"]) for d, v in budget["departments"].items()},
            float(budget["head_examples"]))


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
    study.trials = [Trial(**t) for t in saved.get("trials", [])]
    study.config["epsilons"] = sorted({*saved["config"]["epsilons"], *epsilons})


def _tune(study: Study, rc: dict[str, Any], out_dir: Path, arms: Sequence[tuple[str, float | None]],
          on_arm: Callable[[Study], None] | None) -> None:
    """Run every grid point of every arm on the tuning data (base seed) that study.trials lacks, then choose each
    arm's point on validation accuracy alone. A one-point grid needs no tuning."""
    points = study.points()
    if len(points) == 1:
        study.chosen = {name: 0 for name, _ in arms}
        return
    tune_rc = tuning_data(rc, out_dir)
    for name, epsilon in arms:
        for i, point in enumerate(points):
            if study.trial(name, i) is not None:
                log.info("study: tuning %s at %s already done (resume)", name, _point_label(point))
                continue
            point_rc = {**tune_rc, **point}
            run = (run_centralized(point_rc, out_dir / TUNING_DIR) if name == CENTRALIZED
                   else run_federated(point_rc, out_dir / TUNING_DIR / f"{name}-p{i}", epsilon))
            log.info("study: tuning %s at %s: validation accuracy %.4f in %.0fs", name, _point_label(point),
                     run.global_accuracy, run.seconds)
            study.trials.append(Trial(name, i, point, run.global_accuracy, run.seconds))
            write_study(study, out_dir)
            if on_arm is not None:
                on_arm(study)
        study.chosen[name] = choose([t for t in study.trials if t.arm == name])
        log.info("study: %s chose %s", name, _point_label(points[study.chosen[name]]))


def run_study(rc: dict[str, Any], out_dir: Path, epsilons: Sequence[float] = DEFAULT_EPSILONS,
              on_arm: Callable[[Study], None] | None = None, per_department: int | None = None,
              resume: bool = False, repeats: int = 1,
              grid: Mapping[str, Sequence[float | int]] | None = None) -> Study:
    """Tune every arm (centralized, federated, then federated DP from the largest epsilon down) on the grid
    (default `DEFAULT_GRID_FACTORS`), then run each `repeats` times at its chosen point, seeds seed, seed+1, ...:
    first every arm once, then the second run of each, and so on.

    study.json, study.md and utility.png are rewritten after every run, tuning runs included, so an interrupted
    study leaves the runs it finished; `resume` runs only the runs that study.json lacks (same settings required;
    more repeats or other epsilons may be asked for, and the arms already there are kept).
    """
    _check_study_args(rc, epsilons, repeats)
    saved: dict[str, Any] | None = None
    if (out_dir / STUDY_JSON).exists():
        if not resume:
            raise ConfigError(f"{out_dir} already holds a study ({STUDY_JSON}); choose another --out or --resume.")
        saved = json.loads((out_dir / STUDY_JSON).read_text())
    job, _ = resolve_job({**rc, "dp": False})
    rc = {**rc, "sim-split-seed": job.seed}  # every repeat tests on the rows the base seed holds out
    declared = {k: list(v) for k, v in (default_grid(job) if grid is None else grid).items()}
    jobs = []
    for point in grid_points(declared):  # every point must make a valid job before anything runs
        try:
            jobs.append(resolve_job({**rc, **point, "dp": False})[0])
        except ConfigError as exc:
            raise ConfigError(f"--grid point {_point_label(point)}: {exc}") from exc
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
              "epsilons": sorted(epsilons), "grid": declared, "validation_fraction": VALIDATION_FRACTION,
              "overrides": rc}
    study = Study(config=config, budget=budget, machine=describe())
    if saved is not None:
        _restore(study, saved, epsilons, job.seed, out_dir)
    study.majority = majority_baseline(rc, out_dir)
    log.info("study: budget %s", budget)
    arms: list[tuple[str, float | None]] = [(CENTRALIZED, None), (FEDERATED, None)]
    arms += [(arm_name(e), e) for e in sorted(epsilons, reverse=True)]
    _tune(study, rc, out_dir, arms, on_arm)
    points = study.points()
    write_study(study, out_dir)
    for i in range(repeats):
        seed = job.seed + i
        for name, epsilon in arms:
            arm = study.arm(name)
            if arm is not None and seed in arm.seeds():
                log.info("study: %s seed %d already done (resume)", name, seed)
                continue
            chosen = study.chosen[name]
            seeded = {**rc, **points[chosen], "seed": seed}
            run_dir = out_dir / (name if i == 0 else f"{name}-seed{seed}")
            run = run_centralized(seeded, out_dir) if name == CENTRALIZED else run_federated(seeded, run_dir, epsilon)
            log.info("study: %s seed %d accuracy %.4f in %.0fs", name, seed, run.global_accuracy, run.seconds)
            if arm is None:
                point_rc = {**rc, **points[chosen]}
                steps, examples, head = _arm_work(name, _budget(point_rc, out_dir), jobs[chosen])
                arm = Arm(name, epsilon, steps, point=points[chosen], examples=examples, head_examples=head)
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


def _slug(data: str) -> str:
    name = data if data in ("hutto", SMALL_DATA) else Path(data).stem
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "data"


def section_name(data: str) -> str:
    """The docs section of a study on `data`: `study` for the Hutto corpora (as before), `study-<data>` otherwise,
    so the Hutto study and the small-department study live side by side."""
    return "study" if data == "hutto" else f"study-{_slug(data)}"


def plot_name(data: str) -> str:
    """The plot's file name beside the docs (one per study section)."""
    return UTILITY_PNG if data == "hutto" else f"utility-{_slug(data)}.png"


def _title(data: str) -> str:
    if data == "hutto":
        return "## Utility study"
    if data == SMALL_DATA:
        return f"## Utility study: small departments ({SMALL_DATA})"
    return f"## Utility study: {Path(data).name}"


def _budget_text(study: Study) -> str:
    b = study.budget
    if "departments" not in b:  # a study.json written before budgets were counted in examples
        return (f"Compute budget (every arm): {b['rounds']} round(s) x {b['local_epochs']:g} local epoch of each "
                f"department's training data, expected batch {b['batch_size']} = {b['total_steps']} gradient "
                f"steps in all (per department per round: "
                f"{', '.join(f'{k} {v}' for k, v in b['steps_per_round'].items())}); the centralized arm takes the "
                "same number of steps on the pooled data. ")
    per_dept = ", ".join(f"{k} {v['examples']:.0f}" for k, v in b["departments"].items())
    return (f"Compute budget, in examples processed per run: {b['rounds']} round(s), {b['probe_rounds']} of them "
            f"head-only ({b['probe_epochs']:g} epochs of each department's training rows, on the frozen model's "
            f"cached head inputs), then {b['finetune_rounds']} fine-tuning round(s) of {b['local_epochs']:g} epoch "
            f"(within min/max local steps); fine-tuning examples per department at the configured batch "
            f"{b['batch_size']}: {per_dept} ({b['examples']:.0f} in all). The centralized arm trains its head "
            "alone (non-private) for the same epochs of the pooled rows, then fine-tunes on as many examples as "
            "the federated arms at all departments together, with its own batch. ")


def _tuning_lines(study: Study) -> list[str]:
    points = study.points()
    grid = study.config.get("grid")
    if grid is None:
        return []
    declared = "; ".join(f"{k} {', '.join(f'{v:g}' for v in values)}" for k, values in grid.items())
    seed = study.majority.get("seed", study.config.get("overrides", {}).get("seed", 0))
    lines = [f"Tuning: a grid declared before any run ({declared}: {len(points)} point(s)), the same points for "
             "every arm. "
             + (f"Each arm ran every point once (seed {seed}) on its departments' training rows only, split again "
                f"{1 - study.config['validation_fraction']:g}/{study.config['validation_fraction']:g} into train "
                "and validation (the test rows never enter tuning), and keeps the point with the best global "
                "validation accuracy (ties: the first declared); the runs below use that point and report test "
                "accuracy. The tuning runs' own privacy cost is not included in the epsilons below."
                if len(points) > 1 else "One point: no tuning."), ""]
    if len(points) > 1:
        arms = list(dict.fromkeys(t.arm for t in study.trials))
        lines += ["| arm | " + " | ".join(_point_label(p) for p in points) + " | chosen |",
                  "|---|" + "---|" * len(points) + "---|"]
        for name in arms:
            cells = []
            for i in range(len(points)):
                t = study.trial(name, i)
                cell = "" if t is None else f"{t.validation_accuracy:.4f}"
                cells.append(f"**{cell}**" if t is not None and study.chosen.get(name) == i else cell)
            chosen = study.chosen.get(name)
            lines.append(f"| {name} | " + " | ".join(cells) + " | "
                         + ("" if chosen is None else _point_label(points[chosen])) + " |")
        lines += ["", "Validation accuracy of each tuning run (bold: the chosen point).", ""]
    return lines


def study_markdown(study: Study, plot: str | None = UTILITY_PNG) -> str:
    b = study.budget
    data = str(study.config["data"])
    depts = sorted({d for a in study.arms for d in a.departments})
    lines = [
        _title(data),
        "",
        f"Machine: {machine_line(study.machine)}.",
        "",
        _budget_text(study)
        + (f"Data: {data}, at most {b['per_department']} rows per department (seeded sample, "
           f"split {1 - study.config['test_fraction']:g}/{study.config['test_fraction']:g} train/test). "
           if b.get("per_department") else f"Data: {data}. ") +
        f"Model {study.config['model']} ({study.config['finetune']}, r={study.config['lora_r']}), "
        f"{study.config['optimizer']} lr {study.config['learning_rate']:g}, clip {study.config['clip_norm']:g}, "
        f"delta {study.config['delta']:g}, SecAgg+ {'on' if study.config['secagg'] else 'off'}. Accuracy on the "
        "union of the departments' held-out splits, and on each department's own split.",
        "",
        *_tuning_lines(study),
        "Every figure is the median over an arm's runs (seeds "
        + (", ".join(str(s) for s in study.seeds()) or "none yet")
        + (": initialisation and batch order; every run tests on the same rows, the base seed's split"
           if "sim-split-seed" in study.config.get("overrides", {}) else "")
        + "; DP noise is drawn from the OS's entropy pool, so DP runs differ even with one seed); range = lowest "
        "and highest global accuracy of the runs; examples = fine-tuning examples per run, all departments "
        "together.",
        "",
        "| arm | epsilon per site | runs (seeds) | global accuracy | range | " + " | ".join(depts) +
        " | examples | setting | minutes per run |",
        "|---|---|---|---|---|" + "---|" * len(depts) + "---|---|---|",
    ]
    for a in study.arms:
        eps = "none (non-private)" if a.epsilon is None else f"{a.epsilon:g}"
        cells = " | ".join(f"{a.departments[d]:.4f}" if d in a.departments else "" for d in depts)
        low, high = a.accuracy_range()
        seeds = ", ".join(str(x) for x in a.seeds())
        examples = f"{sum(a.examples.values()):.0f}" if a.examples else ""
        lines.append(f"| {a.name} | {eps} | {len(a.runs)} ({seeds}) | {a.global_accuracy:.4f} | "
                     f"{low:.4f}-{high:.4f} | {cells} | {examples} | {_point_label(a.point)} | "
                     f"{a.seconds / 60:.1f} |")
    if study.majority:
        lines += ["", f"Majority class ({study.majority['label']}, the most frequent training label; seed "
                      f"{study.majority['seed']}): {study.majority['accuracy']:.4f} of the global test."]
    goals = study.goals()
    if goals:
        lines.append("")
    for epsilon in (8, 3, 1):
        key = f"dp_eps{epsilon}_gap_points"
        if key in goals:
            lines.append(_gap_line(f"Federated DP at epsilon={epsilon}", "federated non-private", goals[key]))
    if "federated_gap_points" in goals:
        lines.append(_gap_line("Federated non-private", "centralized", goals["federated_gap_points"]))
    if "dp_eps8_above_majority_points" in goals:
        g = goals["dp_eps8_above_majority_points"]
        side = f"{g['value']:.2f} points above" if g["value"] >= 0 else f"{-g['value']:.2f} points below"
        verdict = "no goal: reported" if g["goal"] is None else (
            f"goal: at least {g['goal']:g} above: {'met' if g['met'] else 'missed'}")
        lines.append(f"- Federated DP at epsilon=8 ({g['runs']}) is {side} the majority class ({verdict}).")
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
    if ax.get_legend_handles_labels()[0]:  # nothing to label before the first run
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
                           for a in saved["arms"]],
                     trials=[Trial(**t) for t in saved.get("trials", [])],
                     chosen={a: int(c["point"]) for a, c in saved.get("chosen", {}).items()},
                     majority=dict(saved.get("majority", {})))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{path} is not a study written by fedsilo: {exc}") from exc


def run_study_command(rc: dict[str, Any], out_dir: Path, epsilons: Sequence[float], docs: Path | None,
                      per_department: int | None = None, resume: bool = False, render: bool = False,
                      repeats: int = 1, grid: Mapping[str, Sequence[float | int]] | None = None) -> str:
    """`fedsilo study utility`: run (or, with `render`, only re-render what out_dir holds), optionally rewrite the
    docs section of the study's data (`section_name`); returns the markdown table."""
    if render:
        study = load_study(out_dir)
        write_study(study, out_dir)
    else:
        study = run_study(rc, out_dir, epsilons, per_department=per_department, resume=resume, repeats=repeats,
                          grid=grid)
    if docs is not None:
        from simulations.docs import update_section

        data = str(study.config["data"])
        plot_study(study, docs.parent / plot_name(data))
        update_section(docs, section_name(data), study_markdown(study, plot=plot_name(data)))
    return study_markdown(study, plot=None)
