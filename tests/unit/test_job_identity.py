"""F1: a job keeps its identity across resumes, and each site's per-job epsilon cap counts every run of it.

Driven through the real `Department.fit` (model and training faked as in test_ledger_crash, the real noise
planner and ledger): a job trains, the server "crashes", the job is resumed under a new Flower run id and the same
job id, and the site's charges for the job are recomputed independently with Opacus' own `RDPAccountant`, step
by step, and compared with `max_epsilon_per_job`.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import replace
from pathlib import Path
from unittest import mock

import pytest
from opacus.accountants import RDPAccountant

from client.ledger import FORMAT, LedgerEntry, LedgerFile, load_ledger
from client.policy import SitePolicy
from client.runner import Department
from common import keys
from common.config import JobConfig
from tests.unit.test_ledger_crash import DELTA, GLOBAL, _department, _Harness

BUDGET = 30.0  # the site's total budget: far above the cap, so only the cap binds
CAP = 2.0
ROUNDS = 3


def _capped(dept: Department, cap: float | None = CAP) -> Department:
    dept.site = replace(dept.site, policy=SitePolicy(max_epsilon_per_job=cap))
    return dept


def _fit(harness: _Harness, dept: Department, server_round: int, job_id: str | None) -> str:
    with harness.patched(None, dept), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus' RDP warnings for extreme orders
        outcome = dept.fit(GLOBAL, server_round, ROUNDS, None, job_id=job_id)
    return str(outcome.metrics[keys.M_STATUS])


def _opacus_epsilon(entries: list[LedgerEntry]) -> float:
    """Independent recomputation: Opacus' RDPAccountant, one `step` per DP-SGD step the ledger records."""
    acc = RDPAccountant()
    for e in entries:
        for _ in range(e.steps):
            acc.step(noise_multiplier=e.noise_multiplier, sample_rate=e.sample_rate)
    return float(acc.get_epsilon(delta=DELTA))


def _crash_and_resume(tmp_path: Path, job_id: str | None) -> list[LedgerEntry]:
    """Run 1 trains rounds 1-2 and the server dies before round 2's checkpoint; the resumed run (a new Flower run
    id) trains rounds 2-3 from the checkpoint and dies before round 3's; a second resume runs round 3 again."""
    harness = _Harness(tmp_path, budget=BUDGET, sigma=None)  # the real noise planner
    statuses = []
    for run_id, rounds in (("run-1", (1, 2)), ("run-2", (2, 3)), ("run-3", (3,))):
        for server_round in rounds:
            dept = _capped(_department(tmp_path, BUDGET, 40, run_id, ROUNDS))  # one process per message
            statuses.append(_fit(harness, dept, server_round, job_id))
    assert statuses[0] == keys.STATUS_TRAINED
    return LedgerFile(tmp_path / "ledger.json", "cardiology", BUDGET, DELTA, "rdp").read().entries


def test_a_resumed_job_never_spends_more_than_the_per_job_cap(tmp_path: Path) -> None:
    entries = _crash_and_resume(tmp_path, job_id="job-a")
    assert {e.run_id for e in entries} >= {"run-1", "run-2"}  # the job's charges span runs ...
    assert {e.job_id for e in entries} == {"job-a"}  # ... under one job id
    spent = _opacus_epsilon(entries)
    assert spent <= CAP * (1 + 1e-6)
    assert spent == pytest.approx(entries[-1].epsilon_after, rel=1e-6)  # the ledger agrees with Opacus


def test_without_a_job_id_an_older_server_gets_the_per_run_cap(tmp_path: Path) -> None:
    """A server that sends no job id (before job ids): the run id stands in, so each run is capped on its own;
    this is the hole the job id closes (documented for `max_epsilon_per_job`)."""
    entries = _crash_and_resume(tmp_path, job_id=None)
    assert all(e.job_id == e.run_id for e in entries)
    for run in {e.run_id for e in entries}:
        assert _opacus_epsilon([e for e in entries if e.run_id == run]) <= CAP * (1 + 1e-6)
    assert _opacus_epsilon(entries) > CAP


