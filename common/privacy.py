"""Privacy accounting math: pure functions over Opacus' accountants. No Flower imports, no I/O.

A site's spending is a history of DP-SGD charges `(noise_multiplier, sample_rate, steps)`; its epsilon at a given
delta is what Opacus' accountant computes for the whole history (composition across rounds and jobs).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from opacus.accountants import RDPAccountant, create_accountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from common.errors import BudgetExhaustedError, ConfigError
from common.preflight import MIN_BATCHES_PER_EPOCH

Charge = tuple[float, float, int]  # (noise multiplier sigma, sample rate q, steps)

MAX_NOISE_MULTIPLIER = 1e4  # beyond this the site declines: the budget is too small to train at all
NOISE_SEARCH_TOLERANCE = 1e-3  # relative precision of the noise search
# A later round's answer lies within about 1.5 tolerances of the job's last noise (that noise is the high end of a
# bracket one tolerance wide; the rounds already charged at it leave a little more for the rest): the search looks
# this many tolerances from it before it searches from scratch
HINT_STEPS = 2
PRV_EPS_ERROR = 0.01  # PRV's numerical error on epsilon (it returns the upper end); Opacus' default


def epsilon_spent(history: Sequence[Charge], delta: float, accountant: str = "rdp", *, fresh: bool = False) -> float:
    """Epsilon of the composition of `history` at `delta` (0 for an empty history): fedsilo's one epsilon
    computation, for planning, charging, reporting and cross-checking.

    RDP (the default) sums Opacus' per-charge RDP curves, cached, and converts them as Opacus' RDPAccountant does.
    `fresh=True`, and every other accountant ('prv', 'gdp'), computes through a new Opacus accountant from the raw
    history instead, sharing nothing with the cache: the ledger cross-check (`common.accountant_check`) uses it so
    that a corrupted cache cannot agree with itself. PRV returns the upper end of its `PRV_EPS_ERROR` interval.
    """
    if not history:
        return 0.0
    if accountant == "rdp" and not fresh:  # Opacus' RDPAccountant.get_privacy_spent, over cached per-charge curves
        rdp = sum([_rdp_curve(float(q), float(s), int(n)) for s, q, n in history])
        return float(get_privacy_spent(orders=RDP_ORDERS, rdp=rdp, delta=delta)[0])
    acc = create_accountant(mechanism=accountant)
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    if accountant == "prv":
        return float(acc.get_epsilon(delta=delta, eps_error=PRV_EPS_ERROR))
    return float(acc.get_epsilon(delta=delta))


RDP_ORDERS = RDPAccountant.DEFAULT_ALPHAS


@functools.lru_cache(maxsize=4096)
def _rdp_step(q: float, sigma: float) -> np.ndarray:
    """Opacus' RDP curve of one step at rate `q` and noise `sigma`, at its default orders (read-only; cached: a
    pure function that costs ~0.05 s per call, and a round evaluates the same (q, sigma) when it plans, charges and
    reports, and in the next rounds' plans)."""
    curve = np.asarray(compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=RDP_ORDERS), dtype=float)
    curve.flags.writeable = False
    return curve


def _rdp_curve(q: float, sigma: float, steps: int) -> np.ndarray:
    """Opacus' RDP curve of one charge: `compute_rdp` returns its one-step curve times `steps`, and so does this
    (the same float products), from the cached one-step curve. Read-only."""
    curve = _rdp_step(q, sigma) * steps
    curve.flags.writeable = False
    return curve


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




@dataclass(frozen=True)
class LocalWork:
    """One round's DP-SGD schedule at a department: expected batch, Poisson sampling rate, steps."""

    batch_size: int  # the plain loader's batch: Opacus samples each row with rate 1 / (number of such batches)
    expected_batch: float
    sample_rate: float
    steps: int


