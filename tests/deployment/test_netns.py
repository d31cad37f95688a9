"""The same deployment across real (virtual) hosts: the server and each department in its own network namespace,
joined by veth links, so traffic really crosses interfaces and the certificate is checked against each address.

Needs root and iproute2 (`ip netns`). Where that is missing the test is skipped and says why. The namespaces are
deleted whatever happens, and every process started is stopped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.appbundle import app_dir
from common.certs import provision
from tests.deployment.harness import FEDSILO, JOB, SITES, Processes, wait_for_port, write_site

pytestmark = pytest.mark.slow

PORT = 47100
SUBNET = "10.231.{i}.{host}"  # addresses exist only inside the namespaces this test creates


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _netns_unavailable() -> str | None:
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"fsprobe{os.getpid() % 100000}"
    created = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, check=False)
    if created.returncode != 0:
        return f"`ip netns add` is not permitted here: {created.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


@pytest.fixture
def namespaces() -> Iterator[dict[str, str]]:
    why = _netns_unavailable()
    if why is not None:
        pytest.skip(f"cannot run the multi-host test on this machine: {why}")
    tag = os.getpid() % 100000
    names = {"server": f"fs{tag}s", **{site: f"fs{tag}c{i}" for i, site in enumerate(SITES, 1)}}
    try:
        for ns in names.values():
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        for i, site in enumerate(SITES, 1):
            srv_if, site_if = f"v{tag}s{i}", f"v{tag}c{i}"
            _ip("link", "add", srv_if, "type", "veth", "peer", "name", site_if)
            _ip("link", "set", srv_if, "netns", names["server"])
            _ip("link", "set", site_if, "netns", names[site])
            _ip("-n", names["server"], "addr", "add", SUBNET.format(i=i, host=1) + "/24", "dev", srv_if)
            _ip("-n", names[site], "addr", "add", SUBNET.format(i=i, host=2) + "/24", "dev", site_if)
            _ip("-n", names["server"], "link", "set", srv_if, "up")
            _ip("-n", names[site], "link", "set", site_if, "up")
        yield names
    finally:
        for ns in names.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)  # removes the veths too


def test_job_across_network_namespaces(namespaces: dict[str, str], tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    server_ips = [SUBNET.format(i=i, host=1) for i in range(1, len(SITES) + 1)]
    provision(certs, sans=["127.0.0.1", *server_ips], nodes=list(SITES))
    in_ns = {role: ("ip", "netns", "exec", ns) for role, ns in namespaces.items()}
    procs = Processes()
    try:
        server = procs.start([*in_ns["server"], *FEDSILO, "server", "start", "--state-dir", str(tmp_path / "state"),
                              "--certs", str(certs), "--host", "0.0.0.0", "--port", str(PORT)],
                             tmp_path / "server.log")
        wait_for_port(PORT, server, prefix=in_ns["server"])
        for name in SITES:
            subprocess.run([*in_ns["server"], *FEDSILO, "server", "register", "--state-dir", str(tmp_path / "state"),
                            "--key", str(certs / f"{name}.pub"), "--name", name], check=True, capture_output=True,
                           timeout=120)
        for i, name in enumerate(SITES, 1):
            site = write_site(tmp_path, name, PORT, certs, host=SUBNET.format(i=i, host=1))
            procs.start([*in_ns[name], *FEDSILO, "client", "start", "--site-config", str(site)],
                        tmp_path / f"{name}.log")
        out = tmp_path / "out"
        job = subprocess.run([*in_ns["server"], *FEDSILO, "server", "run", "--state-dir", str(tmp_path / "state"),
                              "--out", str(out), "--labels", "negative,positive", *JOB],
                             capture_output=True, text=True, timeout=900, check=False)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        report = json.loads((out / "report.json").read_text())
        assert report["final"]["rounds_completed"] == 2
        for r in report["rounds"]:
            assert {n: d["status"] for n, d in r["departments"].items()} == {n: "trained" for n in SITES}
        # Each department reached the server over its own link, not over loopback.
        for i, name in enumerate(SITES, 1):
            assert (tmp_path / "sites" / name / "ledger.json").exists()
            assert f"{SUBNET.format(i=i, host=1)}:{PORT}" in (tmp_path / "sites" / name / "site.toml").read_text()
        _department_cannot_submit_or_read_jobs(in_ns, tmp_path, certs)
    finally:
        procs.stop_all()


def _department_cannot_submit_or_read_jobs(in_ns: dict[str, tuple[str, ...]], tmp_path: Path, certs: Path) -> None:
    """With a department's credentials (CA certificate, node key) and its network position, neither Flower's CLI nor
    raw HTTPS requests reach the Control or Runtime API; the operator (on the server host) still does."""
    address = f"{SUBNET.format(i=1, host=1)}:{PORT}"
    home = tmp_path / "department-flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "dept"\n\n[superlink.dept]\naddress = "{address}"\n'
                                      f'root-certificates = "{certs / "ca.crt"}"\n')
    flwr = [*in_ns["cardiology"], "env", f"FLWR_HOME={home}", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1",
            str(Path(sys.executable).parent / "flwr")]
    submit = subprocess.run([*flwr, "run", str(app_dir()), "dept", "--run-config", "labels='negative,positive'"],
                            capture_output=True, text=True, timeout=300, check=False)
    assert submit.returncode != 0, submit.stdout + submit.stderr
    listing = subprocess.run([*flwr, "ls", "dept"], capture_output=True, text=True, timeout=300, check=False)
    assert listing.returncode != 0, listing.stdout + listing.stderr
    probe = ("import ssl, sys, urllib.request, urllib.error\n"
             f"ctx = ssl.create_default_context(cafile={str(certs / 'ca.crt')!r})\n"
             "for path in sys.argv[1:]:\n"
             f"    req = urllib.request.Request('https://{address}' + path, data=b'', method='POST')\n"
             "    try:\n"
             "        print(path, urllib.request.urlopen(req, context=ctx, timeout=30).status)\n"
             "    except urllib.error.HTTPError as e:\n"
             "        print(path, e.code)\n")
    paths = ["/v1/control/list-runs", "/v1/control/start-run", "/v1/runtime/pull-messages"]
    raw = subprocess.run([*in_ns["cardiology"], sys.executable, "-c", probe, *paths], capture_output=True, text=True,
                         timeout=120, check=True)
    assert raw.stdout.split() == [w for p in paths for w in (p, "403")], raw.stdout
    # The operator, on the server host, still lists the runs: exactly the one job it submitted.
    operator = subprocess.run([*in_ns["server"], "env", f"FLWR_HOME={tmp_path / 'state' / 'flwr-home'}",
                               str(Path(sys.executable).parent / "flwr"), "ls", "fedsilo", "--format", "json"],
                              capture_output=True, text=True, timeout=300, check=False)
    assert operator.returncode == 0, operator.stdout + operator.stderr
    assert len(json.loads(operator.stdout)["runs"]) == 1
