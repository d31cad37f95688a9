"""Unit tests for common.privacy: epsilon accounting, noise search and budget checks."""

from __future__ import annotations

import itertools
import math
import os
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import RDPAccountant
from opacus.data_loader import DPDataLoader
from torch.utils.data import DataLoader, TensorDataset

from common.errors import BudgetExhaustedError, ConfigError
from common.privacy import (
    MAX_NOISE_MULTIPLIER,
    check_charge,
    epsilon_spent,
    noise_for_budget,
    sample_rate,
    steps_per_round,
)

DELTA = 1e-5

pytestmark = pytest.mark.filterwarnings("ignore:Optimal order is the")


def test_empty_history_spends_nothing() -> None:
    assert epsilon_spent([], DELTA) == 0.0
    assert epsilon_spent((), 1e-3) == 0.0


def test_epsilon_grows_with_steps() -> None:
    values = [epsilon_spent([(1.0, 0.01, n)], DELTA) for n in (1, 10, 100, 1000)]
    assert all(v > 0 for v in values)
    assert values == sorted(values)
    assert len(set(values)) == len(values)


def test_epsilon_shrinks_with_noise() -> None:
    values = [epsilon_spent([(s, 0.02, 100)], DELTA) for s in (0.7, 1.0, 2.0, 5.0)]
    assert all(a > b for a, b in itertools.pairwise(values))


def test_epsilon_composes_over_history() -> None:
    one = epsilon_spent([(1.0, 0.02, 50)], DELTA)
    two = epsilon_spent([(1.0, 0.02, 50), (1.0, 0.02, 50)], DELTA)
    merged = epsilon_spent([(1.0, 0.02, 100)], DELTA)
    assert two > one
    assert two == pytest.approx(merged, rel=1e-12)


@pytest.mark.parametrize(
    "history",
    [
        [(1.0, 0.01, 100)],
        [(0.8, 0.05, 37), (1.3, 0.02, 200)],
        [(2.0, 0.1, 5), (2.0, 0.1, 5), (0.9, 0.004, 1000)],
    ],
)
def test_epsilon_matches_stepped_opacus_accountant(history: list[tuple[float, float, int]]) -> None:
    acc = RDPAccountant()
    for sigma, q, steps in history:
        for _ in range(steps):
            acc.step(noise_multiplier=sigma, sample_rate=q)
    expected = acc.get_epsilon(delta=DELTA)
    assert epsilon_spent(history, DELTA) == pytest.approx(expected, rel=1e-9)


def test_noise_for_budget_hits_budget() -> None:
    budget, q, steps = 2.0, 0.02, 150
    sigma = noise_for_budget(history=[], epsilon_budget=budget, delta=DELTA, q=q, steps=steps)
    eps = epsilon_spent([(sigma, q, steps)], DELTA)
    assert eps <= budget
    assert eps >= 0.98 * budget
    # the search is precise: 0.5% less noise already breaks the budget
    assert epsilon_spent([(sigma * 0.995, q, steps)], DELTA) > budget


def test_noise_for_budget_with_history() -> None:
    history = [(1.1, 0.02, 100), (1.5, 0.05, 40)]
    spent = epsilon_spent(history, DELTA)
    budget = spent + 1.5
    sigma = noise_for_budget(history=history, epsilon_budget=budget, delta=DELTA, q=0.02, steps=100)
    total = epsilon_spent([*history, (sigma, 0.02, 100)], DELTA)
    assert spent < total <= budget
    assert total >= 0.98 * budget
    # the history costs something: the same total budget from scratch needs less noise
    fresh = noise_for_budget(history=[], epsilon_budget=budget, delta=DELTA, q=0.02, steps=100)
    assert sigma > fresh


def test_noise_search_is_precise_in_few_accountant_evaluations(rdp_curves: list[float]) -> None:
    """A round's plan on a site that already trained: Opacus' RDP curve (~0.05-0.1 s each) is computed once for
    the history and a few times for candidates, and the charge's epsilon afterwards costs no new curve."""
    import common.privacy as privacy

    calls = rdp_curves
    q = 64 / 1200
    history = [(0.594, q, 5)]
    sigma = noise_for_budget(history=history, epsilon_budget=8.0, delta=DELTA, q=q, steps=10)
    assert len(calls) <= 10  # bisection alone took 13
    assert epsilon_spent([*history, (sigma, q, 10)], DELTA) <= 8.0
    assert epsilon_spent([*history, (sigma * 0.999, q, 10)], DELTA) > 8.0  # within the 0.1% tolerance
    searched = len(calls)
    check_charge(history, (sigma, q, 10), 8.0, DELTA)  # what the ledger does when it charges
    assert len(calls) == searched
    # the cached curves are read-only: nobody can corrupt a later epsilon through them
    with pytest.raises(ValueError, match="read-only"):
        privacy._rdp_curve(q, 0.594, 5)[0] = 0.0


