"""The bench's plan of runs: variants measured in separate simulations alternate so drifting load hits both."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest

from common.errors import ConfigError
from simulations.bench import FULL, QUICK, SimSetup, secagg_order

# what simulations.machine.describe() returns (the real one asks the platform, which may start `uname`)
MACHINE = {"cpu": "Test CPU", "cpu_cores": 2, "memory_gib": 8.0, "gpu": None, "device": "cpu", "torch_threads": 2,
           "load_average": [0.5, 0.5, 0.5], "python": "3.11.0", "torch": "2.13.0", "platform": "Linux-test",
           "time_utc": "2026-12-07T00:00:00Z"}


def test_secagg_variants_run_in_abba_order() -> None:
    assert secagg_order(1) == [False, True]
    assert secagg_order(2) == [False, True, True, False]
    assert secagg_order(3) == [False, True, True, False, False, True]
    for setup in (FULL, QUICK):  # every variant equally often
        order = secagg_order(setup.secagg_runs)
        assert order.count(True) == order.count(False) == setup.secagg_runs


def test_overhead_section_renders_old_and_new_bench_json() -> None:
    """A bench.json written before the overhead part measured several department sizes still renders (a later
    `--only PART` rewrites the docs from it), beside the new form."""
    from simulations.bench import bench_markdown

    setup = {"model": "minilm", "departments": 2, "rows": 1500, "rounds": 3, "batch": 64, "local_epochs": 0.25,
             "max_length": 64}
    when = {"bench_seconds": 80.0, "load_average": [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]], "repeats": 2,
            "measured_utc": "2026-11-23T04:50:10Z"}
    row = {"setup": setup, "overhead_fraction": 0.151, "fit_seconds": 17.6, "train_seconds_max": 15.0}
    for overhead in ({**row, **when}, {"rows": [row, {**row, "setup": {**setup, "rows": 3700},
                                                      "overhead_fraction": 0.05}], **when}):
        text = bench_markdown({"machine": MACHINE, "quick": False, "overhead": overhead}, only_part="overhead")
        # 0.25 epoch of 1200 rows would be 5 steps: a department takes at least min-local-steps (10)
        assert "| 1200 | 10 | 17.60 | 15.00 | 15.1% (goal <= 5%: missed) |" in text
    assert "| 2960 | 12 | 17.60 | 15.00 | 5.0% (goal <= 5%: met) |" in text
    assert "engine looks" not in text  # a bench.json from before the engine's poll was set
    text = bench_markdown({"machine": MACHINE, "quick": False, "overhead": {**overhead, "queue_poll_seconds": 0.01}},
                          only_part="overhead")
    assert "looks for each department's next message every 0.01 s (Flower's own wait: 0.1 s" in text


def test_sim_setups_take_keywords_and_check_themselves() -> None:
    kwargs = {"model": "tiny-random", "departments": 2, "rows": 30, "rounds": 2, "batch": 8, "local_epochs": 0.5,
              "max_length": 16}
    assert asdict(SimSetup(**kwargs)) == kwargs
    with pytest.raises(TypeError):
        SimSetup("tiny-random", 2, 30, 2, 8, 0.5, 16)  # type: ignore[misc]
    for bad, message in (({"departments": 0}, "'departments' must be at least 1"),
                         ({"local_epochs": 0.0}, "'local_epochs' must be positive"),
                         ({"rows": 2.5}, "'rows' must be an integer"),
                         ({"max_length": 1000}, "'max_length' must be in")):
        with pytest.raises(ConfigError, match=message):
            SimSetup(**{**kwargs, **bad})
    for setup in (FULL, QUICK):
        assert all(isinstance(s, SimSetup) for s in (*setup.secagg, *setup.overhead, setup.scale))
    assert [s.departments for s in FULL.secagg] == [4, 10]
    assert [s.rows for s in FULL.overhead] == [1500, 3700]
    assert (QUICK.secagg[0].departments, QUICK.overhead[0].departments, QUICK.scale.departments) == (3, 2, 4)


def _deployed_round(n: int, seconds: float, fit: float, status: str = "trained") -> dict:
    return {"round": n, "seconds": seconds, "fit_seconds": fit, "aggregate": "applied", "errors": [],
            "departments": {"dept000": {"status": "trained", "train_seconds": 1.0},
                            "dept001": {"status": status, "train_seconds": 2.0}}}


def test_deploy_rounds_need_every_department_trained_and_render() -> None:
    from simulations.bench import BenchError, _deploy_rounds, bench_markdown

    rounds = _deploy_rounds({"rounds": [_deployed_round(1, 30.0, 20.0), _deployed_round(2, 12.0, 7.0)]}, "t")
    assert rounds[1] == {"round": 2, "round_seconds": 12.0, "fit_seconds": 7.0, "evaluate_seconds": 5.0,
                         "train_seconds_max": 2.0}
    with pytest.raises(BenchError, match=r"deployed job t: round 2: .*'dept001': 'declined_budget'"):
        _deploy_rounds({"rounds": [_deployed_round(1, 30.0, 20.0), _deployed_round(2, 12.0, 7.0,
                                                                                     "declined_budget")]}, "t")
    deploy = {"setup": asdict(QUICK.deploy), "exchanges_per_round": {"plain": 2, "secagg": 5},
              "plain_round_seconds": 12.0, "plain_fit_seconds": 7.0, "plain_evaluate_seconds": 5.0,
              "plain_train_seconds_max": 2.0, "secagg_round_seconds": 27.0, "secagg_fit_seconds": 22.0,
              "secagg_evaluate_seconds": 5.0, "secagg_train_seconds_max": 2.0, "ratio": 2.25,
              "exchange_seconds": 5.0, "secagg_stage_seconds": 5.0, "bench_seconds": 200.0,
              "load_average": [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]], "repeats": 2, "measured_utc": "2026-12-07T14:00:00Z"}
    text = bench_markdown({"machine": MACHINE, "quick": True, "deploy": deploy}, only_part="deploy")
    assert "warm_worker = false" not in text  # no cold row in a bench.json without one
    deploy |= {"cold": {"round_seconds": 24.0, "fit_seconds": 14.0, "evaluate_seconds": 10.0}, "warm_speedup": 2.0}
    cold = bench_markdown({"machine": MACHINE, "quick": True, "deploy": deploy}, only_part="deploy")
    assert "| plain, a fresh process per message (`warm_worker = false`) | 24.00 | 14.00 | 10.00 | |" in cold
    assert "The warm worker makes a plain round 2.00x faster" in cold
    assert "### Real deployment on loopback" in text
    assert "| plain | 12.00 | 7.00 | 5.00 | 2.00 |" in text and "| SecAgg+ | 27.00 | 22.00 | 5.00 | 2.00 |" in text
    assert "SecAgg+ / plain round: 2.25." in text and "each SecAgg+ stage adds 5.00 s" in text


def test_deploy_part_is_measured_only_when_named(tmp_path: Path) -> None:
    from simulations.bench import ALL_PARTS, PARTS, run_bench

    assert "deploy" in ALL_PARTS and "deploy" not in PARTS
    with pytest.raises(ConfigError, match="choose from dp, secagg, overhead, comm, scale, deploy"):
        run_bench(tmp_path / "b", quick=True, only=["deploy", "nope"])
    # round 1 is the probe round: the medians are over rounds 2.. (fine-tuning), one of them in the quick form
    assert QUICK.deploy.rounds >= 2 and FULL.deploy.rounds >= 3 and FULL.deploy.runs == 2
