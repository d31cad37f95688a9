"""The bench's plan of runs: variants measured in separate simulations alternate so drifting load hits both."""

from __future__ import annotations

from simulations.bench import FULL, QUICK, secagg_order


def test_secagg_variants_run_in_abba_order() -> None:
    assert secagg_order(1) == [False, True]
    assert secagg_order(2) == [False, True, True, False]
    assert secagg_order(3) == [False, True, True, False, False, True]
    for setup in (FULL, QUICK):  # every variant equally often
        order = secagg_order(setup.secagg_runs)
        assert order.count(True) == order.count(False) == setup.secagg_runs
