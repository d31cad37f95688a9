"""`fedsilo bench`: what DP, SecAgg+, communication and the framework cost, measured side by side on this machine.

Parts (each figure a median over repeats, the variants interleaved so that load on a shared machine hits them alike):
- dp: one DP-SGD step per Opacus mode vs one non-private step (time, peak memory; `simulations.stepcost`),
  plus a check that the modes give the same clipped sum and noise;
- secagg: simulated round time with vs without SecAgg+ (default model, LoRA, a few local steps), 4 and 10
  departments; the departments' own training times give the ratio excluding training and the framework overhead;
- overhead: framework overhead, (fit-round wall time - slowest department's training time) / wall time, with DP and
  SecAgg+ (2 departments, one per core), for a small department and one of the Hutto departments' size: the
  overhead is about fixed per round, so its fraction depends on how much a department trains;
- comm: bytes a department sends per round (its update, serialised as Flower serialises it; under SecAgg+ the
  masked, quantised vector built with Flower's own functions), LoRA vs full fine-tuning;
- scale: 100 departments with tiny-random in one simulation: seconds and peak memory (whole process tree) per round;
  with a Ray address, on that Ray cluster (the memory is then this machine's process tree only);
- deploy (only with --only deploy: it starts real processes): a TLS SuperLink with node authentication and one
  SuperNode per department on 127.0.0.1, started as an operator starts them (`simulations.localdeploy`), jobs
  with and without SecAgg+ in ABBA order: round seconds, and the seconds of one message exchange (the federated
  evaluation: one evaluate message to every site, each served through the site's gate).
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from client.plan import finetune_work
from client.site import SiteConfig
from common.config import JobConfig
from common.data import DEPARTMENT, LABEL, TEXT, load_hutto
from common.errors import ConfigError, FedsiloError
from common.files import write_atomic
from common.memory import PeakSampler
from common.memory import tree_pss_bytes as tree_memory
from common.model import build_model
from common.params import get_trainable
from common.settings import Settings, option
from simulations.machine import describe, machine_line
from simulations.run import queue_poll_seconds, simulate
from simulations.stepcost import DP_MODES, NON_PRIVATE, StepSetup, check_modes, measure, memory_method

log = logging.getLogger(__name__)

BENCH_JSON = "bench.json"
BENCH_MD = "bench.md"
PARTS = ("dp", "secagg", "overhead", "comm", "scale")  # what a bench measures unless told --only
OPT_IN_PARTS = ("deploy",)  # measured only when named with --only
ALL_PARTS = (*PARTS, *OPT_IN_PARTS)
MEMORY_INTERVAL_SECONDS = 0.5
LABELS = "negative,positive"
GOALS = {"dp_time": 1.3, "dp_memory": 1.2, "secagg": 1.2, "comm": 0.02, "overhead": 0.05}


class BenchError(FedsiloError):
    """A benchmark measurement failed (the message says which and why)."""


@dataclass(frozen=True, kw_only=True)
class SimSetup(Settings):
    """One benchmark simulation's sizes (the other run-config keys keep their defaults)."""

    label: ClassVar[str] = "Bench simulation setting"

    model: str = option(help="model (the run-config key model)", nonempty=True)
    departments: int = option(help="simulated departments", ge=1)
    rows: int = option(help="rows per department (80% train)", ge=1)
    rounds: int = option(help="federated rounds; round 1 (actor start-up) is reported but left out of the medians",
                         ge=1)
    batch: int = option(help="expected batch size (batch-size)", gt=0)
    local_epochs: float = option(help="fraction of a department's data visited per round (local-epochs)", gt=0)
    max_length: int = option(help="tokens per text (max-length)", gt=0, le=512)


@dataclass(frozen=True, kw_only=True)
class DeploySetup(Settings):
    """The deploy part's sizes: a real deployment on loopback."""

    label: ClassVar[str] = "Bench deployment setting"

    model: str = option(help="model (the run-config key model)", nonempty=True)
    departments: int = option(help="departments, one SuperNode each", ge=2)
    rows: int = option(help="rows per department (80% train)", ge=1)
    rounds: int = option(help="rounds per job; round 1 (the probe round) is left out of the medians", ge=2)
    runs: int = option(help="jobs per variant, in ABBA order (plain, SecAgg+, SecAgg+, plain, ...)", ge=1)
    batch: int = option(help="expected batch size (batch-size)", gt=0)
    local_epochs: float = option(help="fraction of a department's data visited per round (local-epochs)", gt=0)
    max_length: int = option(help="tokens per text (max-length)", gt=0, le=512)


@dataclass(frozen=True)
class BenchSetup:
    step: StepSetup
    repeats: int
    secagg: tuple[SimSetup, ...]
    secagg_runs: int  # simulations per variant and department count, in ABBA order (plain, SecAgg+, SecAgg+, plain)
    overhead: tuple[SimSetup, ...]
    scale: SimSetup
    comm_model: str
    deploy: DeploySetup


