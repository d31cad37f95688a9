"""Ledger cross-check against Opacus' accountants: agreement, detection of a wrong record, PRV beside RDP."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from client.ledger import LedgerFile
from common import privacy
from common.accountant_check import (
    AGREEMENT,
    PRIVACY_UNIT,
    LedgerDisagreementError,
    check_ledger,
    privacy_statement,
    require_agreement,
)
from common.privacy import epsilon_spent, noise_for_budget


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


def test_a_ledger_charged_through_a_corrupted_cache_is_caught(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    real = privacy._rdp_curve

    def halved(q: float, sigma: float, steps: int) -> np.ndarray:
        return real(q, sigma, steps) / 2  # a cache gone wrong: every charge looks half as expensive

    monkeypatch.setattr(privacy, "_rdp_curve", halved)
    ledger = LedgerFile(tmp_path / "ledger.json", "oncology", 50.0, 1e-5, "rdp")
    with ledger.open() as opened:
        ledger.charge(opened, run_id="r", server_round=1, charge=(1.0, 0.1, 20))
    entry = ledger.read().entries[0]
    assert entry.epsilon_after < epsilon_spent([entry.charge], 1e-5, "rdp", fresh=True)
    # The cross-check recomputes from scratch while the cache is still corrupted, and disagrees.
    checks = check_ledger([entry], 1e-5, "rdp", with_prv=False)
    assert checks[0].configured == epsilon_spent([entry.charge], 1e-5, "rdp", fresh=True)
    with pytest.raises(LedgerDisagreementError):
        require_agreement(checks, "oncology")


def test_cached_and_fresh_rdp_agree() -> None:
    history = [(1.0, 0.1, 5), (2.0, 0.05, 30), (0.8, 0.2, 3)]
    assert epsilon_spent(history, 1e-5) == pytest.approx(epsilon_spent(history, 1e-5, fresh=True), rel=1e-12)


def test_recompute_matches_known_values_and_statement_names_the_unit() -> None:
    assert epsilon_spent([], 1e-5, "rdp", fresh=True) == 0.0
    # More noise, less epsilon; more steps, more epsilon (both accountants).
    for mech in ("rdp", "prv"):
        def eps(history: list[tuple[float, float, int]], mech: str = mech) -> float:
            return epsilon_spent(history, 1e-5, mech, fresh=True)

        assert eps([(2.0, 0.1, 5)]) < eps([(1.0, 0.1, 5)])
        assert eps([(1.0, 0.1, 10)]) > eps([(1.0, 0.1, 5)])
    statement = privacy_statement({"a": 2.0, "b": 7.5, "c": None}, 1e-5, "rdp")
    assert statement["unit"] == PRIVACY_UNIT and statement["epsilon_max"] == 7.5
    assert statement["accountant"] == "rdp" and "max epsilon" in statement["guarantee"]
