"""Real processes on 127.0.0.1: a TLS SuperLink with node authentication and the refusals (no CA, wrong CA,
unregistered key, a restart while the server still sees the node online, server certificate from another CA,
plaintext without --insecure), each with the message `fedsilo client start` gives for it (`client.join`).

Complete SecAgg+ jobs over TLS with SuperNodes started from site configs run in `test_failures.py` (three
departments, egress records with the server's certificate) and `test_trust.py`."""

from __future__ import annotations

import json
import subprocess
import time
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
    assert proc.returncode == 2
    assert "Failed to activate SuperNode" in proc.output  # Flower's line, forwarded
    assert "fedsilo: error: Site intruder: the server at" in proc.output
    assert f"its node key {deployment['certs'] / 'intruder'} is not registered there" in proc.output
    assert "fedsilo server register --state-dir SERVER_STATE_DIR --key intruder.pub --name intruder" in proc.output
    assert "still sees" not in proc.output


def _online_nodes(deployment: dict) -> int:
    listing = subprocess.run([*FEDSILO, "server", "nodes", "--state-dir", str(deployment["root"] / "state"), "--json"],
                             capture_output=True, text=True, timeout=120, check=True)
    return sum(n["status"] == "online" for n in json.loads(listing.stdout)["nodes"])


def test_restart_while_the_server_sees_the_node_online_is_explained(deployment: dict) -> None:
    """The department's SuperNode is killed (no sign-off) and started again at once: the server still sees it
    online for up to 60 s (two missed heartbeats)."""
    root, port, certs, procs = deployment["root"], deployment["port"], deployment["certs"], deployment["procs"]
    config = write_site(root / "restart", "cardiology", port, certs)
    first = procs.start([*FEDSILO, "client", "start", "--site-config", str(config), "--port", str(free_port())],
                        config.with_name("first.log"))
    deadline = time.monotonic() + 120
    while _online_nodes(deployment) == 0:
        assert first.poll() is None and time.monotonic() < deadline, config.with_name("first.log").read_text()
        time.sleep(0.5)
    procs.kill(first)
    log = config.with_name("second.log")
    second = procs.start([*FEDSILO, "client", "start", "--site-config", str(config), "--port", str(free_port()),
                          "--max-retries", "1"], log)
    assert second.wait(timeout=180) == 2
    output = log.read_text()
    assert "fedsilo: error: Site cardiology: the server at" in output
    assert "its node key is registered, and the server still sees this site online" in output
    assert "wait 60 s" in output and "server register" not in output


def test_client_trusting_another_ca_is_refused(deployment: dict) -> None:
    other = deployment["root"] / "other-ca"
    provision(other, sans=["127.0.0.1"], common_name="other CA")
    proc = _refused_client(deployment, "cardiology", ca=other / "ca.crt")
    assert proc.returncode == 2
    assert "fedsilo: error: Site cardiology: the server at" in proc.output
    assert f"issued by 'CN=fedsilo CA', which the site's CA file {other / 'ca.crt'} ('CN=other CA') does not " \
           "verify" in proc.output
    assert "Failed to activate" not in proc.output  # refused before the SuperNode started


def test_plaintext_client_is_refused(deployment: dict) -> None:
    proc = _refused_client(deployment, "oncology", insecure=True)
    assert proc.returncode == 2
    assert "fedsilo: error: Site oncology:" in proc.output
    assert "sets insecure = true (plaintext), but the server at" in proc.output and "speaks TLS" in proc.output


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