FULL = BenchSetup(
    step=StepSetup(model="minilm", finetune="lora", batch=64, seq_len=64, steps=5, warmup=1),
    repeats=5,
    secagg=tuple(SimSetup(model="minilm", departments=n, rows=100, rounds=4, batch=16, local_epochs=0.4,
                          max_length=64) for n in (4, 10)),
    secagg_runs=2,
    overhead=tuple(SimSetup(model="minilm", departments=2, rows=rows, rounds=3, batch=64, local_epochs=0.25,
                            max_length=64) for rows in (1500, 3700)),
    scale=SimSetup(model="tiny-random", departments=100, rows=40, rounds=3, batch=8, local_epochs=0.5,
                   max_length=32),
    comm_model="minilm",
    deploy=DeploySetup(model="tiny-random", departments=2, rows=60, rounds=4, runs=2, batch=8, local_epochs=0.5,
                       max_length=16),
)
_QUICK_SIM = SimSetup(model="tiny-random", departments=2, rows=30, rounds=2, batch=8, local_epochs=0.5,
                      max_length=16)
QUICK = BenchSetup(
    step=StepSetup(model="tiny-random", finetune="lora", batch=8, seq_len=16, steps=2, warmup=1),
    repeats=2,
    secagg=(replace(_QUICK_SIM, departments=3),),
    secagg_runs=1,
    overhead=(_QUICK_SIM,),
    scale=replace(_QUICK_SIM, departments=4),
    comm_model="tiny-random",
    deploy=DeploySetup(model="tiny-random", departments=2, rows=60, rounds=2, runs=1, batch=8, local_epochs=0.5,
                       max_length=16),
)


def _median(values: Sequence[float]) -> float | None:
    return float(statistics.median(values)) if values else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


# ---------------------------------------------------------------- dp step cost


def bench_dp(setup: BenchSetup, default_mode: str) -> dict[str, Any]:
    runs = measure(replace(setup.step, steps=setup.repeats))  # rounds of interleaved steps are the repeats
    variants: dict[str, Any] = {v: {"repeats": results} for v, results in runs.items()}
    dp = {"setup": asdict(replace(setup.step, steps=setup.repeats)), "memory_method": memory_method(),
          "variants": variants, "equivalence": check_modes(setup.step), "default_mode": default_mode}
    return summarize_dp(dp)


def summarize_dp(dp: dict[str, Any]) -> dict[str, Any]:
    """Medians and ratios from the raw repeats. A ratio is the median over repeats of (variant / non-private in the
    same repeat): load that drifts between repeats on a shared machine cancels within each repeat."""
    base = dp["variants"][NON_PRIVATE]["repeats"]
    for v in dp["variants"].values():
        reps = v["repeats"]
        v["step_seconds"] = _median([x["step_seconds"] for x in reps])
        v["peak_bytes"] = _median([x["peak_bytes"] for x in reps])
        v["time_ratio"] = _median([x["step_seconds"] / b["step_seconds"] for x, b in zip(reps, base, strict=True)])
        v["memory_ratio"] = _median([x["peak_bytes"] / b["peak_bytes"] for x, b in zip(reps, base, strict=True)
                                     if b["peak_bytes"]])
        v["time_ratio_per_repeat"] = [x["step_seconds"] / b["step_seconds"] for x, b in zip(reps, base, strict=True)]
    dp["fastest_mode"] = min(DP_MODES, key=lambda m: dp["variants"][m]["time_ratio"] or float("inf"))
    return dp


# ---------------------------------------------------------------- simulations


def department_data(path: Path, departments: int, rows: int, seed: int = 0) -> Path:
    """`departments` departments of `rows` Hutto rows each (shuffled, dealt round-robin) as a CSV."""
    frame = load_hutto().sample(frac=1.0, random_state=seed).reset_index(drop=True)
    need = departments * rows
    if need > len(frame):
        raise ConfigError(f"{departments} departments x {rows} rows need {need} rows; Hutto has {len(frame)}.")
    frame = frame.iloc[:need].copy()
    frame[DEPARTMENT] = [f"dept{i % departments:03d}" for i in range(need)]
    write_atomic(path, frame[[TEXT, LABEL, DEPARTMENT]].to_csv(index=False).encode())
    return path


def _sim_config(sim: SimSetup, data: Path, secagg: bool) -> dict[str, bool | int | float | str]:
    return {"model": sim.model, "num-server-rounds": sim.rounds, "batch-size": sim.batch,
            "local-epochs": sim.local_epochs, "max-length": sim.max_length, "secagg": secagg,
            "sim-data": str(data), "sim-global-eval": False}


def run_sim(sim: SimSetup, secagg: bool, work: Path, tag: str, memory: bool = False,
            ray_address: str | None = None) -> dict[str, Any]:
    """One simulation (on the Ray cluster at `ray_address`, if given); per round: fit seconds, the departments'
    training seconds, peak tree memory."""
    data = department_data(work / f"data-{sim.departments}x{sim.rows}.csv", sim.departments, sim.rows)
    out = work / tag
    peaks: list[int] = []
    start = time.perf_counter()
    with PeakSampler(tree_memory, MEMORY_INTERVAL_SECONDS) if memory else _NoSampler() as sampler:
        base = tree_memory() if memory else 0

        def on_round(_: Any) -> None:
            if memory:
                peaks.append(sampler.take_peak())

        try:
            report = simulate(_sim_config(sim, data, secagg), out, on_round=on_round, ray_address=ray_address)
        except RuntimeError as exc:  # Flower's simulation runtime crashed (e.g. Ray's node did not start in time)
            raise BenchError(f"simulation {tag} failed: {exc} ({exc.__cause__})") from exc
    seconds = time.perf_counter() - start
    rounds = []
    for i, r in enumerate(report["rounds"]):
        train = [d["train_seconds"] for d in r["departments"].values() if d.get("train_seconds") is not None]
        rounds.append({"round": r["round"], "fit_seconds": r["fit_seconds"], "round_seconds": r["seconds"],
                       "train_seconds_max": max(train) if train else None,
                       "train_seconds_sum": sum(train) if train else None, "trained": len(train),
                       "peak_bytes": peaks[i] if i < len(peaks) else None})
    return {"departments": sim.departments, "secagg": secagg, "total_seconds": seconds, "rounds": rounds,
            "baseline_bytes": base if memory else None}


