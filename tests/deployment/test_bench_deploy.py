"""`fedsilo bench --quick --only deploy`: a real TLS SuperLink and SuperNodes on loopback, measured and written.

No timing assertions: benchmarks print figures, they are not timed tests.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from common.cli import main
from simulations.bench import BENCH_JSON, BENCH_MD

pytestmark = pytest.mark.slow


def _positive(x: object) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


@pytest.mark.timeout(1800)  # real SuperLinks and SuperNodes: 3 jobs of 2 rounds (warm worker; and a fresh process)
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
        assert [r["round"] for r in run["rounds"]] == [1, 2]
    # the cold job ran on the same sites after they switched their warm worker off: no worker was started for it
    (deployment,) = out.glob("work/*/deploy")
    for site in (deployment / "sites").iterdir():
        assert len(list((site / ".fedsilo-workers").glob("run-*.log"))) == 2, site.name  # the two warm jobs'
        assert "warm_worker = false" in (site / "site.toml").read_text()
    assert "### Real deployment on loopback" in (out / BENCH_MD).read_text()
    text = docs.read_text()
    assert "fedsilo:bench-deploy:start" in text and "fedsilo:bench-deploy:end" in text
    assert "SecAgg+ / plain round:" in text and "a fresh process per message (`warm_worker = false`)" in text
    assert deploy["poll_seconds"] == 0.5 and "asks the SuperLink for a message every 0.5 s" in text
    assert deploy["first_idle_poll_seconds"] == 0.05 and "after answering a message it asks after 0.05 s" in text
    assert deploy["gate_in_executor"] and "in a thread of the site's executor" in text
    assert deploy["threads_per_site"] >= 1 and f"trains with {deploy['threads_per_site']} thread(s)" in text
