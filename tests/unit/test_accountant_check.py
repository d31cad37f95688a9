"""Ledger cross-check against Opacus' accountants: agreement, detection of a wrong record, PRV beside RDP."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from client.ledger import LedgerFile
from common.accountant_check import (
    AGREEMENT,
    PRIVACY_UNIT,
    LedgerDisagreementError,
    check_ledger,
    privacy_statement,
    recompute,
    require_agreement,
)
from common.privacy import noise_for_budget


def _ledger(tmp_path: Path) -> LedgerFile:
    ledger = LedgerFile(tmp_path / "ledger.json", "oncology", 8.0, 1e-5, "rdp")
    with ledger.open() as opened:
        for rnd in (1, 2, 3):
            sigma = noise_for_budget(history=opened.history, epsilon_budget=8.0, delta=1e-5, q=1 / 6,
                                     steps=3 * (4 - rnd))
            ledger.charge(opened, run_id="r", server_round=rnd, charge=(sigma, 1 / 6, 3))
    return ledger


def test_a_ledger_agrees_with_its_accountant_and_prv_is_reported(tmp_path: Path) -> None:
    entries = _ledger(tmp_path).read().entries
    checks = check_ledger(entries, 1e-5, "rdp")
    assert [c.round for c in checks] == [1, 2, 3]
    for c, e in zip(checks, entries, strict=True):
        assert c.recorded == e.epsilon_after
        assert c.configured == c.rdp
        assert c.relative_difference <= AGREEMENT
        assert 0 < c.prv < c.rdp  # PRV is tighter than RDP for these mechanisms
    assert checks[-1].recorded == pytest.approx(8.0, rel=0.05)
    require_agreement(checks, "oncology")


def test_a_wrong_record_is_caught(tmp_path: Path) -> None:
    entries = _ledger(tmp_path).read().entries
    tampered = [*entries[:-1], replace(entries[-1], epsilon_after=entries[-1].epsilon_after * 0.95)]
    checks = check_ledger(tampered, 1e-5, "rdp", with_prv=False)
    assert checks[-1].relative_difference == pytest.approx(0.05, rel=1e-3)
    with pytest.raises(LedgerDisagreementError, match="round 3 records epsilon"):
        require_agreement(checks, "oncology")


def test_recompute_matches_known_values_and_statement_names_the_unit() -> None:
    assert recompute([], 1e-5, "rdp") == 0.0
    # More noise, less epsilon; more steps, more epsilon (both accountants).
    for mech in ("rdp", "prv"):
        assert recompute([(2.0, 0.1, 5)], 1e-5, mech) < recompute([(1.0, 0.1, 5)], 1e-5, mech)
        assert recompute([(1.0, 0.1, 10)], 1e-5, mech) > recompute([(1.0, 0.1, 5)], 1e-5, mech)
    statement = privacy_statement({"a": 2.0, "b": 7.5, "c": None}, 1e-5, "rdp")
    assert statement["unit"] == PRIVACY_UNIT and statement["epsilon_max"] == 7.5
    assert statement["accountant"] == "rdp" and "max epsilon" in statement["guarantee"]