def test_a_charge_curve_is_opacus_own_for_its_steps() -> None:
    """The cached one-step curve times the steps is exactly (bit for bit) Opacus' curve of the charge."""
    from opacus.accountants.analysis.rdp import compute_rdp

    import common.privacy as privacy

    for q, sigma, steps in ((64 / 1200, 0.65, 10), (0.2, 4.5, 100), (1 / 7, 1.3, 1)):
        ours = privacy._rdp_curve(q, sigma, steps)
        theirs = compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=privacy.RDP_ORDERS)
        assert ours.tolist() == list(theirs)


def test_a_later_round_replans_from_its_last_charge_in_a_few_curves(rdp_curves: list[float]) -> None:
    """Round 3 of a job re-plans the job's last 2 rounds: started from round 2's noise (the hint), the search
    computes at most 3 new curves and its answer is as precise as a search from scratch."""
    q, budget = 64 / 1200, 8.0
    probe = (4.5, 0.2, 100)
    round2 = noise_for_budget(history=[probe], epsilon_budget=budget, delta=DELTA, q=q, steps=30)
    history = [probe, (round2, q, 10)]
    calls = rdp_curves
    epsilon_spent(history, DELTA)  # the ledger's history: its curves are cached before any plan
    before = len(calls)
    sigma = noise_for_budget(history=history, epsilon_budget=budget, delta=DELTA, q=q, steps=20, hint=round2)
    assert len(calls) - before <= 3
    assert epsilon_spent([*history, (sigma, q, 20)], DELTA) <= budget
    assert epsilon_spent([*history, (sigma * 0.999, q, 20)], DELTA) > budget  # within the 0.1% tolerance
    scratch = noise_for_budget(history=history, epsilon_budget=budget, delta=DELTA, q=q, steps=20)
    assert sigma == pytest.approx(scratch, rel=2e-3)


@pytest.mark.parametrize("off", [0.1, 0.98, 1.02, 10.0])
def test_a_wrong_hint_gives_the_search_from_scratch(off: float) -> None:
    q, history = 0.02, [(1.1, 0.02, 100)]
    scratch = noise_for_budget(history=history, epsilon_budget=6.0, delta=DELTA, q=q, steps=100)
    hinted = noise_for_budget(history=history, epsilon_budget=6.0, delta=DELTA, q=q, steps=100,
                              hint=scratch * off)
    assert hinted == scratch


@pytest.mark.parametrize("hint", [0.0, -1.0, MAX_NOISE_MULTIPLIER * 2, math.inf, math.nan])
def test_an_impossible_hint_is_ignored(hint: float) -> None:
    kw = {"history": [], "epsilon_budget": 3.0, "delta": DELTA, "q": 0.05, "steps": 50}
    assert noise_for_budget(**kw, hint=hint) == noise_for_budget(**kw)  # type: ignore[arg-type]


def test_a_hint_does_not_rescue_an_exhausted_budget() -> None:
    history = [(0.5, 0.1, 500)]
    with pytest.raises(BudgetExhaustedError):
        noise_for_budget(history=history, epsilon_budget=1.0, delta=DELTA, q=0.01, steps=10, hint=3.0)


def test_noise_for_budget_more_budget_less_noise() -> None:
    kw = {"history": [], "delta": DELTA, "q": 0.01, "steps": 50}
    assert noise_for_budget(epsilon_budget=1.0, **kw) > noise_for_budget(epsilon_budget=8.0, **kw)


def test_noise_for_budget_tiny_budget_exhausted() -> None:
    with pytest.raises(BudgetExhaustedError):
        noise_for_budget(history=[], epsilon_budget=0.01, delta=DELTA, q=0.1, steps=100)


