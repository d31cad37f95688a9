"""Shared harness for tests with real Flower processes: ports, process families, site configs, jobs."""

from __future__ import annotations

import sys
from pathlib import Path

from simulations.localdeploy import (
    APPROVE_INSTALLED,
    ProcessFamily,
    free_port,
    shared_threads,
    wait_for_port,
    write_site_config,
)
from tests.conftest import make_department_frame

__all__ = ["APPROVE_INSTALLED", "FEDSILO", "JOB", "SITES", "Processes", "free_port", "wait_for_port", "write_site"]

FEDSILO = [sys.executable, "-m", "common.cli"]
SITES = {"cardiology": 60, "oncology": 48}
JOB = ["--rounds", "2", "--model", "tiny-random", "-c", "batch-size=8", "-c", "local-epochs=0.5", "-c",
       "max-length=16", "-c", "learning-rate=0.05", "-c", "secagg-max-weight=100.0"]
Processes = ProcessFamily  # every process a test starts, stopped with its family at teardown


def write_site(root: Path, name: str, port: int, certs: Path, *, ca: Path | None = None, key: str | None = None,
               insecure: bool = False, host: str = "127.0.0.1", policy: str = APPROVE_INSTALLED,
               heartbeat_seconds: float | None = None) -> Path:
    site = root / "sites" / name
    site.mkdir(parents=True, exist_ok=True)
    frame = make_department_frame({name: SITES.get(name, 40)})
    frame[["text", "label"]].to_csv(site / "notes.csv", index=False)
    return write_site_config(site, name, port, None if insecure else certs, ca=ca, key=key, host=host, policy=policy,
                             heartbeat_seconds=heartbeat_seconds, threads=shared_threads(len(SITES)))
