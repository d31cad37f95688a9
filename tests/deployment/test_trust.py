"""The trust boundary with real processes on 127.0.0.1: sites run only job code their policy approves, decline jobs
that ask for more than their policy allows (the reason reaches the server's report), and pin the server.

A TLS SuperLink with node authentication and two department SuperNodes started with `fedsilo client start`, whose
policies approve the installed fedsilo (`approved_apps = ["installed"]`) and allow one round per job (cardiology)
or five (oncology); cardiology also pins the server certificate.
"""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from client.egress import egress_log_path, read_egress_log
from client.ledger import LedgerFile
from client.policy import SitePolicy, server_certificate_fingerprint
from client.worker import WORKER_DIR
from common.appbundle import app_dir, build_bundle, bundle_digest
from common.certs import provision
from common.errors import PolicyError
from tests.deployment.harness import FEDSILO, JOB, SITES, Processes, free_port, wait_for_port, write_site

pytestmark = pytest.mark.slow

HOSTILE_MARK = "fedsilo-hostile-code-ran"
PACKAGES = ("common", "client", "server", "simulations")


def _fingerprint(cert: Path) -> str:
    return x509.load_pem_x509_certificate(cert.read_bytes()).fingerprint(hashes.SHA256()).hex()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("trust")
    certs = root / "certs"
    provision(certs, sans=["localhost", "127.0.0.1"], nodes=list(SITES))
    port = free_port()
    procs = Processes()
    pin = _fingerprint(certs / "server.pem")
    policies = {
        "cardiology": f'[policy]\napproved_apps = ["installed"]\nmax_rounds_per_job = 1\nserver_fingerprint = "{pin}"',
        "oncology": '[policy]\napproved_apps = ["installed"]\nmax_rounds_per_job = 5',
    }
    try:
        server = procs.start([*FEDSILO, "server", "start", "--state-dir", str(root / "state"), "--certs", str(certs),
                              "--port", str(port)], root / "server.log")
        wait_for_port(port, server)
        for name in SITES:
            subprocess.run([*FEDSILO, "server", "register", "--state-dir", str(root / "state"), "--key",
                            str(certs / f"{name}.pub"), "--name", name], capture_output=True, timeout=120, check=True)
        for name in SITES:
            site = write_site(root, name, port, certs, policy=policies[name])
            procs.start([*FEDSILO, "client", "start", "--site-config", str(site), "--port", str(free_port())],
                        root / f"{name}.log")
        yield {"root": root, "certs": certs, "port": port}
    finally:
        procs.stop_all()


def _submit(deployment: dict, out: Path, *extra: str) -> dict:
    job = subprocess.run([*FEDSILO, "server", "run", "--state-dir", str(deployment["root"] / "state"), "--out",
                          str(out), "--labels", "negative,positive", *JOB, *extra], capture_output=True, text=True,
                         timeout=900, check=False)
    assert (out / "report.json").exists(), job.stdout[-3000:] + job.stderr[-3000:]
    return json.loads((out / "report.json").read_text())


def _hostile_copy(dest: Path) -> Path:
    """fedsilo's app with client code changed to skip the ledger and leave a mark wherever it runs."""
    src = app_dir()
    shutil.copy(src / "pyproject.toml", dest / "pyproject.toml")
    for pkg in PACKAGES:
        shutil.copytree(src / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    runner = dest / "client" / "runner.py"
    text = runner.read_text()
    assert "self.ledger_file.charge(" in text
    mark = dest.parent / HOSTILE_MARK
    runner.write_text(f"import pathlib\npathlib.Path({str(mark)!r}).write_text('ran')\n"
                      + text.replace("self.ledger_file.charge(", "(lambda *a, **k: None)("))
    return mark


def test_job_with_modified_client_code_is_refused_and_none_of_it_runs(deployment: dict, tmp_path: Path) -> None:
    app = tmp_path / "app"
    app.mkdir()
    mark = _hostile_copy(app)
    digest = bundle_digest(build_bundle(app))
    assert digest != bundle_digest(build_bundle(app_dir()))
    report = _submit(deployment, tmp_path / "out", "--app", str(app), "--rounds", "1")
    errors = " ".join(e for r in report["rounds"] for e in r["errors"])
    for name in SITES:
        assert f"Site {name} refuses the job: its app {digest} is not approved" in errors
    assert all(r["aggregate"] != "applied" for r in report["rounds"])
    assert not mark.exists(), "a line of the unapproved job's client code ran"
    for name in SITES:  # no warm worker was started for the refused job
        workers = deployment["root"] / "sites" / name / WORKER_DIR
        assert not any(digest in log.read_text() for log in workers.glob("run-*.log"))
    for name in SITES:
        ledger = deployment["root"] / "sites" / name / "ledger.json"
        assert not ledger.exists()
        # The refusal is what left the site, and its egress log says so.
        refusals = [r for r in read_egress_log(egress_log_path(ledger)) if "is not approved" in (r["error"] or "")]
        assert refusals and all(r["bytes"] == 0 for r in refusals)


def test_job_asking_for_more_rounds_than_a_site_allows_is_declined_there(deployment: dict, tmp_path: Path) -> None:
    report = _submit(deployment, tmp_path / "out")  # JOB asks for 2 rounds; cardiology allows 1
    assert report["final"]["rounds_completed"] == 2
    for r in report["rounds"]:
        cardiology, oncology = r["departments"]["cardiology"], r["departments"]["oncology"]
        assert cardiology["status"] == "declined_policy"
        assert "asks for 2 rounds, the site's policy allows at most 1" in cardiology["reason"]
        assert oncology["status"] == "trained"
        # Under SecAgg+ the sum of oncology's update alone would be its update: it is not unmasked
        assert r["aggregate"] == "kept_previous" and "only one department trained" in r["aggregate_reason"]
    root = deployment["root"]
    assert not (root / "sites" / "cardiology" / "ledger.json").exists()  # declined before any charge
    oncology = LedgerFile(root / "sites" / "oncology" / "ledger.json", "oncology", 8.0, 1e-5, "rdp").read()
    assert [e.round for e in oncology.entries] == [1, 2]
    # oncology served the job's messages in its warm worker, which charged its ledger, in a directory of the site's
    # user alone (its socket's mode: tests/integration/test_worker_process.py); the worker ended once it had
    # answered the last round's evaluation, and its socket went with it
    workers = root / "sites" / "oncology" / WORKER_DIR
    assert stat.S_IMODE(workers.stat().st_mode) == 0o700
    (log,) = [p for p in workers.glob("run-*.log") if "ledger: site oncology charged round 2" in p.read_text()]
    deadline = time.monotonic() + 30  # the reply reaches the server before the worker writes its last line
    while "answered the evaluation of its last round; ending" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "worker: serving run" in log.read_text()
    assert "answered the evaluation of its last round; ending" in log.read_text()
    assert not log.with_suffix(".sock").exists()


def test_the_pinned_server_certificate_is_checked_against_the_live_server(deployment: dict) -> None:
    certs, address = deployment["certs"], f"127.0.0.1:{deployment['port']}"
    seen = server_certificate_fingerprint(address, certs / "ca.crt")
    assert seen == _fingerprint(certs / "server.pem")
    SitePolicy(server_fingerprint=seen).check_server("cardiology", address, certs / "ca.crt")
    with pytest.raises(PolicyError, match="not the pinned"):
        SitePolicy(server_fingerprint="ab" * 32).check_server("cardiology", address, certs / "ca.crt")
