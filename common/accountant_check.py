"""Cross-check of a privacy ledger against Opacus' accountants. Pure functions, no Flower, no I/O.

Every ledger charge records (sigma, q, steps, delta) and the epsilon the site computed after it. Anyone can
recompute that epsilon from the recorded parameters with a fresh Opacus accountant (`common.privacy.epsilon_spent`
with `fresh=True`: it shares nothing with the cached curves the site charged with, so a corrupted cache is caught):
the configured one (the ledger's, RDP by default) must agree within `AGREEMENT`; PRV (Opacus' numerical
privacy-loss-distribution accountant, an upper bound within its `eps_error`) is reported beside it: it is usually
tighter than RDP, so a smaller PRV epsilon is expected and is not a disagreement.

The guarantee is record-level: the privacy unit is one record (example) of one department. Each record belongs to
exactly one department, and a department's updates depend only on its own records, so the released global model
is (max over departments of epsilon, delta)-DP for any one record.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from common.errors import PrivacyError
from common.privacy import Charge, epsilon_spent

AGREEMENT = 0.01  # the ledger's epsilon and the configured accountant's recomputation agree within 1 %
PRIVACY_UNIT = "one record (example) of one department"
GUARANTEE = ("record-level (epsilon, delta)-DP per department, by DP-SGD on site; each record belongs to one "
             "department, so the released model is (max epsilon, delta)-DP for any one record")


class LedgerDisagreementError(PrivacyError):
    """A ledger's recorded epsilon differs from what its configured accountant recomputes."""


@dataclass(frozen=True)
class ChargeCheck:
    run_id: str
    round: int
    sigma: float
    sample_rate: float
    steps: int
    recorded: float  # epsilon after this charge, as the ledger recorded it
    configured: float  # recomputed with the ledger's own accountant
    rdp: float
    prv: float

    @property
    def relative_difference(self) -> float:
        """|recorded - configured| / configured (0 when both are 0)."""
        if self.configured == 0:
            return 0.0 if self.recorded == 0 else math.inf
        return abs(self.recorded - self.configured) / self.configured

    @property
    def agrees(self) -> bool:
        return self.relative_difference <= AGREEMENT


def check_ledger(entries: Sequence[Any], delta: float, accountant: str, *, with_prv: bool = True) -> list[ChargeCheck]:
    """Recompute epsilon after every charge of a ledger (entries with run_id, round, noise_multiplier,
    sample_rate, steps, epsilon_after) with the configured accountant, RDP and (unless `with_prv` is False, as
    PRV takes seconds per charge) PRV; a skipped PRV is NaN."""
    history: list[Charge] = []
    checks = []
    for e in entries:
        history.append((e.noise_multiplier, e.sample_rate, e.steps))
        rdp = epsilon_spent(history, delta, "rdp", fresh=True)
        prv = epsilon_spent(history, delta, "prv", fresh=True) if with_prv or accountant == "prv" else math.nan
        configured = {"rdp": rdp, "prv": prv}.get(accountant)
        if configured is None or math.isnan(configured):
            configured = epsilon_spent(history, delta, accountant, fresh=True)
        checks.append(ChargeCheck(run_id=e.run_id, round=e.round, sigma=e.noise_multiplier,
                                  sample_rate=e.sample_rate, steps=e.steps, recorded=e.epsilon_after,
                                  configured=configured, rdp=rdp, prv=prv))
    return checks


def require_agreement(checks: Sequence[ChargeCheck], site: str) -> None:
    """Fail closed: raise if any charge's recorded epsilon is off by more than AGREEMENT."""
    bad = [c for c in checks if not c.agrees]
    if bad:
        c = bad[0]
        raise LedgerDisagreementError(
            f"Site {site}: ledger charge of run {c.run_id} round {c.round} records epsilon {c.recorded:.6g}, but "
            f"the configured accountant recomputes {c.configured:.6g} ({100 * c.relative_difference:.3g}% off, "
            f"more than {100 * AGREEMENT:g}%)."
        )


def privacy_statement(epsilons: dict[str, float | None], delta: float | None, accountant: str) -> dict[str, Any]:
    """What a run's report says about its guarantee: the unit, the accountant, and the resulting (max eps, delta)."""
    spent = [e for e in epsilons.values() if e is not None]
    return {"unit": PRIVACY_UNIT, "accountant": accountant, "guarantee": GUARANTEE, "delta": delta,
            "epsilon_per_department": epsilons, "epsilon_max": max(spent) if spent else None}
