"""A real deployment on loopback, started as an operator would start it with the CLI: a TLS SuperLink with node
authentication (`fedsilo server start`), the departments' keys registered (`fedsilo server register`), one SuperNode
per department started from its site config (`fedsilo client start`), and jobs submitted with `fedsilo server run`.

Used by `fedsilo bench --only deploy` (real processes, real messages, each site's gate) and by the deployment tests'
harness. Every process runs in a session of its own; `ProcessFamily.stop_all` stops them with their descendants and
the helpers Flower starts for them (superexec, flwr-clientapp), also those orphaned by an exited parent.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from common.errors import FedsiloError
from simulations.machine import usable_cpus

log = logging.getLogger(__name__)

FEDSILO = [sys.executable, "-m", "common.cli"]
APPROVE_INSTALLED = '[policy]\napproved_apps = ["installed"]'
COMMAND_TIMEOUT_SECONDS = 120
STOP_TIMEOUT_SECONDS = 15


class DeploymentError(FedsiloError):
    """A process of the local deployment did not start, exited, or a job did not complete (the message says which
    and where its log is)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 60, prefix: tuple[str, ...] = ()) -> None:
    """Wait until something accepts connections on 127.0.0.1:port (inside a namespace: `prefix` = ip netns exec)."""
    probe = [*prefix, sys.executable, "-c", f"import socket; socket.create_connection(('127.0.0.1', {port}), 1)"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DeploymentError(f"the server exited with {proc.returncode} before listening on port {port}")
        if prefix:
            if subprocess.run(probe, capture_output=True, check=False).returncode == 0:
                return
        else:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    return
        time.sleep(0.5)
    raise DeploymentError(f"nothing listens on port {port} after {timeout:.0f}s")


@dataclass
class ProcessFamily:
    """Every process started here, each in its own session, stopped (with its children) by `stop_all`."""

    procs: list[subprocess.Popen] = field(default_factory=list)

    def start(self, args: list[str], log_file: Path) -> subprocess.Popen:
        with log_file.open("w") as out:
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def family(self, procs: list[subprocess.Popen] | None = None) -> list[psutil.Process]:
        """`procs` (default: all) with their descendants, and the helpers Flower started for them in sessions of
        their own (superexec, flwr-clientapp), including those orphaned by an exited parent (they name their parent
        with --parent-pid)."""
        chosen = self.procs if procs is None else procs
        members: list[psutil.Process] = []
        for proc in chosen:
            try:
                members += [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
        ours = {str(m.pid) for m in members}
        for other in psutil.process_iter(["cmdline"]):
            cmdline = other.info["cmdline"] or []
            if "--parent-pid" in cmdline[:-1] and cmdline[cmdline.index("--parent-pid") + 1] in ours:
                with contextlib.suppress(psutil.NoSuchProcess):
                    members += [other, *other.children(recursive=True)]
        return members

    def kill(self, proc: subprocess.Popen) -> None:
        """SIGKILL `proc` and its whole family at once, as a crash of its host would (no clean-up runs)."""
        members = self.family([proc])
        for member in members:
            with contextlib.suppress(psutil.NoSuchProcess):
                member.kill()
        psutil.wait_procs(members, timeout=STOP_TIMEOUT_SECONDS)
        proc.wait(timeout=10)

    def stop_all(self) -> None:
        family = self.family()
        for member in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                member.terminate()
        _, alive = psutil.wait_procs(family, timeout=STOP_TIMEOUT_SECONDS)
        for member in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                member.kill()
        psutil.wait_procs(alive, timeout=10)
        for proc in self.procs:
            proc.wait(timeout=10)


def write_site_config(site: Path, name: str, port: int, certs: Path | None, *, data: str = "notes.csv",
                      ca: Path | None = None, key: str | None = None, host: str = "127.0.0.1",
                      policy: str = APPROVE_INSTALLED, epsilon: float = 8.0, require_secagg: bool = True,
                      warm_worker: bool | None = None, heartbeat_seconds: float | None = None,
                      threads: int | None = None) -> Path:
    """`site`/site.toml for department `name` (its data `data` relative to `site`, its ledger ledger.json there),
    joining the server at host:port: over TLS with `certs`' CA (or `ca`) and node key `certs`/`key` (default: the
    department's name), or in plaintext when `certs` is None. `warm_worker`, `heartbeat_seconds`, `threads`: None
    keeps the site config's default."""
    site.mkdir(parents=True, exist_ok=True)
    lines = [f'name = "{name}"', f'data = "{data}"', f"epsilon = {epsilon}", "delta = 1e-5",
             'ledger = "ledger.json"', f'server = "{host}:{port}"']
    if not require_secagg:
        lines.append("require_secagg = false")
    if warm_worker is not None:
        lines.append(f"warm_worker = {str(warm_worker).lower()}")
    if heartbeat_seconds is not None:
        lines.append(f"heartbeat_seconds = {heartbeat_seconds!r}")
    if threads is not None:
        lines.append(f"threads = {threads}")
    if certs is None:
        lines.append("insecure = true")
    else:
        lines += [f'ca = "{ca or certs / "ca.crt"}"', f'node_key = "{certs / (key or name)}"']
    (site / "site.toml").write_text("\n".join([*lines, policy]) + "\n")
    return site / "site.toml"


def _fedsilo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FEDSILO, *args], capture_output=True, text=True, timeout=COMMAND_TIMEOUT_SECONDS,
                          check=False)


