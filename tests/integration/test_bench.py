"""`fedsilo bench --quick` on tiny setups: it runs and writes valid output (its deploy part:
tests/deployment/test_bench_deploy.py; the utility study: tests/integration/test_study.py).

No timing assertions: benchmarks print figures, they are not timed tests.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from common.cli import main
from simulations.bench import BENCH_JSON, BENCH_MD, PARTS

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
    # naming a part remeasures it in the same --out and keeps the rest (here comm, the part without a simulation)
    assert main(["bench", "--quick", "--out", str(out), "--only", "comm"]) == 0
    again = json.loads((out / BENCH_JSON).read_text())
    assert again["comm"]["measured_utc"] >= result["comm"]["measured_utc"]
    assert again["comm"]["bench_seconds"] != result["comm"]["bench_seconds"]
    assert {k: v for k, v in again.items() if k != "comm"} == {k: v for k, v in result.items() if k != "comm"}


def test_bench_rejects_unknown_parts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--quick", "--out", str(tmp_path / "b"), "--only", "nope"]) == 2
    assert "fedsilo: error: Unknown bench part" in capsys.readouterr().err
    assert not (tmp_path / "b" / BENCH_JSON).exists()
