"""Run many departments on one machine with Flower's simulation engine (Ray), in this process.

The ServerApp and ClientApp are the same code as in deployment; only where site configs come from differs
(`client.site.simulated_sites`), and the simulation tells the ServerApp about its departments (`sites_view`).
Ray is started and shut down by Flower's simulation runtime; with a Ray address, Flower's runtime joins that
cluster instead (`ray.init(address=...)` through the backend config's `init_args`) and, at the end, only
disconnects from it (`ray.shutdown()` in a driver that joined a cluster leaves the cluster running).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.app import build_client_app
from client.compat import Mod
from client.plan import Plan
from client.policy import split_address
from client.site import SiteConfig, preflight_sites, simulated_sites
from common.compat import FlowerCompatError
from common.config import JobConfig, SimulationConfig, check_known_keys
from common.data import resolve_job
from common.errors import ConfigError, FedsiloError
from common.logs import LOG_FILE, add_log_file, adopt_flower_logger, remove_log_file
from common.model import build_model, device
from common.params import set_trainable
from common.text import encode, evaluate
from server.app import SimulatedSites, build_server_app
from server.checkpoint import CHECKPOINT
from server.compat import FLOWER_QUEUE_POLL_SECONDS, set_simulation_queue_poll
from server.records import AggregateStatus, dump_report, read_report
from server.report import REPORT_JSON, RunRecorder
from server.resume import resume_job
from server.strategy import CentralEval
from simulations.machine import usable_cpus

log = logging.getLogger(__name__)

RAY_ADDRESS_ENV = "RAY_ADDRESS"  # Ray's own variable: ray.init() joins the cluster it names
RAY_LOCAL = "local"  # ray.init's address for "start a new Ray here", whatever cluster this machine last joined
RAY_CONNECT_TIMEOUT_S = 5.0
# The CPUs a local Ray may use (default: every CPU this process may run on), as OMP_NUM_THREADS caps torch's threads:
# where simulations share a machine, each its part
SIM_CPUS_ENV = "FEDSILO_SIM_CPUS"
MIN_QUEUE_POLL_SECONDS = 0.01  # the simulation engine's look for messages (`queue_poll_seconds`)
QUEUE_POLL_SECONDS_PER_DEPARTMENT = 0.001


class SimulationFailedError(FedsiloError):
    """The simulation ran but did not complete its rounds (see the report's per-round errors)."""


class RayClusterError(FedsiloError):
    """The Ray cluster to join is not reachable at the address given."""


def check_ray_address(address: str) -> str:
    """The `host:port` of a Ray head's GCS, checked to accept connections within a few seconds.

    ray.init(address=...) retries an unreachable GCS for minutes before it gives up; this fails fast instead.
    """
    try:
        host, port = split_address(address)
    except ConfigError as exc:
        raise ConfigError(f"Ray address {address!r} (--ray-address or ${RAY_ADDRESS_ENV}) must be HOST:PORT of a "
                          "Ray cluster's head (its GCS, e.g. head.example.org:6379).") from exc
    try:
        with socket.create_connection((host, port), timeout=RAY_CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        raise RayClusterError(f"No Ray cluster reachable at {address} ({exc}); start one with `ray start --head "
                              f"--port {port}` on {host}, or check the address.") from exc
    return address


def check_ray_cluster(address: str, cpus_per_department: float) -> None:
    """Join the cluster at `address` once, with Ray's own client, and leave it: refused (typed, at once) where Ray
    cannot join it (another Ray version, not a Ray head) or where no node has the CPUs of one department.

    Inside Flower's simulation runtime the same failures would crash the runtime while the ServerApp waits for
    replies (until `stage-timeout`); here they are reported before anything starts.
    """
    import ray

    try:
        ray.init(address=address, include_dashboard=False, logging_level="error", log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise RayClusterError(f"Cannot join the Ray cluster at {address}: {exc}") from exc
    try:
        nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    finally:
        ray.shutdown()  # a driver that joined a cluster leaves it running
    # Flower's actor pool: per node, as many actors as the node's CPUs hold departments
    if not any(int(res.get("CPU", 0) / cpus_per_department) for res in nodes):
        cpus = [res.get("CPU", 0) for res in nodes]
        raise RayClusterError(f"No node of the Ray cluster at {address} has the {cpus_per_department:g} CPU(s) a "
                              f"department takes (its nodes' CPUs: {cpus}); start its nodes with more "
                              "(`ray start --num-cpus N`).")


def local_cpus() -> int:
    """The CPUs a simulation's own Ray may use on this machine: `$FEDSILO_SIM_CPUS`, else every CPU this process may
    run on (its affinity: taskset, a container's cpuset). Ray's actor pool holds one actor per CPU (a department's
    message takes one), each actor a process of its own that loads torch and the model."""
    raw = os.environ.get(SIM_CPUS_ENV, "").strip()
    if not raw:
        return usable_cpus()
    try:
        cpus = int(raw)
    except ValueError:
        cpus = 0
    if cpus < 1:
        raise ConfigError(f"${SIM_CPUS_ENV} must be a whole number of CPUs, at least 1; got {raw!r}.")
    return cpus


def backend_config(n_sites: int, cpus_per_department: float, ray_address: str | None) -> dict[str, Any]:
    """Flower's Ray backend config: per-department resources, and how Ray is started or joined.

    Locally, a new Ray is started with this machine's CPUs (`local_cpus`; address "local": without it ray.init()
    would join the cluster a `ray start` on this machine last wrote to /tmp/ray, and refuse `num_cpus`), and each
    department takes a GPU share where torch sees CUDA.
    Joining a cluster (`ray_address`), nothing about this machine is passed to Ray: Flower's actor pool is sized
    by the cluster's nodes' resources, and departments ask for CPUs only (this machine's CUDA says nothing about
    the nodes').
    """
    init_args: dict[str, Any] = {"include_dashboard": False, "logging_level": "error"}
    if ray_address is None:
        gpus = 1.0 / n_sites if torch.cuda.is_available() else 0.0
        init_args.update(address=RAY_LOCAL, num_cpus=local_cpus())
    else:
        gpus = 0.0
        init_args["address"] = check_ray_address(ray_address)
    return {"client_resources": {"num_cpus": cpus_per_department, "num_gpus": gpus}, "init_args": init_args}


def central_evaluator(job: JobConfig, sites: Sequence[SiteConfig]) -> CentralEval:
    """Accuracy on the union of the simulated departments' test splits (the global held-out test)."""
    labels = job.label_names
    built = build_model(job, len(labels))
    splits = [site.load_split(labels) for site in sites]
    texts = [t for s in splits for t in s.test_texts]
    data = encode(built.tokenizer, texts, np.concatenate([s.test_labels for s in splits]), job.max_length)

    def evaluate_global(arrays: list[np.ndarray]) -> float:
        set_trainable(built.model, arrays)
        result = evaluate(built.model, data, device())
        log.info("central evaluation: accuracy %.4f on %d held-out examples", result.accuracy, result.n)
        return result.accuracy

    return evaluate_global


def sites_view(job: JobConfig, sim: SimulationConfig, out_dir: Path) -> SimulatedSites:
    """What the ServerApp may know of the simulated departments (their configs are the simulation's own)."""
    sites = simulated_sites(job, sim, out_dir)
    return SimulatedSites(
        shared_budget=None if sim.site_epsilon_overrides() else sim.sim_epsilon,
        delta=sim.sim_delta,
        accountants=frozenset(site.accountant for site in sites),
        central_eval=central_evaluator(job, sites) if sim.sim_global_eval else None,
    )


def prepare(rc: dict[str, bool | int | float | str], out_dir: Path, *,
            resume: bool = False) -> tuple[dict[str, bool | int | float | str], JobConfig, int]:
    """Validate the run config, fix labels and a tight SecAgg+ max weight, refuse to overwrite a run.

    With `resume`, the run config is the checkpoint's in `out_dir` (`rc` may only repeat it, or change what
    `server.checkpoint.MAY_DIFFER_ON_RESUME` allows). Returns the completed run config, the job it describes and
    the number of departments.
    """
    check_known_keys(rc)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} exists and is not a directory.")
    rc = {**rc, "out-dir": str(out_dir.resolve())}
    if resume:
        rc = resume_job(out_dir, rc)
    elif (out_dir / REPORT_JSON).exists() or (out_dir / CHECKPOINT).exists():
        raise ConfigError(f"{out_dir} already holds a run; choose another --out, or continue it with --resume.")
    job, sim = resolve_job(rc)
    rc["labels"] = job.labels
    sites = simulated_sites(job, sim, out_dir.resolve())
    if len(sites) < job.min_departments:
        raise ConfigError(f"The data has {len(sites)} department(s); the job needs at least {job.min_departments}.")
    sizes = preflight_sites(sites, job)  # what each department would refuse at its first round, refused now
    small = {n: k for n, k in sizes.items() if k < 2}
    if small:
        raise ConfigError(f"Department(s) with fewer than 2 training examples: {small}.")
    if "secagg-max-weight" not in rc:
        rc["secagg-max-weight"] = float(max(sizes.values()))  # tightest weight bound: least quantisation error
    return rc, JobConfig.from_run_config(rc), len(sites)


def department_plans(rc: dict[str, bool | int | float | str], out_dir: Path) -> list[Plan]:
    """Each simulated department's privacy-utility plan for the job (`client.plan`), computed as the department
    computes it at its first round, from its own ledger, before anything is charged. `rc`: as `prepare` made it."""
    from client.runner import Department

    job, sim = resolve_job(rc)
    model = build_model(job, len(job.label_names)).model
    job_id = str(rc.get("job-id", "")) or None
    return [Department(site, job, run_id="plan").preview_plan(model, job_id)
            for site in simulated_sites(job, sim, out_dir.resolve())]


def queue_poll_seconds(departments: int) -> float:
    """How often the simulation engine looks for the departments' next messages: 1 ms per department, from
    0.01 s up to Flower's own 0.1 s (each look asks for every department's message)."""
    return min(FLOWER_QUEUE_POLL_SECONDS, max(MIN_QUEUE_POLL_SECONDS, QUEUE_POLL_SECONDS_PER_DEPARTMENT * departments))


def _set_queue_poll(departments: int) -> None:
    try:
        set_simulation_queue_poll(queue_poll_seconds(departments))
    except FlowerCompatError as exc:
        log.warning("simulate: keeping Flower's %g s message poll: %s", FLOWER_QUEUE_POLL_SECONDS, exc)


def simulate(rc: dict[str, bool | int | float | str], out_dir: Path,
             on_round: Callable[[RunRecorder], None] | None = None, cpus_per_department: float = 1.0, *,
             resume: bool = False, client_mods: Sequence[Mod] = (), ray_address: str | None = None,
             on_plans: Callable[[list[Plan]], None] | None = None) -> dict[str, Any]:
    """Run the simulation (or, with `resume`, continue the one in `out_dir`); returns the report (report.json's
    document; `server.records.load_report` types it).

    `client_mods` run around every department's ClientApp (outermost first), as Flower client mods. `on_plans`
    receives the departments' plans (`department_plans`) before training starts (not on resume).
    `ray_address` (default: $RAY_ADDRESS, as Ray's own): the `host:port` of a running Ray cluster's head to run the
    departments on, instead of a Ray started on this machine; the cluster keeps running afterwards. Every node
    must import fedsilo and reach `out_dir` and the data at the same paths.
    Raises on bad config, an unreachable cluster, or if the rounds did not complete.
    """
    ray_address = ray_address or os.environ.get(RAY_ADDRESS_ENV) or None
    rc, job, n_sites = prepare(rc, out_dir, resume=resume)
    backend = backend_config(n_sites, cpus_per_department, ray_address)
    if ray_address is not None:
        check_ray_cluster(ray_address, cpus_per_department)
    if on_plans is not None and not resume:
        plans = department_plans(rc, out_dir)
        for plan in plans:
            for warning in plan.warnings:
                log.warning("plan: %s", warning)
        on_plans(plans)
    out_dir.mkdir(parents=True, exist_ok=True)
    from flwr.simulation import run_simulation

    _set_queue_poll(n_sites)

    adopt_flower_logger()  # Flower's import added its own console handler: its records are printed once, by ours

    log_file = add_log_file(out_dir / LOG_FILE)  # the whole log, Flower's lines included, without colour codes
    # Flower's Ray backend sets this process's PYTHONPATH to its sys.path (for Ray's workers) and leaves it: the
    # programs this process starts afterwards (another Python's tools) would import this environment's packages
    pythonpath = os.environ.get("PYTHONPATH")
    try:
        log.info("simulate: %d departments, %d rounds, out %s, on %s", n_sites, job.num_server_rounds, out_dir,
                 f"the Ray cluster at {ray_address}" if ray_address else "a Ray started on this machine")
        run_simulation(server_app=build_server_app(rc, simulated_sites=sites_view, on_round=on_round),
                       client_app=build_client_app(rc, mods=client_mods), num_supernodes=n_sites,
                       backend_config=backend)
    finally:
        remove_log_file(log_file)
        if pythonpath is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = pythonpath
    report_path = out_dir / REPORT_JSON
    if not report_path.exists():
        raise SimulationFailedError(f"The simulation wrote no report to {report_path}; see the log above.")
    report = read_report(report_path)
    applied = [r for r in report.rounds if r.aggregate is AggregateStatus.APPLIED]
    if report.final is not None and report.final.outcome == "ended_early":
        raise SimulationFailedError(f"The job ended early after {len(report.rounds)} of {job.num_server_rounds} "
                                    f"rounds: {report.final.outcome_reason}. Report in {out_dir}.")
    if len(report.rounds) < job.num_server_rounds or not applied:
        errors = [e for r in report.rounds for e in r.errors]
        raise SimulationFailedError(
            f"The simulation completed {len(report.rounds)} of {job.num_server_rounds} rounds and applied "
            f"{len(applied)} aggregate(s). First department error: {errors[0] if errors else 'none recorded'}"
        )
    return dump_report(report)
