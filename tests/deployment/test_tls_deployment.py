"""Real processes on 127.0.0.1: a TLS SuperLink with node authentication and the refusals (no CA, wrong CA,
unregistered key, server certificate from another CA, plaintext without --insecure).

Complete SecAgg+ jobs over TLS with SuperNodes started from site configs run in `test_failures.py` (three
departments, egress records with the server's certificate) and `test_trust.py`."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from common.certs import provision
from tests.deployment.harness import FEDSILO, SITES, Processes, free_port, wait_for_port, write_site

pytestmark = pytest.mark.slow

@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("deploy")
    certs = root / "certs"
    provision(certs, sans=["localhost", "127.0.0.1"], nodes=[*SITES, "intruder"])
    port = free_port()
    procs = Processes()
    try:
        server = procs.start([*FEDSILO, "server", "start", "--state-dir", str(root / "state"), "--certs", str(certs),
                              "--port", str(port)], root / "server.log")
        wait_for_port(port, server)
        for name in SITES:
            reg = subprocess.run([*FEDSILO, "server", "register", "--state-dir", str(root / "state"), "--key",
                                  str(certs / f"{name}.pub"), "--name", name], capture_output=True, text=True,
                                 timeout=120, check=False)
            assert reg.returncode == 0, reg.stderr
        yield {"root": root, "certs": certs, "port": port, "procs": procs}
    finally:
        procs.stop_all()


@dataclass
class Exited:
    returncode: int
    output: str


def _refused_client(deployment: dict, name: str, **site: object) -> Exited:
    """Start a client that must be refused; it must exit (non-zero) by itself. Output goes to a file: Flower's
    helpers inherit the client's stdout, so a pipe would stay open after the client exits."""
    root, port, certs = deployment["root"], deployment["port"], deployment["certs"]
    config = write_site(root / "refused", name, port, certs, **site)  # type: ignore[arg-type]
    log = config.with_suffix(".log")
    proc = deployment["procs"].start([*FEDSILO, "client", "start", "--site-config", str(config), "--port",
                                      str(free_port()), "--max-retries", "1"], log)
    returncode = proc.wait(timeout=180)
    return Exited(returncode, log.read_text())


def test_unregistered_node_key_is_refused(deployment: dict) -> None:
    proc = _refused_client(deployment, "intruder")
    assert proc.returncode != 0
    assert "Failed to activate SuperNode" in proc.output


def test_client_trusting_another_ca_is_refused(deployment: dict) -> None:
    other = deployment["root"] / "other-ca"
    provision(other, sans=["127.0.0.1"])
    proc = _refused_client(deployment, "cardiology", ca=other / "ca.crt")
    assert proc.returncode != 0


def test_plaintext_client_is_refused(deployment: dict) -> None:
    proc = _refused_client(deployment, "oncology", insecure=True)
    assert proc.returncode != 0


def test_server_certificate_from_another_ca_is_refused_before_starting(tmp_path: Path, deployment: dict) -> None:
    certs = tmp_path / "mixed"
    provision(certs, sans=["127.0.0.1"])
    other = tmp_path / "other"
    provision(other, sans=["127.0.0.1"])
    (certs / "server.pem").write_bytes((other / "server.pem").read_bytes())
    proc = subprocess.run([*FEDSILO, "server", "start", "--state-dir", str(tmp_path / "s"), "--certs", str(certs),
                           "--port", str(free_port())], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert "fedsilo: error:" in proc.stderr and "server.pem" in proc.stderr


def test_plaintext_server_needs_explicit_insecure(tmp_path: Path) -> None:
    proc = subprocess.run([*FEDSILO, "server", "start", "--state-dir", str(tmp_path / "s"), "--port",
                           str(free_port())], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert "--insecure" in proc.stderr
