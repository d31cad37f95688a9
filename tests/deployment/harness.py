"""Shared harness for tests with real Flower processes: ports, process families, site configs, jobs."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from tests.conftest import make_department_frame

FEDSILO = [sys.executable, "-m", "common.cli"]
SITES = {"cardiology": 60, "oncology": 48}
JOB = ["--rounds", "2", "--model", "tiny-random", "-c", "batch-size=8", "-c", "local-epochs=0.5", "-c",
       "max-length=16", "-c", "learning-rate=0.05", "-c", "secagg-max-weight=100.0"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 60, prefix: tuple[str, ...] = ()) -> None:
    """Wait until something accepts connections on 127.0.0.1:port (inside a namespace: `prefix` = ip netns exec)."""
    probe = [*prefix, sys.executable, "-c", f"import socket; socket.create_connection(('127.0.0.1', {port}), 1)"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}")
        if prefix:
            if subprocess.run(probe, capture_output=True, check=False).returncode == 0:
                return
        else:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    return
        time.sleep(0.5)
    raise AssertionError(f"nothing listens on {port} after {timeout}s")


@dataclass
class Processes:
    """Every process a test starts, each in its own session, stopped (with its children) at teardown."""

    procs: list[subprocess.Popen] = field(default_factory=list)

    def start(self, args: list[str], log: Path) -> subprocess.Popen:
        proc = subprocess.Popen(args, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
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
                members += [other, *other.children(recursive=True)]
        return members

    def kill(self, proc: subprocess.Popen) -> None:
        """SIGKILL `proc` and its whole family at once, as a crash of its host would (no clean-up runs)."""
        members = self.family([proc])
        for member in members:
            with contextlib.suppress(psutil.NoSuchProcess):
                member.kill()
        psutil.wait_procs(members, timeout=15)
        proc.wait(timeout=10)

    def stop_all(self) -> None:
        family = self.family()
        for member in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                member.terminate()
        _, alive = psutil.wait_procs(family, timeout=15)
        for member in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                member.kill()
        psutil.wait_procs(alive, timeout=10)
        for proc in self.procs:
            proc.wait(timeout=10)


APPROVE_INSTALLED = '[policy]\napproved_apps = ["installed"]'


def write_site(root: Path, name: str, port: int, certs: Path, *, ca: Path | None = None, key: str | None = None,
               insecure: bool = False, host: str = "127.0.0.1", policy: str = APPROVE_INSTALLED) -> Path:
    site = root / "sites" / name
    site.mkdir(parents=True, exist_ok=True)
    frame = make_department_frame({name: SITES.get(name, 40)})
    frame[["text", "label"]].to_csv(site / "notes.csv", index=False)
    lines = [f'name = "{name}"', 'data = "notes.csv"', "epsilon = 8.0", "delta = 1e-5", 'ledger = "ledger.json"',
             f'server = "{host}:{port}"']
    if insecure:
        lines.append("insecure = true")
    else:
        lines += [f'ca = "{ca or certs / "ca.crt"}"', f'node_key = "{certs / (key or name)}"']
    (site / "site.toml").write_text("\n".join([*lines, policy]) + "\n")
    return site / "site.toml"