def local_work(n: int, batch_size: int, epochs: float, *, min_steps: int = 1, max_steps: int = 0) -> LocalWork:
    """The schedule for `epochs` of `n` rows at an expected batch of `batch_size` (at most n / 4), within
    [`min_steps`, `max_steps`] steps (`max_steps` 0: unbounded)."""
    if n < 1:
        raise ConfigError("A department needs at least one training example.")
    batch = max(1, min(batch_size, n // MIN_BATCHES_PER_EPOCH))
    q = sample_rate(batch, n)
    steps = max(min_steps, steps_per_round(epochs, q))
    if max_steps:
        steps = min(max_steps, steps)
    return LocalWork(batch_size=batch, expected_batch=q * n, sample_rate=q, steps=steps)


def noise_for_budget(*, history: Sequence[Charge], epsilon_budget: float, delta: float, q: float, steps: int,
                     accountant: str = "rdp", hint: float | None = None) -> float:
    """Smallest noise multiplier (within tolerance) such that `history` plus `steps` more steps at rate `q`
    stays within `epsilon_budget`. Raises `BudgetExhaustedError` if no noise up to MAX_NOISE_MULTIPLIER fits.

    `hint`: a noise multiplier likely within `HINT_STEPS` tolerances of the answer (the job's last charge at this
    rate: a later round of a job re-plans the same rest of the job, so its answer moves by about the tolerance).
    The search steps from it one tolerance at a time, which costs 1-3 candidate curves instead of about ten;
    where the answer is not that near, the search is the same as without a hint.
    """
    if epsilon_budget <= 0 or not 0 < delta < 1:
        raise ConfigError(f"Invalid privacy budget: epsilon={epsilon_budget}, delta={delta}.")

    def eps(sigma: float) -> float:  # the history's RDP curves are cached: only the candidate's is computed
        return epsilon_spent([*history, (sigma, q, steps)], delta, accountant)

    bracket = _bracket_near(hint, eps, epsilon_budget) if hint is not None else None
    if bracket is None:
        bracket = _bracket(eps, epsilon_budget)
        if bracket is None:
            spent = epsilon_spent(history, delta, accountant)
            raise BudgetExhaustedError(
                f"Budget epsilon={epsilon_budget:g} (spent {spent:.4g}) cannot cover {steps} more steps at "
                f"sample rate {q:.4g}, even with noise multiplier {MAX_NOISE_MULTIPLIER:g}."
            )
    (low, e_low), (high, e_high) = bracket
    # Invariant: eps(low) > budget >= eps(high). Illinois false position on log epsilon against log sigma (nearly
    # linear there), bisection while the low end's epsilon is infinite and every fourth step (so the bracket at
    # least halves every four evaluations, whatever the curve's shape); both ends close in on the root.
    stale = 0  # +1: the low end moved last time, -1: the high end did; the end left behind is down-weighted
    f_low, f_high = _log_gap(e_low, epsilon_budget), _log_gap(e_high, epsilon_budget)
    step = 0
    while high - low > NOISE_SEARCH_TOLERANCE * high * (1 + 1e-9):  # (a bracket of one tolerance is done)
        step += 1
        x = (low + high) / 2
        if step % 4 and low > 0 and math.isfinite(f_low) and f_low != f_high:
            u_low, u_high = math.log(low), math.log(high)
            guess = math.exp(u_high - f_high * (u_high - u_low) / (f_high - f_low))
            if low < guess < high:
                x = guess
        e = eps(x)
        if e > epsilon_budget:
            low, f_low = x, _log_gap(e, epsilon_budget)
            if stale == 1:
                f_high /= 2
            stale = 1
        else:
            high, f_high = x, _log_gap(e, epsilon_budget)
            if stale == -1:
                f_low /= 2
            stale = -1
    return high


Point = tuple[float, float]  # (noise multiplier, epsilon)


def _bracket(eps: Callable[[float], float], budget: float) -> tuple[Point, Point] | None:
    """(low, high) noise with eps(low) > budget >= eps(high), from 1 doubling up (low 0: epsilon infinite);
    None when no noise up to MAX_NOISE_MULTIPLIER fits."""
    high = 1.0
    e_high = eps(high)
    while e_high > budget:
        high *= 2
        if high > MAX_NOISE_MULTIPLIER:
            return None
        e_high = eps(high)
    low = 0.0 if high == 1.0 else high / 2
    return (low, math.inf if low == 0.0 else eps(low)), (high, e_high)


def _bracket_near(hint: float, eps: Callable[[float], float], budget: float) -> tuple[Point, Point] | None:
    """A bracket one tolerance wide, found by stepping one tolerance at a time from `hint` (down while the budget
    holds, up while it does not) for at most `HINT_STEPS` steps; None when the answer is not that near."""
    if not 0 < hint <= MAX_NOISE_MULTIPLIER:
        return None
    here = (hint, eps(hint))
    direction = -1 if here[1] <= budget else 1
    for _ in range(HINT_STEPS):
        sigma = here[0] * (1 + direction * NOISE_SEARCH_TOLERANCE)
        if sigma > MAX_NOISE_MULTIPLIER:
            return None
        there = (sigma, eps(sigma))
        if (there[1] <= budget) != (here[1] <= budget):  # the answer lies between: (infeasible, feasible)
            return (there, here) if direction < 0 else (here, there)
        here = there
    return None


def _log_gap(epsilon: float, budget: float) -> float:
    return math.log(epsilon) - math.log(budget) if epsilon > 0 else -math.inf


def check_charge(history: Sequence[Charge], charge: Charge, epsilon_budget: float, delta: float,
                 accountant: str = "rdp") -> float:
    """Epsilon after adding `charge`; raises `BudgetExhaustedError` if it would exceed the budget."""
    after = epsilon_spent([*history, charge], delta, accountant)
    if not math.isfinite(after) or after > epsilon_budget:
        raise BudgetExhaustedError(
            f"This round would bring epsilon to {after:.4g}, over the site's budget {epsilon_budget:g}."
        )
    return after
