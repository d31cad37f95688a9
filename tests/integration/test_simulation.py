"""End to end: tiny model, 3 departments, 2 rounds, DP-SGD + SecAgg+ on Flower's simulation engine (Ray)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from client.ledger import LedgerFile
from common.privacy import epsilon_spent
from server.report import ACCURACY_PNG, EPSILON_PNG, REPORT_JSON, ROUNDS_CSV
from simulations.run import simulate
from tests.conftest import TINY_JOB, make_department_frame

pytestmark = pytest.mark.slow

BUDGET = 8.0
SMALL_BUDGET = 0.05  # far below what even one round needs: radiology must decline


PYTHONPATH_AFTER: list[str | None] = []


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    base = tmp_path_factory.mktemp("sim")
    data = base / "departments.csv"
    make_department_frame({"cardiology": 60, "oncology": 48, "radiology": 40}).to_csv(data, index=False)
    out = base / "out"
    rc = {**TINY_JOB, "num-server-rounds": 2, "sim-data": str(data), "sim-epsilon": BUDGET,
          "sim-site-epsilons": f"radiology={SMALL_BUDGET}"}
    # Flower's Ray backend sets the process's PYTHONPATH; the simulation gives it back as it found it
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(base / "not-a-package-dir")
    try:
        report = simulate(rc, out)
        PYTHONPATH_AFTER.append(os.environ.get("PYTHONPATH"))
    finally:
        if before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = before
    return out, report


def test_report_has_every_section(run: tuple[Path, dict[str, Any]]) -> None:
    out, report = run
    assert json.loads((out / REPORT_JSON).read_text()) == report
    assert set(report["departments"]) == {"cardiology", "oncology", "radiology"}
    cardiology = dict(report["departments"]["cardiology"])
    assert isinstance(cardiology.pop("node_id"), int)  # the node it answered from: named by it after a resume
    plan = cardiology.pop("plan")  # its privacy-utility plan, from its first training reply
    assert plan["site"] == "cardiology" and [p["phase"] for p in plan["phases"]] == ["probe", "finetune"]
    assert cardiology == {"n_train": 48, "n_test": 12}
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    for r in report["rounds"]:
        assert r["seconds"] > 0
        assert 0 <= r["global_accuracy"] <= 1
        assert r["aggregate"] == "applied"
        assert set(r["departments"]) == {"cardiology", "oncology", "radiology"}
    final = report["final"]
    assert final["dp"] is True and final["secure_aggregation"] is True
    assert final["delta"] == pytest.approx(1e-5)
    assert 0 <= final["global_accuracy"] <= 1
    assert set(final["epsilon"]) == {"cardiology", "oncology", "radiology"}
    for name in (ROUNDS_CSV, ACCURACY_PNG, EPSILON_PNG):
        assert (out / name).stat().st_size > 0


def test_small_budget_site_declines_and_spends_nothing(run: tuple[Path, dict[str, Any]]) -> None:
    out, report = run
    for r in report["rounds"]:
        dept = r["departments"]["radiology"]
        assert dept["status"] == "declined_budget"
        assert "budget" in dept["reason"].lower()
        assert dept["epsilon"] == 0.0
        assert dept["accuracy"] is not None  # it still evaluates the global model on its own test split
    ledger = LedgerFile(out / "sites" / "radiology" / "ledger.json", "radiology", SMALL_BUDGET, 1e-5, "rdp")
    assert ledger.read().entries == []


def test_ledgers_are_charged_within_budget_and_recomputable(run: tuple[Path, dict[str, Any]]) -> None:
    out, report = run
    for name in ("cardiology", "oncology"):
        path = out / "sites" / name / "ledger.json"
        ledger = LedgerFile(path, name, BUDGET, 1e-5, "rdp").read()
        assert [e.round for e in ledger.entries] == [1, 2]
        for i, entry in enumerate(ledger.entries):
            # Anyone can recompute epsilon from the recorded (sigma, q, steps) with Opacus' accountant.
            recomputed = epsilon_spent(ledger.history[: i + 1], entry.delta, "rdp")
            assert entry.epsilon_after == pytest.approx(recomputed, rel=1e-9)
            assert report["rounds"][i]["departments"][name]["status"] == "trained"
        assert 0.9 * BUDGET < ledger.epsilon <= BUDGET  # the planned noise spends (nearly) the whole budget
        assert report["final"]["epsilon"][name] == pytest.approx(ledger.epsilon)
        assert path.stat().st_mode & 0o777 == 0o600


def test_rerun_into_the_same_directory_is_refused(run: tuple[Path, dict[str, Any]]) -> None:
    from common.errors import ConfigError

    out, _ = run
    before = (out / REPORT_JSON).read_bytes()
    with pytest.raises(ConfigError, match="already holds a run"):
        simulate(dict(TINY_JOB), out)
    assert (out / REPORT_JSON).read_bytes() == before


def test_ledgers_agree_with_opacus_accountants_and_report_states_the_guarantee(
        run: tuple[Path, dict[str, Any]]) -> None:
    from common.accountant_check import AGREEMENT, PRIVACY_UNIT, check_ledger

    out, report = run
    for name in ("cardiology", "oncology"):
        ledger = LedgerFile(out / "sites" / name / "ledger.json", name, BUDGET, 1e-5, "rdp").read()
        checks = check_ledger(ledger.entries, ledger.delta, ledger.accountant)
        assert len(checks) == 2
        for c in checks:
            assert c.relative_difference <= AGREEMENT  # the configured (RDP) accountant agrees within 1 %
            assert 0 < c.prv <= c.rdp  # PRV, reported beside it, is no looser
    privacy = report["final"]["privacy"]
    assert privacy["unit"] == PRIVACY_UNIT and privacy["accountant"] == "rdp"
    assert privacy["epsilon_max"] == pytest.approx(max(e for e in report["final"]["epsilon"].values()))


def test_audit_runs_on_the_simulation_output(run: tuple[Path, dict[str, Any]], capsys: pytest.CaptureFixture) -> None:
    from common.cli import main
    from simulations.audit import AUDIT_JSON, ROC_PNG

    out, report = run
    assert main(["audit", str(out), "--bootstrap", "50"]) == 0
    printed = capsys.readouterr().out
    assert "all departments" in printed and "TPR@1%FPR" in printed and "PRV" in printed
    audit = json.loads((out / AUDIT_JSON).read_text())
    assert (out / ROC_PNG).stat().st_size > 0
    assert set(audit["results"]) == {"cardiology", "oncology", "radiology", "all departments"}
    for name, n in (("cardiology", 48), ("radiology", 32)):
        assert audit["results"][name]["members"] == n
        assert audit["results"][name]["non_members"] == report["departments"][name]["n_test"]
    pooled = audit["results"]["all departments"]
    assert 0 <= pooled["auc_ci"][0] <= pooled["auc"] <= pooled["auc_ci"][1] <= 1
    assert set(audit["accountant_check"]) == {"cardiology", "oncology"}  # radiology declined: no charge, no ledger file
    assert all(c["agrees"] for checks in audit["accountant_check"].values() for c in checks)


def test_the_simulation_leaves_the_processs_pythonpath_as_it_found_it(run: tuple[Path, dict[str, Any]]) -> None:
    """Programs started after a simulation (Debian's docker-compose, another Python's tools) must not import this
    environment's packages: Flower's Ray backend put its sys.path into PYTHONPATH for Ray's workers."""
    out, _ = run
    assert PYTHONPATH_AFTER == [str(out.parent / "not-a-package-dir")]
