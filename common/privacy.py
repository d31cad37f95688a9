"""Privacy accounting math: pure functions over Opacus' accountants. No Flower imports, no I/O.

A site's spending is a history of DP-SGD charges `(noise_multiplier, sample_rate, steps)`; its epsilon at a given
delta is what Opacus' accountant computes for the whole history (composition across rounds and jobs).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from opacus.accountants import RDPAccountant, create_accountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from common.errors import BudgetExhaustedError, ConfigError

Charge = tuple[float, float, int]  # (noise multiplier sigma, sample rate q, steps)

MAX_NOISE_MULTIPLIER = 1e4  # beyond this the site declines: the budget is too small to train at all
NOISE_SEARCH_TOLERANCE = 1e-3  # relative precision of the noise search


def epsilon_spent(history: Sequence[Charge], delta: float, accountant: str = "rdp") -> float:
    """Epsilon of the composition of `history` at `delta` (0 for an empty history)."""
    if not history:
        return 0.0
    acc = create_accountant(mechanism=accountant)
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return float(acc.get_epsilon(delta=delta))


def _extended_epsilon(history: Sequence[Charge], delta: float, accountant: str, q: float,
                      steps: int) -> Callable[[float], float]:
    """sigma -> epsilon of `history` plus `steps` steps at (sigma, q).

    For RDP the history's RDP curve is computed once and the candidate's added to it: exactly the sum that
    Opacus' RDPAccountant forms, without recomputing the history for every candidate.
    """
    if accountant != "rdp":
        return lambda sigma: epsilon_spent([*history, (sigma, q, steps)], delta, accountant)
    orders = RDPAccountant.DEFAULT_ALPHAS
    base = np.zeros(len(orders))
    for s, rate, n in history:
        base = base + compute_rdp(q=rate, noise_multiplier=s, steps=n, orders=orders)

    def eps(sigma: float) -> float:
        rdp = base + compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders)
        return float(get_privacy_spent(orders=orders, rdp=rdp, delta=delta)[0])

    return eps


def sample_rate(batch_size: int, n_examples: int) -> float:
    """Poisson sampling rate for an expected batch of about `batch_size`.

    Exactly what Opacus' `DPDataLoader.from_data_loader` uses: 1 / (number of batches of the plain loader).
    """
    if n_examples < 1:
        raise ConfigError("A department needs at least one training example.")
    if batch_size < 1:
        raise ConfigError(f"The batch size must be positive, got {batch_size}.")
    return 1 / math.ceil(n_examples / batch_size)


def steps_per_round(local_epochs: float, q: float) -> int:
    """Optimizer steps that visit `local_epochs` of the data in expectation (at least one)."""
    return max(1, round(local_epochs / q))


def noise_for_budget(*, history: Sequence[Charge], epsilon_budget: float, delta: float, q: float, steps: int,
                     accountant: str = "rdp") -> float:
    """Smallest noise multiplier (within tolerance) such that `history` plus `steps` more steps at rate `q`
    stays within `epsilon_budget`. Raises `BudgetExhaustedError` if no noise up to MAX_NOISE_MULTIPLIER fits.
    """
    if epsilon_budget <= 0 or not 0 < delta < 1:
        raise ConfigError(f"Invalid privacy budget: epsilon={epsilon_budget}, delta={delta}.")

    eps = _extended_epsilon(history, delta, accountant, q, steps)

    high = 1.0
    while eps(high) > epsilon_budget:
        high *= 2
        if high > MAX_NOISE_MULTIPLIER:
            spent = epsilon_spent(history, delta, accountant)
            raise BudgetExhaustedError(
                f"Budget epsilon={epsilon_budget:g} (spent {spent:.4g}) cannot cover {steps} more steps at "
                f"sample rate {q:.4g}, even with noise multiplier {MAX_NOISE_MULTIPLIER:g}."
            )
    low = 0.0 if high == 1.0 else high / 2
    while high - low > NOISE_SEARCH_TOLERANCE * high:
        mid = (low + high) / 2
        if eps(mid) > epsilon_budget:
            low = mid
        else:
            high = mid
    return high


def check_charge(history: Sequence[Charge], charge: Charge, epsilon_budget: float, delta: float,
                 accountant: str = "rdp") -> float:
    """Epsilon after adding `charge`; raises `BudgetExhaustedError` if it would exceed the budget."""
    after = epsilon_spent([*history, charge], delta, accountant)
    if not math.isfinite(after) or after > epsilon_budget:
        raise BudgetExhaustedError(
            f"This round would bring epsilon to {after:.4g}, over the site's budget {epsilon_budget:g}."
        )
    return after