class _NoSampler:
    def __enter__(self) -> _NoSampler:
        return self

    def __exit__(self, *_: object) -> None:
        return None

    def take_peak(self) -> int:
        return 0


def _steady(rounds: list[dict[str, Any]], key: str) -> float | None:
    """Median of `key` over rounds 2.. (round 1 pays Ray's actor start-up)."""
    values = [r[key] for r in rounds[1:] if r.get(key) is not None] or [r[key] for r in rounds if r.get(key)]
    return _median(values)


def _overhead(rounds: list[dict[str, Any]]) -> float | None:
    values = [(r["fit_seconds"] - r["train_seconds_max"]) / r["fit_seconds"] for r in rounds[1:]
              if r.get("train_seconds_max") is not None and r["fit_seconds"] > 0]
    return _median(values)


def bench_secagg(setup: BenchSetup, work: Path) -> dict[str, Any]:
    runs: dict[tuple[int, bool], list[dict[str, Any]]] = {}
    for sim in setup.secagg:  # rounds 2.. of each run are the repeats
        for secagg in secagg_order(setup.secagg_runs):
            done = len(runs.get((sim.departments, secagg), []))
            tag = f"secagg-{sim.departments}-{'on' if secagg else 'off'}" + (f"-{done + 1}" if done else "")
            res = run_sim(sim, secagg, work, tag)
            log.info("bench secagg: %s: fit rounds %s", tag, [x["fit_seconds"] for x in res["rounds"]])
            runs.setdefault((sim.departments, secagg), []).append(res)
    out = []
    for sim in setup.secagg:
        row: dict[str, Any] = {"departments": sim.departments, "setup": asdict(sim)}
        for secagg in (False, True):
            rounds = [x for res in runs[(sim.departments, secagg)] for x in res["rounds"][1:]]
            fit = _median([x["fit_seconds"] for x in rounds])
            nontrain = _median([x["fit_seconds"] - x["train_seconds_max"] for x in rounds
                                if x["train_seconds_max"] is not None])
            row["on" if secagg else "off"] = {"fit_seconds": fit, "non_training_seconds": nontrain,
                                              "train_seconds_max": _median([x["train_seconds_max"] for x in rounds
                                                                            if x["train_seconds_max"]]),
                                              "overhead_fraction": _median(
                                                  [(x["fit_seconds"] - x["train_seconds_max"]) / x["fit_seconds"]
                                                   for x in rounds if x["train_seconds_max"] is not None]),
                                              "runs": runs[(sim.departments, secagg)]}
        row["ratio"] = _ratio(row["on"]["fit_seconds"], row["off"]["fit_seconds"])
        row["ratio_excluding_training"] = _ratio(row["on"]["non_training_seconds"],
                                                 row["off"]["non_training_seconds"])
        out.append(row)
    return {"rows": out, "runs_per_variant": setup.secagg_runs,
            "repeats": setup.secagg_runs * (min(s.rounds for s in setup.secagg) - 1)}


def secagg_order(runs: int) -> list[bool]:
    """Plain (False) and SecAgg+ (True) simulations in ABBA order: load drifting linearly over the part hits both
    variants alike."""
    return [secagg for k in range(runs) for secagg in ((False, True) if k % 2 == 0 else (True, False))]


def bench_overhead(setup: BenchSetup, work: Path) -> dict[str, Any]:
    rows = []
    for sim in setup.overhead:
        res = run_sim(sim, True, work, f"overhead-{sim.rows}")
        rows.append({"setup": asdict(sim), "overhead_fraction": _overhead(res["rounds"]),
                     "fit_seconds": _steady(res["rounds"], "fit_seconds"),
                     "train_seconds_max": _steady(res["rounds"], "train_seconds_max"), "run": res})
    return {"rows": rows, "repeats": min(s.rounds for s in setup.overhead) - 1,
            "queue_poll_seconds": queue_poll_seconds(max(s.departments for s in setup.overhead))}


def bench_scale(setup: BenchSetup, work: Path, ray_address: str | None = None) -> dict[str, Any]:
    res = run_sim(setup.scale, True, work, "scale", memory=True, ray_address=ray_address)
    peaks = [r["peak_bytes"] for r in res["rounds"] if r["peak_bytes"] is not None]
    growth = (peaks[-1] - peaks[1]) / peaks[1] if len(peaks) >= 3 else None
    return {"setup": asdict(setup.scale), "repeats": setup.scale.rounds - 1,
            "seconds_per_round": _steady(res["rounds"], "round_seconds"),
            "fit_seconds_per_round": _steady(res["rounds"], "fit_seconds"), "peak_bytes_per_round": peaks,
            "memory_growth_round2_to_last": growth, "ray_address": ray_address, "run": res}


