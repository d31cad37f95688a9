"""Membership-inference statistics: AUC, TPR at a fixed FPR, bootstrap CIs; bad run directories."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common.cli import main
from simulations.audit import attack, auc_score, roc_curve, tpr_at_fpr


def test_auc_of_separated_identical_and_reversed_scores() -> None:
    low, high = np.arange(100.0), np.arange(100.0) + 1000
    assert auc_score(high, low) == 1.0
    assert auc_score(low, high) == 0.0
    assert auc_score(low, low) == 0.5  # ties count half
    rng = np.random.default_rng(0)
    a, b = rng.normal(1, 1, 4000), rng.normal(0, 1, 4000)
    # Two unit-variance normals one apart: AUC = Phi(1 / sqrt(2)) = 0.760.
    assert auc_score(a, b) == pytest.approx(0.760, abs=0.015)


def test_tpr_at_one_percent_fpr() -> None:
    non_members = np.arange(1000.0)  # the top 10 non-members may score above the threshold
    members = np.array([995.0, 989.5, 989.0, 100.0])
    # threshold = 11th largest non-member = 989; members strictly above it: 995 and 989.5.
    assert tpr_at_fpr(members, non_members, 0.01) == 0.5
    fpr, tpr = roc_curve(members, non_members)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)


def test_attack_on_losses_with_confidence_intervals() -> None:
    rng = np.random.default_rng(1)
    members, non_members = rng.exponential(0.2, 800), rng.exponential(1.0, 200)  # members: lower loss
    result = attack(members, non_members, bootstrap=200, seed=0)
    assert result.auc > 0.7
    assert result.auc_ci[0] < result.auc < result.auc_ci[1]
    assert result.tpr_at_fpr_ci[0] <= result.tpr_at_fpr <= result.tpr_at_fpr_ci[1]
    same = attack(rng.exponential(1.0, 800), rng.exponential(1.0, 800), bootstrap=200, seed=0)
    assert same.auc_ci[0] < 0.5 < same.auc_ci[1]


def test_audit_refuses_what_is_not_a_simulation_output(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["audit", str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert main(["audit", str(tmp_path)]) == 2
    assert "holds no report.json" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing written
