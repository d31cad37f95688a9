"""Unit tests of the trust boundary's pure parts: the site policy ([policy] in site.toml), app bundle identity,
the site's admission check, per-job epsilon planning, and the SuperLink's operator-only filter."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from client.deploy import REFUSED_EXIT, install_gate, supernode_command
from client.gate import admit
from client.ledger import Ledger, LedgerEntry
from client.plan import FINETUNE
from client.policy import INSTALLED, SitePolicy
from client.runner import Department
from client.site import SiteConfig
from common.appbundle import app_dir, build_bundle, bundle_digest, normalise_digest, stage_app
from common.config import JobConfig
from common.data import Split
from common.errors import ConfigError, PolicyError
from common.privacy import epsilon_spent
from server.superlink import OperatorOnly
from tests.conftest import TINY_JOB

SITE = """\
name = "cardiology"
data = "notes.csv"
epsilon = 8.0
delta = 1e-5
ledger = "ledger.json"
"""
DIGEST = "sha256:" + "ab" * 32


def _site(tmp_path: Path, policy: str) -> SiteConfig:
    path = tmp_path / "site.toml"
    path.write_text(SITE + policy, encoding="utf-8")
    return SiteConfig.from_toml(path)


def test_policy_table_is_parsed_and_normalised(tmp_path: Path) -> None:
    pin = ":".join(["AB"] * 32)
    site = _site(tmp_path, f'[policy]\napproved_apps = ["installed", "{"CD" * 32}"]\nmax_epsilon_per_job = 2\n'
                           f'max_rounds_per_job = 3\nserver_fingerprint = "{pin}"\n')
    assert site.policy == SitePolicy(approved_apps=(INSTALLED, "sha256:" + "cd" * 32), max_epsilon_per_job=2.0,
                                     max_rounds_per_job=3, server_fingerprint="ab" * 32)


def test_no_policy_table_approves_nothing(tmp_path: Path) -> None:
    site = _site(tmp_path, "")
    assert site.policy.approved_digests() == frozenset()
    with pytest.raises(PolicyError, match="not approved"):
        site.policy.check_app("cardiology", b"any bundle")


@pytest.mark.parametrize(("policy", "message"), [
    ('policy = "open"\n', "'policy' must be a table"),
    ("[policy]\nallow_all = true\n", r"\[policy\]: unknown key\(s\) \['allow_all'\]"),
    ('[policy]\napproved_apps = "installed"\n', r"\[policy\]: key 'approved_apps' must be a list"),
    ('[policy]\napproved_apps = ["sha256:1234"]\n', "'approved_apps' is invalid: 'sha256:1234' is not an app digest"),
    ("[policy]\nmax_epsilon_per_job = 0\n", "'max_epsilon_per_job' must be positive, got 0"),
    ("[policy]\nmax_epsilon_per_job = true\n", "'max_epsilon_per_job' must be a number"),
    ('[policy]\nmax_epsilon_per_job = "inf"\n', "'max_epsilon_per_job' must be a number"),
    ("[policy]\nmax_epsilon_per_job = inf\n", "'max_epsilon_per_job' must be finite"),
    ("[policy]\nmax_rounds_per_job = 1.5\n", "'max_rounds_per_job' must be an integer"),
    ("[policy]\nmax_rounds_per_job = -1\n", "'max_rounds_per_job' must be positive"),
    ('[policy]\nserver_fingerprint = "sha256:xyz"\n', "'server_fingerprint' is invalid: .* is not a SHA-256 "
                                                       "certificate fingerprint"),
    ("[policy]\nserver_fingerprint = 3\n", "'server_fingerprint' must be a string"),
])
def test_bad_policy_values_are_refused_naming_the_key(tmp_path: Path, policy: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        _site(tmp_path, policy)
    assert str(tmp_path / "site.toml") in str(info.value)  # the message names the file


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"max_rounds_per_job": 0}, "Site policy key 'max_rounds_per_job' must be positive, got 0"),
    ({"max_epsilon_per_job": -1.0}, "Site policy key 'max_epsilon_per_job' must be positive"),
    ({"approved_apps": ("md5:00",)}, "Site policy key 'approved_apps' is invalid"),
    ({"server_fingerprint": "nope"}, "Site policy key 'server_fingerprint' is invalid"),
])
def test_a_policy_checks_itself_when_constructed(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SitePolicy(**kwargs)


def test_a_constructed_policy_is_normalised() -> None:
    policy = SitePolicy(approved_apps=["installed", "CD" * 32], max_epsilon_per_job=2,
                        server_fingerprint="sha256:" + ":".join(["AB"] * 32))
    assert policy.approved_apps == (INSTALLED, "sha256:" + "cd" * 32)
    assert policy.max_epsilon_per_job == 2.0
    assert isinstance(policy.max_epsilon_per_job, float)
    assert policy.server_fingerprint == "ab" * 32
    assert SitePolicy() == SitePolicy(approved_apps=(), max_epsilon_per_job=None, max_rounds_per_job=None)


def test_digest_normalisation() -> None:
    assert normalise_digest("AB" * 32) == "sha256:" + "ab" * 32
    with pytest.raises(ConfigError, match="is not an app digest"):
        normalise_digest("md5:" + "ab" * 16)


def _copy_app(dest: Path) -> Path:
    src = app_dir()
    dest.mkdir()
    shutil.copy(src / "pyproject.toml", dest / "pyproject.toml")
    for pkg in ("common", "client", "server", "simulations"):
        shutil.copytree(src / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def test_the_bundle_is_the_one_flwr_run_submits() -> None:
    from common.compat import build_fab_from_disk  # walks the whole checkout, .venv included: slow, once

    assert build_bundle(app_dir()) == build_fab_from_disk(app_dir())


def test_a_staged_app_builds_the_same_bundle(tmp_path: Path) -> None:
    from common.compat import build_fab_from_disk

    stage_app(app_dir(), tmp_path)
    assert build_fab_from_disk(tmp_path) == build_bundle(app_dir())  # what `fedsilo server run` submits


def test_the_bundle_digest_names_the_code_and_nothing_else(tmp_path: Path) -> None:
    copy = _copy_app(tmp_path / "copy")
    (copy / "README.md").write_text("docs do not travel with the job\n")
    installed = bundle_digest(build_bundle(app_dir()))
    assert bundle_digest(build_bundle(copy)) == installed  # deterministic, code only
    runner = copy / "client" / "runner.py"
    runner.write_text(runner.read_text() + "\n# one changed line\n")
    assert bundle_digest(build_bundle(copy)) != installed


def test_admission_approves_the_installed_app_and_refuses_a_modified_one(tmp_path: Path) -> None:
    site = _site(tmp_path, '[policy]\napproved_apps = ["installed"]\n')
    installed = build_bundle(app_dir())
    assert admit(site, installed) == bundle_digest(installed)
    copy = _copy_app(tmp_path / "copy")
    (copy / "client" / "ledger.py").write_text("# a ledger that forgets\n")
    with pytest.raises(PolicyError, match="is not approved by the site's policy"):
        admit(site, build_bundle(copy))


def test_a_listed_digest_is_approved(tmp_path: Path) -> None:
    fab = build_bundle(app_dir())
    site = _site(tmp_path, f'[policy]\napproved_apps = ["{bundle_digest(fab)}"]\n')
    assert admit(site, fab) == bundle_digest(fab)
    assert site.policy.check_app("cardiology", fab) == bundle_digest(fab)


def test_round_limit(tmp_path: Path) -> None:
    policy = SitePolicy(approved_apps=(DIGEST,), max_rounds_per_job=2)
    policy.check_job("cardiology", JobConfig.from_run_config({"num-server-rounds": 2}))
    with pytest.raises(PolicyError, match="asks for 3 rounds, the site's policy allows at most 2"):
        policy.check_job("cardiology", JobConfig.from_run_config({"num-server-rounds": 3}))


def test_client_start_refuses_a_site_that_approves_no_app(tmp_path: Path) -> None:
    path = tmp_path / "site.toml"
    path.write_text(SITE + 'server = "127.0.0.1:47100"\ninsecure = true\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="approved_apps is empty"):
        supernode_command(path)


def test_gate_takes_the_place_of_flowers_app_processes(tmp_path: Path) -> None:
    from client.compat import TASK_TYPE_TO_COMMAND

    bin_dir = install_gate(tmp_path)
    assert bin_dir.stat().st_mode & 0o777 == 0o700
    script = bin_dir / "flwr-clientapp"
    assert script.stat().st_mode & 0o777 == 0o700
    assert "-m client.gate" in script.read_text()
    executor = bin_dir / "flower-superexec"  # Flower's executor, which runs the gate in a thread (client.executor)
    assert executor.stat().st_mode & 0o777 == 0o700 and "-m client.executor" in executor.read_text()
    others = set(TASK_TYPE_TO_COMMAND.values()) - {"flwr-clientapp"}
    assert "flwr-agentapp" in others
    for command in others:  # every other app process Flower could start would load the job's bundle: refused
        text = (bin_dir / command).read_text()  # run for real in tests/integration/test_gate_scripts.py
        assert f"refusing {command}" in text and f"exit {REFUSED_EXIT}" in text


def _ledger(entries: list[tuple[str, float, float, int]]) -> Ledger:
    return Ledger(site="cardiology", epsilon_budget=8.0, delta=1e-5, accountant="rdp", entries=[
        LedgerEntry(run_id=run, round=i + 1, noise_multiplier=s, sample_rate=q, steps=n, delta=1e-5,
                    epsilon_after=0.0, time=0.0) for i, (run, s, q, n) in enumerate(entries)])


@pytest.mark.parametrize("cap", [None, 1.0])
def test_per_job_cap_plans_noise_for_this_jobs_own_charges(tmp_path: Path, cap: float | None) -> None:
    site = SiteConfig(name="cardiology", data="hutto", epsilon=8.0, delta=1e-5, ledger=str(tmp_path / "l.json"),
                      policy=SitePolicy(approved_apps=(DIGEST,), max_epsilon_per_job=cap))
    job = JobConfig.from_run_config({**TINY_JOB, "labels": "negative,positive", "probe-rounds": 0,
                                     "num-server-rounds": 2, "batch-size": 10, "local-epochs": 1.0})
    dept = Department(site, job, run_id="job-2")
    dept._split = Split("cardiology", ["a note"] * 100, np.arange(100) % 2, ["a note"], np.array([0]))
    ledger = _ledger([("job-1", 1.0, 0.1, 20), ("job-2", 2.0, 0.1, 10)])  # an earlier job, and this one's round 1
    plan = dept.plan(ledger, torch.nn.Linear(3, 2), server_round=2, num_rounds=2, job_id="job-2")
    charge = plan.phase(FINETUNE).charge
    assert charge[1:] == (0.1, 10)  # batch 10 of 100 rows, one epoch: the same sampling as round 1
    total = epsilon_spent([*ledger.history, charge], 1e-5, "rdp")
    assert total <= 8.0 * (1 + 1e-3)
    this_job = epsilon_spent([(2.0, 0.1, 10), charge], 1e-5, "rdp")
    if cap is None:
        assert total == pytest.approx(8.0, rel=1e-2)  # only the site's total budget binds
    else:
        assert this_job == pytest.approx(cap, rel=1e-2)  # the per-job cap binds ...
        assert total < 8.0 * 0.9  # ... well before the total budget


def _operator_only_app(networks: tuple = ()) -> OperatorOnly:
    async def ok(request: object) -> PlainTextResponse:
        return PlainTextResponse("ok")

    inner = Starlette(routes=[Route("/{path:path}", ok, methods=["GET", "POST"])])
    return OperatorOnly(inner, networks)


@pytest.mark.parametrize(("client", "path", "status"), [
    (("10.0.0.7", 40000), "/v1/fleet/pull-messages", 200),  # departments: Fleet API
    (("10.0.0.7", 40000), "/health", 200),
    (("10.0.0.7", 40000), "/v1/control/start-run", 403),  # departments: no Control API ...
    (("10.0.0.7", 40000), "/v1/control/list-runs", 403),
    (("10.0.0.7", 40000), "/v1/runtime/pull-messages", 403),  # ... and no Runtime (ServerApp) API
    (("10.0.0.7", 40000), "/v1/fleet-but-not/x", 403),
    (("127.0.0.1", 40000), "/v1/control/start-run", 200),  # the operator, on the server host
    (("::1", 40000), "/v1/runtime/pull-messages", 200),
])
def test_operator_only_filter(client: tuple[str, int], path: str, status: int) -> None:
    with TestClient(_operator_only_app(), client=client) as http:
        assert http.post(path).status_code == status


def test_operator_network_and_same_host_address_reach_the_control_api() -> None:
    import ipaddress

    app = _operator_only_app((ipaddress.ip_network("10.0.5.0/24"),))
    with TestClient(app, client=("10.0.5.9", 1)) as http:
        assert http.post("/v1/control/start-run").status_code == 200
    with TestClient(app, client=("10.0.6.9", 1)) as http:
        assert http.post("/v1/control/start-run").status_code == 403
    with TestClient(app, base_url="http://10.0.0.1", client=("10.0.0.1", 1)) as http:  # this host's own address
        assert http.post("/v1/control/start-run").status_code == 200
