"""A job's lifecycle with real processes on 127.0.0.1 (TLS SuperLink with node authentication, two department
SuperNodes started with `fedsilo client start`):

- `server run --detach` submits a job and returns at once with its run id; `server jobs` lists it running with its
  out dir and rounds asked, `server logs` prints fedsilo's lines of its server log (`--verbose`: every line; no
  colour codes, no line twice), `server stop` stops it and Flower then reports it finished:stopped;
- SIGTERM to a `server run` that follows its job stops the job on the server and exits 143.
"""

from __future__ import annotations

import itertools
import json
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from common.certs import provision
from tests.deployment.harness import FEDSILO, JOB, SITES, Processes, free_port, wait_for_port, write_site

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

# Many rounds: the job must still be running when it is stopped.
LONG_JOB = [*JOB, "--rounds", "30"]


def _wait(what: str, check: Callable[[], bool], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.5)


def _fedsilo(deployment: dict, *args: str) -> subprocess.CompletedProcess[str]:
    """`fedsilo server ARGS --state-dir STATE`; its output is printed (pytest shows it when a test fails)."""
    proc = subprocess.run([*FEDSILO, "server", *args, "--state-dir", str(deployment["state"])], capture_output=True,
                          text=True, timeout=120, check=False)
    print(f"$ fedsilo server {' '.join(args)}  (exit {proc.returncode})\n{proc.stdout}{proc.stderr}")
    return proc


def _jobs(deployment: dict) -> dict[int, dict]:
    listing = _fedsilo(deployment, "jobs", "--json")
    assert listing.returncode == 0, listing.stderr
    return {job["run-id"]: job for job in json.loads(listing.stdout)["jobs"]}


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("lifecycle")
    certs = root / "certs"
    provision(certs, sans=["localhost", "127.0.0.1"], nodes=list(SITES))
    port = free_port()
    procs = Processes()
    state = root / "state"
    try:
        server = procs.start([*FEDSILO, "server", "start", "--state-dir", str(state), "--certs", str(certs),
                              "--port", str(port)], root / "server.log")
        wait_for_port(port, server)
        for name in SITES:
            subprocess.run([*FEDSILO, "server", "register", "--state-dir", str(state), "--key",
                            str(certs / f"{name}.pub"), "--name", name], capture_output=True, timeout=120, check=True)
        for name in SITES:
            site = write_site(root, name, port, certs)
            procs.start([*FEDSILO, "client", "start", "--site-config", str(site), "--port", str(free_port())],
                        root / f"{name}.log")
        yield {"root": root, "state": state, "procs": procs}
    finally:
        procs.stop_all()


def test_a_detached_job_is_listed_logged_and_stopped(deployment: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    submitted = _fedsilo(deployment, "run", "--out", str(out), "--labels", "negative,positive", *LONG_JOB,
                         "--detach")
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    found = re.search(r"Job (\d+) submitted", submitted.stdout)
    assert found, submitted.stdout
    run_id = found.group(1)
    assert f"server stop --state-dir {deployment['state']} {run_id}" in submitted.stdout

    _wait("the detached job to run", lambda: _jobs(deployment)[int(run_id)]["status"] == "running")
    job = _jobs(deployment)[int(run_id)]
    # Rounds done and departments come from the run's report, written after each round (unit-tested with one):
    # this test stops the job before its first round ends, to stay short.
    assert job["out-dir"] == str(out) and job["rounds-asked"] == 30, job
    table = _fedsilo(deployment, "jobs")
    assert re.search(rf"^{run_id}\s+running\s+\d+/30\s.*{re.escape(str(out))}$", table.stdout, re.MULTILINE), \
        table.stdout

    # `server logs`: by default fedsilo's own lines (the ServerApp's start line among them), no Flower chatter;
    # --verbose every line; never a colour code, never a line twice in a row.
    def job_started() -> bool:
        return "server: job with 30 rounds" in _fedsilo(deployment, "logs", run_id).stdout

    _wait("the ServerApp's first line in the job's log", job_started, timeout=180)
    logs = _fedsilo(deployment, "logs", run_id)
    verbose = _fedsilo(deployment, "logs", run_id, "--verbose")
    for shown in (logs, verbose):
        assert shown.returncode == 0, shown.stderr
        lines = shown.stdout.splitlines()
        assert "\x1b[" not in shown.stdout + shown.stderr, shown.stdout
        assert all(a != b for a, b in itertools.pairwise(lines)), shown.stdout
    assert "Using SuperLink" not in logs.stdout and "Using SuperLink" in verbose.stdout
    assert len(verbose.stdout.splitlines()) > len(logs.stdout.splitlines())

    stopped = _fedsilo(deployment, "stop", run_id)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert f"Job {run_id} stopped." in stopped.stdout
    job = _jobs(deployment)[int(run_id)]
    assert job["status"] == "finished:stopped", job
    again = _fedsilo(deployment, "stop", run_id)  # a finished job cannot be stopped: Flower's reason, exit 2
    assert again.returncode == 2 and "already finished" in again.stderr, again.stderr


def test_sigterm_on_server_run_stops_the_job_on_the_server(deployment: dict, tmp_path: Path) -> None:
    out, log = tmp_path / "out", tmp_path / "run.log"
    job = deployment["procs"].start([*FEDSILO, "server", "run", "--state-dir", str(deployment["state"]), "--out",
                                     str(out), "--labels", "negative,positive", *LONG_JOB], log)

    def submitted() -> bool:
        return re.search(r"job (\d+) submitted", log.read_text()) is not None

    _wait("the job's submission", submitted)
    found = re.search(r"job (\d+) submitted", log.read_text())
    assert found
    run_id = int(found.group(1))
    _wait("the job to run", lambda: _jobs(deployment)[run_id]["status"] == "running")
    job.send_signal(signal.SIGTERM)
    assert job.wait(timeout=120) == 128 + signal.SIGTERM, log.read_text()[-3000:]
    assert f"SIGTERM: stopped job {run_id} on the server." in log.read_text()
    assert _jobs(deployment)[run_id]["status"] == "finished:stopped"
    print(log.read_text()[-2000:])