@dataclass
class LocalDeployment:
    """A running deployment: its state directory, port, sites and processes."""

    root: Path
    state: Path
    port: int
    sites: dict[str, Path]
    procs: ProcessFamily

    def online_nodes(self) -> int:
        listing = _fedsilo("server", "nodes", "--state-dir", str(self.state), "--json")
        if listing.returncode != 0:
            raise DeploymentError(f"`fedsilo server nodes` failed: {listing.stderr.strip()[-2000:]}")
        return sum(n["status"] == "online" for n in json.loads(listing.stdout)["nodes"])

    def wait_online(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while self.online_nodes() < len(self.sites):
            for proc in self.procs.procs:
                if proc.poll() is not None:
                    raise DeploymentError(f"{' '.join(map(str, proc.args[-4:]))} exited with {proc.returncode}; "
                                          f"see the logs in {self.root}")
            if time.monotonic() > deadline:
                raise DeploymentError(f"{len(self.sites)} SuperNodes not online after {timeout:.0f}s; see the logs "
                                      f"in {self.root}")
            time.sleep(1.0)

    def set_site_option(self, key: str, value: str) -> None:
        """Set top-level `key = value` (TOML) in every site's config, as an operator edits it while the site runs:
        the sites read their config with every message."""
        from common.files import write_atomic

        for path in self.sites.values():
            kept = [line for line in path.read_text().splitlines() if line.split("=")[0].strip() != key]
            write_atomic(path, "\n".join([f"{key} = {value}", *kept, ""]).encode())

    def run_job(self, out: Path, labels: str, args: Sequence[str], timeout: float = 1800) -> dict[str, Any]:
        """`fedsilo server run` with `args` until the job ends; its report.json."""
        log_file = out.with_name(out.name + ".log")
        with log_file.open("w") as sink:
            job = subprocess.run([*FEDSILO, "server", "run", "--state-dir", str(self.state), "--out", str(out),
                                  "--labels", labels, *args], stdout=sink, stderr=subprocess.STDOUT, timeout=timeout,
                                 check=False)
        report = out / "report.json"
        if not report.exists():
            raise DeploymentError(f"the job {' '.join(args)} wrote no report (exit {job.returncode}); see {log_file}")
        return dict(json.loads(report.read_text()))


def shared_threads(sites: int) -> int:
    """Each of `sites` co-located sites' (or test workers') share of the cores this process may use (site config
    `threads`, OMP_NUM_THREADS), at least 1."""
    return max(1, usable_cpus() // max(1, sites))


@contextlib.contextmanager
def local_deployment(root: Path, site_data: Mapping[str, Path], *, policy: str = APPROVE_INSTALLED,
                     epsilon: float = 8.0, require_secagg: bool = True, warm_worker: bool | None = None
                     ) -> Iterator[LocalDeployment]:
    """Certificates, a TLS SuperLink with node authentication on 127.0.0.1, and one SuperNode per department of
    `site_data` (name -> its CSV, copied into its site directory; privacy budget `epsilon`, policy `policy`,
    whether it requires SecAgg+ and serves a run in a warm worker), all online; every process is stopped on exit.
    The sites share this machine's cores: each trains with its share (`threads`, at least 1), as an operator
    co-locating sites would set it."""
    from common.certs import provision

    certs = root / "certs"
    provision(certs, sans=["localhost", "127.0.0.1"], nodes=list(site_data))
    port = free_port()
    state = root / "state"
    procs = ProcessFamily()
    try:
        server = procs.start([*FEDSILO, "server", "start", "--state-dir", str(state), "--certs", str(certs),
                              "--port", str(port)], root / "server.log")
        wait_for_port(port, server)
        for name in site_data:
            reg = _fedsilo("server", "register", "--state-dir", str(state), "--key", str(certs / f"{name}.pub"),
                           "--name", name)
            if reg.returncode != 0:
                raise DeploymentError(f"registering {name} failed: {reg.stderr.strip()[-2000:]}")
        sites: dict[str, Path] = {}
        for name, data in site_data.items():
            site = root / "sites" / name
            site.mkdir(parents=True, exist_ok=True)
            (site / "notes.csv").write_bytes(data.read_bytes())
            sites[name] = write_site_config(site, name, port, certs, policy=policy, epsilon=epsilon,
                                            require_secagg=require_secagg, warm_worker=warm_worker,
                                            threads=shared_threads(len(site_data)))
            procs.start([*FEDSILO, "client", "start", "--site-config", str(sites[name]), "--port", str(free_port())],
                        root / f"{name}.log")
        deployment = LocalDeployment(root=root, state=state, port=port, sites=sites, procs=procs)
        deployment.wait_online()
        log.info("local deployment: SuperLink on 127.0.0.1:%d, %d SuperNodes online", port, len(sites))
        yield deployment
    finally:
        procs.stop_all()