# ---------------------------------------------------------------- a real deployment on loopback

DEPLOY_SITE_EPSILON = 1000.0  # jobs follow one another at the same sites: each may spend at most
DEPLOY_JOB_EPSILON = 4.0  # this (policy max_epsilon_per_job), so that the later jobs do not run out of budget
# message exchanges per round, each site's reply served through its gate: fit (SecAgg+: setup, share keys,
# masked vectors, unmask) and evaluation
DEPLOY_EXCHANGES = {False: 2, True: 5}


def _deploy_args(d: DeploySetup, secagg: bool) -> list[str]:
    args = ["--rounds", str(d.rounds), "--model", d.model, "-c", f"batch-size={d.batch}", "-c",
            f"local-epochs={d.local_epochs}", "-c", f"max-length={d.max_length}", "-c",
            f"secagg-max-weight={float(max(100, d.rows))}"]
    return args if secagg else [*args, "--no-secagg"]


def _deploy_rounds(report: dict[str, Any], tag: str) -> list[dict[str, Any]]:
    """Per round of a deployed job: round, fit and evaluation seconds, the slowest department's training time;
    `BenchError` unless every department trained and the aggregate was applied in every round."""
    rounds = []
    for r in report["rounds"]:
        statuses = {name: d["status"] for name, d in r["departments"].items()}
        if r["aggregate"] != "applied" or any(s != "trained" for s in statuses.values()):
            raise BenchError(f"deployed job {tag}: round {r['round']}: aggregate {r['aggregate']}, departments "
                             f"{statuses}, errors {r['errors']}")
        train = [d["train_seconds"] for d in r["departments"].values() if d.get("train_seconds") is not None]
        rounds.append({"round": r["round"], "round_seconds": r["seconds"], "fit_seconds": r["fit_seconds"],
                       "evaluate_seconds": r["seconds"] - r["fit_seconds"],
                       "train_seconds_max": max(train) if train else None})
    return rounds


def bench_deploy(setup: BenchSetup, work: Path) -> dict[str, Any]:
    from client.compat import FIRST_IDLE_POLL_SECONDS
    from simulations.localdeploy import APPROVE_INSTALLED, LocalDeployment, local_deployment, shared_threads

    d = setup.deploy
    frame = load_hutto().sample(frac=1.0, random_state=0).reset_index(drop=True)
    if d.departments * d.rows > len(frame):
        raise ConfigError(f"{d.departments} departments x {d.rows} rows: Hutto has {len(frame)} rows.")
    data: dict[str, Path] = {}
    for i in range(d.departments):
        data[f"dept{i:03d}"] = work / f"deploy-dept{i:03d}.csv"
        rows = frame.iloc[i * d.rows:(i + 1) * d.rows]
        write_atomic(data[f"dept{i:03d}"], rows[[TEXT, LABEL]].to_csv(index=False).encode())
    policy = f"{APPROVE_INSTALLED}\nmax_epsilon_per_job = {DEPLOY_JOB_EPSILON}"

    def jobs(deployment: LocalDeployment, warm: bool, order: list[bool]) -> dict[bool, list[dict[str, Any]]]:
        runs: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
        kind = "warm" if warm else "cold"
        for secagg in order:
            tag = f"deploy-{kind}-{'on' if secagg else 'off'}-{len(runs[secagg]) + 1}"
            start = time.perf_counter()
            report = deployment.run_job(work / tag, LABELS, _deploy_args(d, secagg))
            rounds = _deploy_rounds(report, tag)
            log.info("bench deploy: %s: rounds %s s", tag, [x["round_seconds"] for x in rounds])
            runs[secagg].append({"secagg": secagg, "job_seconds": time.perf_counter() - start, "rounds": rounds})
        return runs

    # the sites allow plain jobs (require_secagg = false): the part compares rounds with and without SecAgg+
    with local_deployment(work / "deploy", data, policy=policy, epsilon=DEPLOY_SITE_EPSILON, require_secagg=False,
                          warm_worker=True) as deployment:
        runs = jobs(deployment, True, secagg_order(d.runs))
        # then the same plain jobs with a fresh process per message: what the warm worker saves (the sites switch
        # it off in their configs, which they read with every message)
        deployment.set_site_option("warm_worker", "false")
        cold = [x for run in jobs(deployment, False, [False] * d.runs)[False] for x in run["rounds"][1:]]
    steady = {secagg: [x for run in runs[secagg] for x in run["rounds"][1:]] for secagg in (False, True)}

    def median(secagg: bool, key: str) -> float | None:
        return _median([x[key] for x in steady[secagg] if x[key] is not None])

    out: dict[str, Any] = {"setup": asdict(d), "repeats": d.runs * (d.rounds - 1), "warm_worker": True,
                           "gate_in_executor": True, "threads_per_site": shared_threads(d.departments),
                           "poll_seconds": SiteConfig.__dataclass_fields__["poll_seconds"].default,
                           "first_idle_poll_seconds": FIRST_IDLE_POLL_SECONDS,
                           "runs": {"plain": runs[False], "secagg": runs[True]},
                           "exchanges_per_round": {"plain": DEPLOY_EXCHANGES[False], "secagg": DEPLOY_EXCHANGES[True]}}
    for name, secagg in (("plain", False), ("secagg", True)):
        for key in ("round_seconds", "fit_seconds", "evaluate_seconds", "train_seconds_max"):
            out[f"{name}_{key}"] = median(secagg, key)
    out["ratio"] = _ratio(out["secagg_round_seconds"], out["plain_round_seconds"])
    # one exchange = one message to every site and their replies: the evaluation is one, in either variant
    out["exchange_seconds"] = _median([x["evaluate_seconds"] for x in steady[False] + steady[True]])
    extra = DEPLOY_EXCHANGES[True] - DEPLOY_EXCHANGES[False]
    if out["secagg_fit_seconds"] is not None and out["plain_fit_seconds"] is not None:
        out["secagg_stage_seconds"] = (out["secagg_fit_seconds"] - out["plain_fit_seconds"]) / extra
    else:
        out["secagg_stage_seconds"] = None
    out["cold"] = {"warm_worker": False, "same_deployment": True,
                   "round_seconds": _median([x["round_seconds"] for x in cold]),
                   "fit_seconds": _median([x["fit_seconds"] for x in cold]),
                   "evaluate_seconds": _median([x["evaluate_seconds"] for x in cold])}
    out["warm_speedup"] = _ratio(out["cold"]["round_seconds"], out["plain_round_seconds"])
    return out


