"""`fedsilo bench --quick` and `fedsilo study utility` on tiny setups: they run and write valid output.

No timing assertions: benchmarks print figures, they are not timed tests.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from common.cli import main
from common.errors import ConfigError
from simulations.bench import BENCH_JSON, BENCH_MD, PARTS
from simulations.study import STUDY_JSON, STUDY_MD, UTILITY_PNG, run_study
from tests.conftest import TINY_JOB, make_department_frame

pytestmark = pytest.mark.slow


def _positive(x: object) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


@pytest.mark.timeout(1800)  # five small simulations: minutes on an idle CI machine, far more on a shared one
def test_bench_quick_writes_every_part(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    docs = tmp_path / "docs" / "benchmarks.md"
    assert main(["bench", "--quick", "--out", str(out), "--docs", str(docs)]) == 0
    result = json.loads((out / BENCH_JSON).read_text())
    assert result["quick"] is True and result["parts"] == list(PARTS)
    assert result["machine"]["cpu_cores"] >= 1
    dp = result["dp"]
    assert set(dp["variants"]) == {"non-private", "hooks", "functorch", "ghost"}
    for v in dp["variants"].values():
        assert _positive(v["step_seconds"]) and v["peak_bytes"] >= 0
    for mode in dp["equivalence"]["modes"].values():
        assert mode["clipped_sum_relative_error"] < 1e-4  # same clipped sum in every mode (same batch, no noise)
        assert 0.8 < mode["noise_std_ratio"] < 1.2  # noise std sigma*C/B (2k values: a few % of sampling error)
    for row in result["secagg"]["rows"]:
        assert _positive(row["on"]["fit_seconds"]) and _positive(row["off"]["fit_seconds"])
        assert _positive(row["ratio"])
    assert [0 <= row["overhead_fraction"] < 1 for row in result["overhead"]["rows"]] == [True]
    comm = result["comm"]
    assert 0 < comm["lora"]["bytes_plain"] < comm["full"]["bytes_plain"]
    assert comm["lora"]["bytes_secagg"] > comm["lora"]["bytes_plain"]  # masked ints are wider than float32
    scale = result["scale"]
    assert len(scale["peak_bytes_per_round"]) == scale["setup"]["rounds"]
    assert all(_positive(p) for p in scale["peak_bytes_per_round"])
    table = (out / BENCH_MD).read_text()
    assert "DP-SGD step cost" in table and "SecAgg+" in table and "Scale" in table
    assert "fedsilo:bench-dp:start" in docs.read_text() and "fedsilo:bench-scale:start" in docs.read_text()
    # an existing bench is never overwritten without naming the parts to remeasure
    assert main(["bench", "--quick", "--out", str(out)]) == 2
    assert json.loads((out / BENCH_JSON).read_text()) == result
    # naming a part remeasures it in the same --out (its earlier simulations stay where they are) and keeps the rest
    assert main(["bench", "--quick", "--out", str(out), "--only", "overhead"]) == 0
    again = json.loads((out / BENCH_JSON).read_text())
    assert again["overhead"]["measured_utc"] >= result["overhead"]["measured_utc"]
    assert again["overhead"]["bench_seconds"] != result["overhead"]["bench_seconds"]
    assert {k: v for k, v in again.items() if k != "overhead"} == {k: v for k, v in result.items() if k != "overhead"}


@pytest.mark.timeout(1800)  # real SuperLinks and SuperNodes: 3 jobs of 3 rounds (warm worker; and a fresh process)
def test_bench_deploy_quick_measures_a_real_deployment(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    docs = tmp_path / "docs" / "benchmarks.md"
    assert main(["bench", "--quick", "--out", str(out), "--only", "deploy", "--docs", str(docs)]) == 0
    result = json.loads((out / BENCH_JSON).read_text())
    assert result["parts"] == ["deploy"]
    deploy = result["deploy"]
    for key in ("plain_round_seconds", "secagg_round_seconds", "ratio", "plain_fit_seconds", "secagg_fit_seconds",
                "exchange_seconds", "plain_evaluate_seconds", "secagg_evaluate_seconds"):
        assert _positive(deploy[key]), key
    assert all(_positive(deploy["cold"][k]) for k in ("round_seconds", "fit_seconds", "evaluate_seconds"))
    assert deploy["warm_speedup"] == deploy["cold"]["round_seconds"] / deploy["plain_round_seconds"]
    assert math.isfinite(deploy["secagg_stage_seconds"])  # a difference of medians: may be <= 0 on a loaded machine
    assert deploy["ratio"] == deploy["secagg_round_seconds"] / deploy["plain_round_seconds"]
    for secagg in ("plain", "secagg"):
        (run,) = deploy["runs"][secagg]
        assert [r["round"] for r in run["rounds"]] == [1, 2, 3]
    assert "### Real deployment on loopback" in (out / BENCH_MD).read_text()
    text = docs.read_text()
    assert "fedsilo:bench-deploy:start" in text and "fedsilo:bench-deploy:end" in text
    assert "SecAgg+ / plain round:" in text and "a fresh process per message (`warm_worker = false`)" in text


def test_bench_rejects_unknown_parts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--quick", "--out", str(tmp_path / "b"), "--only", "nope"]) == 2
    assert "fedsilo: error: Unknown bench part" in capsys.readouterr().err
    assert not (tmp_path / "b" / BENCH_JSON).exists()


def test_utility_study_on_a_tiny_setup(tmp_path: Path) -> None:
    data = tmp_path / "departments.csv"
    make_department_frame({"cardiology": 40, "oncology": 32}).to_csv(data, index=False)
    rc = {**TINY_JOB, "num-server-rounds": 2, "sim-data": str(data)}
    grid = {"learning-rate": [0.02, 0.05]}  # two points: every arm tunes on its training rows, then runs once
    study = run_study(rc, tmp_path / "study", epsilons=[8.0], grid=grid)
    saved = json.loads((tmp_path / "study" / STUDY_JSON).read_text())
    assert [a["name"] for a in saved["arms"]] == ["centralized", "federated", "federated-dp-eps8"]
    assert saved["grid"] == grid and len(saved["trials"]) == 6
    assert all(0 <= t["validation_accuracy"] <= 1 and t["seconds"] > 0 for t in saved["trials"])
    budget = saved["budget"]
    assert budget["probe_rounds"] == 1 and budget["finetune_rounds"] == 1
    assert budget["total_steps"] == sum(d["steps_per_round"] for d in budget["departments"].values())
    for arm in saved["arms"]:
        assert 0 <= arm["global_accuracy"] <= 1
        assert set(arm["departments"]) == {"cardiology", "oncology"}
        assert arm["point"] == saved["chosen"][arm["name"]]["values"]
        assert arm["head_examples"] > 0  # every arm starts from a head trained alone
        # one compute budget for every arm, in examples (the centralized arm's batches: to half a batch)
        assert abs(sum(arm["examples"].values()) - budget["examples"]) <= 4
    assert set(saved["arms"][1]["examples"]) == {"cardiology", "oncology"}
    assert 0 < saved["majority"]["accuracy"] < 1
    assert set(saved["goals"]) == {"dp_eps8_gap_points", "federated_gap_points", "dp_eps8_above_majority_points"}
    assert saved["arms"][2]["epsilon_spent"]["cardiology"] <= 8.0
    assert (tmp_path / "study" / UTILITY_PNG).stat().st_size > 0
    table = (tmp_path / "study" / STUDY_MD).read_text()
    assert "| federated-dp-eps8 | 8 |" in table and "not included in the epsilons" in table
    assert study.arm("centralized") is not None
    # --resume with every trial and arm done runs nothing and keeps the results
    again = run_study(rc, tmp_path / "study", epsilons=[8.0], grid=grid, resume=True)
    assert [a.global_accuracy for a in again.arms] == [a["global_accuracy"] for a in saved["arms"]]
    assert len(again.trials) == 6
    with pytest.raises(ConfigError, match="already holds a study"):
        run_study(rc, tmp_path / "study", epsilons=[8.0], grid=grid)
    # --render rewrites the table and the docs section from study.json without running anything
    docs = tmp_path / "docs" / "benchmarks.md"
    assert main(["study", "utility", "--out", str(tmp_path / "study"), "--render", "--docs", str(docs)]) == 0
    assert "| federated-dp-eps8 | 8 |" in docs.read_text() and (docs.parent / "utility-departments.png").is_file()
    assert "<!-- fedsilo:study-departments:start -->" in docs.read_text()
    assert main(["study", "utility", "--out", str(tmp_path / "none"), "--render"]) == 2
    with pytest.raises(ConfigError, match="sets dp"):
        run_study({**rc, "dp": False}, tmp_path / "other")
