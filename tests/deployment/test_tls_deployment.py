"""Real processes on 127.0.0.1: a TLS SuperLink with node authentication, two department SuperNodes started from
their site configs, a 2-round SecAgg+ job submitted by the operator; and the refusals (no CA, wrong CA,
unregistered key, server certificate from another CA, plaintext without --insecure)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes

from client.egress import egress_log_path, read_egress_log
from client.ledger import LedgerFile
from common.certs import SERVER_CERT, load_certificate, provision
from tests.deployment.harness import FEDSILO, JOB, SITES, Processes, free_port, wait_for_port, write_site

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
        for name in SITES:
            procs.start([*FEDSILO, "client", "start", "--site-config", str(write_site(root, name, port, certs)),
                         "--port", str(free_port())], root / f"{name}.log")
        yield {"root": root, "certs": certs, "port": port, "procs": procs}
    finally:
        procs.stop_all()


def test_two_departments_complete_a_secagg_job_over_tls(deployment: dict) -> None:
    root, state = deployment["root"], deployment["root"] / "state"
    out = root / "out"
    job = subprocess.run([*FEDSILO, "server", "run", "--state-dir", str(state), "--out", str(out), "--labels",
                          "negative,positive", *JOB], capture_output=True, text=True, timeout=900, check=False)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    server_fingerprint = load_certificate(deployment["certs"] / SERVER_CERT).fingerprint(hashes.SHA256()).hex()
    assert report["final"]["secure_aggregation"] is True and report["final"]["rounds_completed"] == 2
    for r in report["rounds"]:
        assert r["aggregate"] == "applied"
        assert {n: d["status"] for n, d in r["departments"].items()} == {n: "trained" for n in SITES}
    for name in SITES:
        ledger = LedgerFile(root / "sites" / name / "ledger.json", name, 8.0, 1e-5, "rdp").read()
        assert [e.round for e in ledger.entries] == [1, 2]
        assert 0 < ledger.epsilon <= 8.0
        assert report["final"]["epsilon"][name] == pytest.approx(ledger.epsilon)
        # The site's egress log names the server and the certificate it presented, for every message sent.
        egress = read_egress_log(egress_log_path(root / "sites" / name / "ledger.json"))
        assert len(egress) == 2 * 5  # per round: four SecAgg+ stages and one evaluation
        assert {r["server_cert_sha256"] for r in egress} == {server_fingerprint}
    nodes = subprocess.run([*FEDSILO, "server", "nodes", "--state-dir", str(state)], capture_output=True, text=True,
                           timeout=120, check=False)
    assert nodes.stdout.count("online") == 2


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