# ---------------------------------------------------------------- communication


def _update_bytes(arrays: list[np.ndarray], secagg: bool, n_examples: int, job: JobConfig) -> int:
    """Bytes of a department's update as it leaves the site: Flower's ndarray serialisation; under SecAgg+ the
    masked vector built by Flower's own quantisation and masking functions (as `secaggplus_mod` does)."""
    from flwr.common import ndarray_to_bytes

    from common.compat import (
        factor_combine,
        parameters_addition,
        parameters_mod,
        parameters_multiply,
        pseudo_rand_gen,
        quantize,
    )
    from server.secagg import SECAGG_MODULUS

    if not secagg:
        return sum(len(ndarray_to_bytes(a)) for a in arrays)
    q_ratio = round(n_examples / job.secagg_max_weight * job.secagg_quantization_range)
    scaled = parameters_multiply(arrays, q_ratio / job.secagg_quantization_range)
    quantized = factor_combine(q_ratio, quantize(scaled, job.secagg_clipping_range, job.secagg_quantization_range))
    mask = pseudo_rand_gen(os.urandom(32), SECAGG_MODULUS, [a.shape for a in quantized])
    masked = parameters_mod(parameters_addition(quantized, mask), SECAGG_MODULUS)
    return sum(len(ndarray_to_bytes(a)) for a in masked)


def bench_comm(setup: BenchSetup) -> dict[str, Any]:
    out: dict[str, Any] = {"model": setup.comm_model, "repeats": 1}  # deterministic sizes
    for finetune in ("lora", "full"):
        job = JobConfig(model=setup.comm_model, finetune=finetune, labels=LABELS)
        arrays = [np.zeros_like(a) for a in get_trainable(build_model(job, 2).model)]
        params = sum(a.size for a in arrays)
        out[finetune] = {"parameters": int(params), "bytes_plain": _update_bytes(arrays, False, 1000, job),
                         "bytes_secagg": _update_bytes(arrays, True, 1000, job)}
    out["ratio_plain"] = out["lora"]["bytes_plain"] / out["full"]["bytes_plain"]
    out["ratio_secagg"] = out["lora"]["bytes_secagg"] / out["full"]["bytes_secagg"]
    return out


# ---------------------------------------------------------------- driver and report