def test_noise_for_budget_spent_history_exhausted() -> None:
    history = [(0.6, 0.1, 500)]
    budget = epsilon_spent(history, DELTA)  # everything already spent
    with pytest.raises(BudgetExhaustedError, match="spent"):
        noise_for_budget(history=history, epsilon_budget=budget, delta=DELTA, q=0.01, steps=10)


@pytest.mark.parametrize(("budget", "delta"), [(0.0, DELTA), (-1.0, DELTA), (1.0, 0.0), (1.0, 1.0)])
def test_noise_for_budget_invalid_budget(budget: float, delta: float) -> None:
    with pytest.raises(ConfigError):
        noise_for_budget(history=[], epsilon_budget=budget, delta=delta, q=0.01, steps=10)


def test_noise_for_budget_bounded_by_max() -> None:
    sigma = noise_for_budget(history=[], epsilon_budget=0.5, delta=DELTA, q=0.01, steps=10)
    assert 0 < sigma <= MAX_NOISE_MULTIPLIER


# Opacus' RDP computation is slow for large q and large noise (up to ~0.5 s per evaluation, ~20 evaluations
# per search), so by default a small, fixed (derandomized) set of examples runs, keeping the suite's time
# predictable. FEDSILO_HYPOTHESIS_EXAMPLES=N runs N random examples instead.
_EXAMPLES_ENV = os.environ.get("FEDSILO_HYPOTHESIS_EXAMPLES")
PROPERTY_SETTINGS = settings(max_examples=int(_EXAMPLES_ENV or 6), derandomize=_EXAMPLES_ENV is None,
                             deadline=None, database=None)


@PROPERTY_SETTINGS
@given(
    q=st.floats(min_value=0.005, max_value=0.5),
    steps=st.integers(min_value=1, max_value=200),
    budget=st.floats(min_value=0.5, max_value=20.0),
)
def test_noise_for_budget_property(q: float, steps: int, budget: float) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            sigma = noise_for_budget(history=[], epsilon_budget=budget, delta=DELTA, q=q, steps=steps)
        except BudgetExhaustedError:
            # only legitimate when even the largest allowed noise cannot fit
            assert epsilon_spent([(MAX_NOISE_MULTIPLIER, q, steps)], DELTA) > budget
            return
        eps = epsilon_spent([(sigma, q, steps)], DELTA)
    assert sigma > 0
    assert math.isfinite(eps)
    assert eps <= budget


def test_check_charge_within_budget_returns_epsilon() -> None:
    history = [(1.0, 0.02, 50)]
    charge = (1.0, 0.02, 50)
    after = check_charge(history, charge, epsilon_budget=100.0, delta=DELTA)
    assert after == pytest.approx(epsilon_spent([*history, charge], DELTA), rel=1e-12)


def test_check_charge_over_budget() -> None:
    charge = (0.8, 0.1, 200)
    eps = epsilon_spent([charge], DELTA)
    with pytest.raises(BudgetExhaustedError, match="over the site's budget"):
        check_charge([], charge, epsilon_budget=eps * 0.99, delta=DELTA)
    assert check_charge([], charge, epsilon_budget=eps, delta=DELTA) == eps


@pytest.mark.parametrize(("batch", "n"), [(64, 1000), (64, 64), (64, 65), (10, 5), (1, 7), (32, 2985)])
def test_sample_rate_matches_opacus(batch: int, n: int) -> None:
    loader = DataLoader(TensorDataset(torch.zeros(n, 1)), batch_size=batch)
    dp_loader = DPDataLoader.from_data_loader(loader)
    assert sample_rate(batch, n) == pytest.approx(dp_loader.sample_rate, rel=1e-12)
    assert sample_rate(batch, n) == 1 / math.ceil(n / batch)


@pytest.mark.parametrize(("batch", "n"), [(64, 0), (0, 10), (-1, 10)])
def test_sample_rate_invalid(batch: int, n: int) -> None:
    with pytest.raises(ConfigError):
        sample_rate(batch, n)


@pytest.mark.parametrize(
    ("epochs", "q", "expected"), [(0.25, 0.01, 25), (1.0, 0.5, 2), (0.001, 0.5, 1), (1e-9, 1.0, 1)]
)
def test_steps_per_round(epochs: float, q: float, expected: int) -> None:
    steps = steps_per_round(epochs, q)
    assert steps == expected
    assert steps >= 1