def test_the_cap_also_counts_this_runs_charges_under_another_job_id(tmp_path: Path) -> None:
    """To be strict: a server that changes the job id within one run does not get a fresh cap."""
    harness = _Harness(tmp_path, budget=BUDGET, sigma=None)
    for server_round in range(1, ROUNDS + 1):
        _fit(harness, _capped(_department(tmp_path, BUDGET, 40, "run-1", ROUNDS)), server_round, f"job-{server_round}")
    entries = LedgerFile(tmp_path / "ledger.json", "cardiology", BUDGET, DELTA, "rdp").read().entries
    assert _opacus_epsilon(entries) <= CAP * (1 + 1e-6)


def test_a_charge_over_the_cap_is_refused_even_if_planned(tmp_path: Path) -> None:
    """Fail closed: the charge about to be made is checked against the cap, independently of the noise plan."""
    harness = _Harness(tmp_path, budget=BUDGET, sigma=0.5)  # a plan that ignores the cap
    dept = _capped(_department(tmp_path, BUDGET, 40, "run-1", ROUNDS), cap=0.5)
    with harness.patched(None, dept), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with mock.patch("client.plan.noise_for_budget", lambda **k: 0.5):
            outcome = dept.fit(GLOBAL, 1, ROUNDS, None, job_id="job-a")
    assert outcome.metrics[keys.M_STATUS] == keys.STATUS_DECLINED_BUDGET
    assert "per-job cap" in str(outcome.metrics[keys.M_REASON])
    assert not (tmp_path / "ledger.json").exists()


@pytest.mark.parametrize("bad", ["a" * 65, "job id with spaces", "../x"])
def test_a_malformed_job_id_is_declined(tmp_path: Path, bad: str) -> None:
    harness = _Harness(tmp_path, budget=BUDGET)
    assert _fit(harness, _capped(_department(tmp_path, BUDGET, 40, "run-1", ROUNDS)), 1, bad) \
        == keys.STATUS_DECLINED_POLICY


def test_a_version_1_ledger_is_read_with_run_ids_as_job_ids_and_rewritten_as_version_2(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    lf = LedgerFile(path, "cardiology", BUDGET, DELTA, "rdp")
    with lf.open() as ledger:
        lf.charge(ledger, run_id="run-1", server_round=1, charge=(3.0, 0.1, 5), job_id="job-a")
    doc = json.loads(path.read_text())
    assert doc["body"]["format"] == FORMAT == "fedsilo-ledger/2" and doc["body"]["entries"][0]["job_id"] == "job-a"
    body = doc["body"] | {"format": "fedsilo-ledger/1"}  # the same ledger as fedsilo wrote it before job ids
    for entry in body["entries"]:
        del entry["job_id"]
    from client.ledger import _checksum

    path.write_text(json.dumps({"body": body, "sha256": _checksum(body)}))
    (old,) = load_ledger(path).entries
    assert old.job_id == "run-1"
    with lf.open() as ledger:
        lf.charge(ledger, run_id="run-2", server_round=2, charge=(3.0, 0.1, 5), job_id="job-b")
    doc = json.loads(path.read_text())
    assert doc["body"]["format"] == "fedsilo-ledger/2"
    assert [e["job_id"] for e in doc["body"]["entries"]] == ["run-1", "job-b"]


def test_the_server_sends_the_job_id_with_every_round() -> None:
    from server.strategy import FedSiloStrategy

    strategy = FedSiloStrategy.__new__(FedSiloStrategy)
    strategy.job, strategy.fingerprint = JobConfig(job_id="job-a"), "f"
    assert strategy._config(1)[keys.CFG_JOB_ID] == "job-a"


def test_the_client_passes_the_job_id_it_was_sent_and_none_from_an_older_server() -> None:
    from client.app import DepartmentClient
    from client.runner import FitOutcome

    seen: list[str | None] = []

    class Fake:
        def fit(self, arrays: object, server_round: int, num_rounds: int, fingerprint: str | None,
                job_id: str | None = None) -> FitOutcome:
            seen.append(job_id)
            return FitOutcome([], 0, {})

    client = DepartmentClient(Fake())  # type: ignore[arg-type]
    client.fit([], {keys.CFG_ROUND: 1, keys.CFG_NUM_ROUNDS: 2, keys.CFG_JOB_ID: "job-a"})
    client.fit([], {keys.CFG_ROUND: 1, keys.CFG_NUM_ROUNDS: 2})
    assert seen == ["job-a", None]