def run_bench(out: Path, *, quick: bool = False, repeats: int | None = None,
              only: Sequence[str] = (), secagg_departments: Sequence[int] = (),
              ray_address: str | None = None) -> dict[str, Any]:
    """`ray_address`: run the scale part on that Ray cluster (the other parts measure this machine: refused)."""
    unknown = sorted(set(only) - set(ALL_PARTS))
    if unknown:
        raise ConfigError(f"Unknown bench part(s) {unknown}; choose from {', '.join(ALL_PARTS)}.")
    if ray_address is not None and set(only) != {"scale"}:
        raise ConfigError("--ray-address runs the scale part on a Ray cluster; the other parts measure this "
                          "machine: give --only scale.")
    if repeats is not None and repeats < 1:
        raise ConfigError(f"--repeats must be at least 1, got {repeats}.")
    previous: dict[str, Any] | None = None
    if (out / BENCH_JSON).exists():
        if not only:
            raise ConfigError(f"{out} already holds a bench ({BENCH_JSON}); choose another --out, or name the parts "
                              "to (re)measure with --only.")
        previous = json.loads((out / BENCH_JSON).read_text())
        if previous.get("quick") != quick:
            raise ConfigError(f"{out} holds a {'quick' if previous.get('quick') else 'full'} bench; do not mix.")
    setup = QUICK if quick else FULL
    if repeats is not None:
        setup = replace(setup, repeats=repeats)
    if secagg_departments:
        if any(n < 2 for n in secagg_departments):
            raise ConfigError("SecAgg+ needs at least 2 departments per simulation.")
        chosen = tuple(replace(setup.secagg[0], departments=n) for n in secagg_departments)
        setup = replace(setup, secagg=chosen)
    parts = [p for p in ALL_PARTS if p in only] if only else list(PARTS)
    # simulations of this invocation only: remeasuring a part later must not meet the runs it left last time
    (out / "work").mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%dT%H%M%S-", time.gmtime()), dir=out / "work"))
    default_mode = JobConfig().grad_sample_mode
    result: dict[str, Any] = previous or {"quick": quick, "repeats": setup.repeats, "machine": describe(),
                                          "goals": GOALS}
    result["parts"] = [p for p in ALL_PARTS if p in result or p in parts]
    steps = {"dp": lambda: bench_dp(setup, default_mode), "secagg": lambda: bench_secagg(setup, work),
             "overhead": lambda: bench_overhead(setup, work), "comm": lambda: bench_comm(setup),
             "scale": lambda: bench_scale(setup, work, ray_address), "deploy": lambda: bench_deploy(setup, work)}
    if "dp" in result:  # summaries are derived from the raw repeats, also for a dp part measured earlier
        result["dp"] = summarize_dp(result["dp"])
    for part in parts:
        start = time.perf_counter()
        log.info("bench: %s ...", part)
        load_before = describe()["load_average"]
        result[part] = steps[part]()
        result[part].setdefault("repeats", setup.repeats)
        result[part].update({"bench_seconds": time.perf_counter() - start,
                             "load_average": [load_before, describe()["load_average"]],
                             "measured_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        write_bench(result, out)  # after every part: an interrupted bench keeps what it measured
    return result


def write_bench(result: dict[str, Any], out: Path) -> None:
    write_atomic(out / BENCH_JSON, json.dumps(result, indent=2, allow_nan=False).encode())
    write_atomic(out / BENCH_MD, bench_markdown(result).encode())


def _f(value: float | None, fmt: str = ".2f") -> str:
    return "n/a" if value is None else format(value, fmt)


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.1f} MiB"


def _goal(value: float | None, goal: float) -> str:
    return "n/a" if value is None else ("met" if value <= goal else "missed")


def _measured(part: dict[str, Any]) -> str:
    before, after = part["load_average"]
    return (f"Measured {part['measured_utc']}, {part['repeats']} repeat(s), {part['bench_seconds'] / 60:.1f} min, "
            f"load average {before} before, {after} after.")


def _dp_markdown(dp: dict[str, Any], when: str) -> list[str]:
    lines: list[str] = []
    s = dp["setup"]
    lines += ["", "### DP-SGD step cost", "", when, "",
              f"Model {s['model']} ({s['finetune']}), batch {s['batch']}, sequence length {s['seq_len']}, Adam; "
              f"every variant built side by side in one process, {s['warmup']} warm-up step(s) and one "
              f"memory-profiled step each, then {s['steps']} rounds of one timed step per variant (round-robin); "
              "ratios are medians over rounds of the per-round ratio. Peak memory: "
              f"{dp['memory_method']} (peak bytes one step allocates above what was allocated before it).", "",
              "| variant | s/step | x non-private (per round) | peak memory added | x non-private |",
              "|---|---|---|---|---|"]
    for name, v in dp["variants"].items():
        mark = " (default)" if name == dp["default_mode"] else ""
        per = ", ".join(f"{x:.2f}" for x in v.get("time_ratio_per_repeat", []))
        lines.append(f"| {name}{mark} | {_f(v['step_seconds'], '.3f')} | {_f(v['time_ratio'])} ({per}) | "
                     f"{_mib(v['peak_bytes'])} | {_f(v['memory_ratio'])} |")
    d = dp["variants"][dp["default_mode"]]
    lines += ["", f"Default mode `{dp['default_mode']}`: {_f(d['time_ratio'])}x time (goal <= "
                  f"{GOALS['dp_time']}: {_goal(d['time_ratio'], GOALS['dp_time'])}), {_f(d['memory_ratio'])}x "
                  f"peak memory (goal <= {GOALS['dp_memory']}: {_goal(d['memory_ratio'], GOALS['dp_memory'])}). "
                  f"Fastest DP mode here: `{dp['fastest_mode']}`."]
    eq = dp["equivalence"]
    lines += ["", f"Same clipped, noised gradient across modes (one batch, clip norm {eq['clip_norm']:.4g} = "
                  f"median per-sample norm, {eq['clipped_fraction']:.0%} of examples clipped; noise multiplier "
                  f"{eq['noise_multiplier']:g}; reference `{eq['reference']}`):", "",
              "| mode | rel. L2 error of clipped sum (noise off) | noise std / (sigma C / B) |", "|---|---|---|"]
    for name, v in eq["modes"].items():
        lines.append(f"| {name} | {v['clipped_sum_relative_error']:.2e} | {v['noise_std_ratio']:.4f} "
                     f"(over {v['noise_values']} values) |")
    return lines


def _secagg_markdown(sa: dict[str, Any], when: str) -> list[str]:
    lines: list[str] = []
    lines += ["", "### SecAgg+ cost", "", when, "",
              "Simulated fit round (configure_fit to aggregate_fit, SecAgg+ stages included), median over rounds "
              f"2.. of {sa.get('runs_per_variant', 1)} simulation(s) per variant run in ABBA "
              "order (plain, SecAgg+, SecAgg+, plain, ...: load drifting steadily hits both alike); excluding "
              "training = fit time minus the slowest department's training time. Read the ratio with the load "
              "figures above.", "",
              "| departments | model | local steps | plain s | SecAgg+ s | ratio | ratio excl. training |",
              "|---|---|---|---|---|---|---|"]
    for row in sa["rows"]:
        s = row["setup"]
        lines.append(f"| {row['departments']} | {s['model']} | batch {s['batch']}, {s['local_epochs']:g} epoch of "
                     f"{int(s['rows'] * 0.8)} | {_f(row['off']['fit_seconds'])} | {_f(row['on']['fit_seconds'])} "
                     f"| {_f(row['ratio'])} ({_goal(row['ratio'], GOALS['secagg'])}) | "
                     f"{_f(row['ratio_excluding_training'])} |")
    return lines


def _overhead_markdown(o: dict[str, Any], when: str) -> list[str]:
    lines: list[str] = []
    rows = o.get("rows", [o])  # a bench.json written before the overhead part measured several sizes
    s = rows[0]["setup"]
    lines += ["", "### Framework overhead", "", when, "",
              f"{s['departments']} departments (one per core), {s['model']}, LoRA, DP, SecAgg+, batch "
              f"{s['batch']}, {s['local_epochs']:g} local epoch per round; median over rounds 2..{s['rounds']}. "
              "Overhead = (fit-round wall time - slowest department's training time) / wall time: model and data "
              "loading, noise planning, ledger and egress records, SecAgg+ stages and Flower's messaging."
              + (f" The simulation engine looks for each department's next message every {o['queue_poll_seconds']:g} s"
                 " (Flower's own wait: 0.1 s; `fedsilo simulate` sets 1 ms per department, from 0.01 s); the server "
                 "looks for replies after 0.01 s, then half as long again each time up to every 0.1 s."
                 if o.get("queue_poll_seconds") else ""), "",
              "| training rows per department | local steps (expected) | fit round s | slowest training s | "
              "overhead |", "|---|---|---|---|---|"]
    for row in rows:
        s = row["setup"]
        train_rows = int(s["rows"] * 0.8)
        steps = finetune_work(train_rows, JobConfig(batch_size=s["batch"], local_epochs=s["local_epochs"])).steps
        lines.append(f"| {train_rows} | {steps} | "
                     f"{_f(row['fit_seconds'])} | {_f(row['train_seconds_max'])} | "
                     f"{_f(row['overhead_fraction'], '.1%')} (goal <= {GOALS['overhead']:.0%}: "
                     f"{_goal(row['overhead_fraction'], GOALS['overhead'])}) |")
    return lines


def _comm_markdown(c: dict[str, Any], when: str) -> list[str]:
    lines: list[str] = []
    lines += ["", "### Communication per department per round", "", when, "",
              f"Model {c['model']}; the update as serialised by Flower (float32), and under SecAgg+ the masked, "
              "quantised vector built with Flower's own functions (SecAgg+ key agreement adds a few hundred bytes "
              "per neighbour).", "",
              "| fine-tuning | trainable parameters | bytes plain | bytes SecAgg+ |", "|---|---|---|---|"]
    for ft in ("lora", "full"):
        lines.append(f"| {ft} | {c[ft]['parameters']:,} | {c[ft]['bytes_plain']:,} | {c[ft]['bytes_secagg']:,} |")
    lines += ["", f"LoRA / full: {c['ratio_plain']:.2%} plain, {c['ratio_secagg']:.2%} with SecAgg+ "
                  f"(goal <= {GOALS['comm']:.0%}: {_goal(c['ratio_secagg'], GOALS['comm'])})."]
    return lines


def _scale_markdown(sc: dict[str, Any], when: str) -> list[str]:
    lines: list[str] = []
    s = sc["setup"]
    peaks = ", ".join(_mib(p) for p in sc["peak_bytes_per_round"])
    where = f" on the Ray cluster at {sc['ray_address']}" if sc.get("ray_address") else ""
    lines += ["", "### Scale", "", when, "",
              f"{s['departments']} departments, {s['model']}, DP + SecAgg+, {s['rounds']} rounds in one "
              f"simulation{where}: {_f(sc['seconds_per_round'], '.1f')} s per round (fit + evaluation; fit alone "
              f"{_f(sc['fit_seconds_per_round'], '.1f')} s), median over rounds 2..; peak memory of the whole "
              f"process tree (PSS, sampled every {MEMORY_INTERVAL_SECONDS} s) per round: {peaks}; growth from "
              f"round 2 to the last: {_f(sc['memory_growth_round2_to_last'], '+.1%')}"
              + (" (this machine's processes only)." if where else ".")]
    return lines


def _serving(dp: dict[str, Any]) -> str:
    threads = dp.get("threads_per_site")
    shared = (f" Each site trains with {threads} thread(s) (site config `threads`: the sites share this machine's "
              "cores)." if threads else "")
    if dp.get("gate_in_executor"):
        return ("Every message a site answers passes its gate (the approval check) in a thread of the site's "
                "executor (Flower's SuperExec, started once with the SuperNode; `client.executor`), which forwards "
                "it to the run's warm worker (site config `warm_worker`: imports, model and data kept for the run)."
                + shared)
    if dp.get("warm_worker"):
        return ("Every message a site answers starts a fresh gate process (the approval check), which forwards it "
                "to the run's warm worker (site config `warm_worker`: imports, model and data kept for the run).")
    return ("Every message a site answers starts a fresh process through its gate (approval check, imports, model "
            "and data).")


def _polling(dp: dict[str, Any]) -> str:
    poll = dp.get("poll_seconds")
    if poll is None:  # measured before the SuperNode's wait was the site's
        return " Each SuperNode waited Flower's own 3 s before asking the SuperLink again for a message."
    first = dp.get("first_idle_poll_seconds")
    ramp = (f"; after answering a message it asks after {first:g} s, then half as long again each time up to "
            f"{poll:g} s" if first else "")
    return (f" Each SuperNode asks the SuperLink for a message every {poll:g} s while it has none (site config "
            f"`poll_seconds`; Flower's own wait is 3 s){ramp}.")


def _deploy_markdown(dp: dict[str, Any], when: str) -> list[str]:
    s = dp["setup"]
    ex = dp["exchanges_per_round"]
    lines = ["", "### Real deployment on loopback", "", when, "",
             f"A TLS SuperLink with node authentication and {s['departments']} SuperNodes on 127.0.0.1, started "
             "as an operator starts them (`fedsilo server start`, `server register`, `client start` from site "
             f"configs); {s['model']}, DP, {s['rows']} rows per department, batch {s['batch']}, "
             f"{s['local_epochs']:g} local epoch, {s['rounds']} rounds per job, {s['runs']} job(s) per variant in "
             "ABBA order; medians over rounds 2.. (round 1 is the probe round). " + _serving(dp) + _polling(dp)
             + " A plain round "
             f"is {ex['plain']} message exchanges (fit, evaluation), a SecAgg+ round {ex['secagg']} (setup, share "
             "keys, masked vectors, unmask, evaluation).", "",
             "| variant | round s | fit s | evaluation s | slowest training s |", "|---|---|---|---|---|"]
    for name, label in (("plain", "plain"), ("secagg", "SecAgg+")):
        lines.append(f"| {label} | {_f(dp[f'{name}_round_seconds'])} | {_f(dp[f'{name}_fit_seconds'])} | "
                     f"{_f(dp[f'{name}_evaluate_seconds'])} | {_f(dp[f'{name}_train_seconds_max'])} |")
    cold = dp.get("cold")
    if cold:
        lines.append(f"| plain, a fresh process per message (`warm_worker = false`) | {_f(cold['round_seconds'])} | "
                     f"{_f(cold['fit_seconds'])} | {_f(cold['evaluate_seconds'])} | |")
    lines += ["", f"SecAgg+ / plain round: {_f(dp['ratio'])}. One message exchange (the evaluation: a message to "
                  f"every site and their replies) takes {_f(dp['exchange_seconds'])} s; each SecAgg+ stage adds "
                  f"{_f(dp['secagg_stage_seconds'])} s to the fit ((SecAgg+ fit - plain fit) / "
                  f"{ex['secagg'] - ex['plain']})."]
    if cold:
        cold_where = ("the same deployment, the sites' configs switched to `warm_worker = false`"
                      if cold.get("same_deployment") else "a deployment of their own")
        lines += ["", f"The warm worker makes a plain round {_f(dp['warm_speedup'])}x faster than a fresh process per "
                      "message (the cold jobs ran after the warm ones, on " + cold_where + ", same sizes)."]
    return lines


_PART_MARKDOWN: dict[str, Callable[[dict[str, Any], str], list[str]]] = {
    "dp": _dp_markdown, "secagg": _secagg_markdown, "overhead": _overhead_markdown, "comm": _comm_markdown,
    "scale": _scale_markdown, "deploy": _deploy_markdown,
}


def bench_markdown(result: dict[str, Any], only_part: str | None = None) -> str:
    """The bench's tables; with `only_part`, that part's section alone (with the machine), for the docs."""
    m = result["machine"]
    quick = " (--quick: tiny setup, figures meaningless)" if result["quick"] else ""
    lines: list[str] = [] if only_part else [
        f"## fedsilo bench{quick}", "",
        f"Machine: {machine_line(m)}. Each part below gives its load average (1, 5, 15 min) before and after "
        "it ran: the machine is shared, so compare ratios measured side by side, not absolute times."]

    def wanted(part: str) -> bool:
        return part in result and only_part in (None, part)

    def when(part: dict[str, Any]) -> str:
        return _measured(part) + (f" Machine: {machine_line(m)}{quick}." if only_part else "")

    for part, render in _PART_MARKDOWN.items():
        if wanted(part):
            lines += render(result[part], when(result[part]))
    return "\n".join(lines).lstrip("\n") + "\n"


def run_bench_command(out: Path, *, quick: bool, repeats: int | None, only: Sequence[str], docs: Path | None,
                      secagg_departments: Sequence[int] = (), ray_address: str | None = None) -> str:
    result = run_bench(out, quick=quick, repeats=repeats, only=only, secagg_departments=secagg_departments,
                       ray_address=ray_address)
    if docs is not None:
        from simulations.docs import update_section

        for part in result["parts"]:  # one section per part: parts measured by separate runs stay side by side
            update_section(docs, f"bench-{part}", bench_markdown(result, only_part=part))
    return bench_markdown(result)


