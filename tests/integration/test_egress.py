"""What leaves a department: every reply of a DP-SGD + SecAgg+ simulation, intercepted by an outermost mod.

Only masked updates (SecAgg+ material) and allow-listed aggregate metrics may leave: no raw text, token ids,
labels or per-example values. Each site's egress audit log must record exactly the replies that left, with its
epsilon before and after each of them.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from client.compat import SecAggStage as Stage
from client.egress import egress_log_path, read_egress_log
from client.ledger import LedgerFile
from common.config import JobConfig
from common.model import build_model
from simulations.run import simulate
from tests.conftest import TINY_JOB, make_department_frame
from tests.integration.egress_checks import capture_mod, check_egress, load_captured

pytestmark = pytest.mark.slow

SIZES = {"cardiology": 55, "oncology": 45, "radiology": 35}
ROUNDS = 2


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], list[dict[str, Any]], list[str]]:
    base = tmp_path_factory.mktemp("egress")
    frame = make_department_frame(SIZES, seed=3)
    data = base / "departments.csv"
    frame.to_csv(data, index=False)
    captured = base / "captured"
    captured.mkdir()
    out = base / "out"
    rc = {**TINY_JOB, "num-server-rounds": ROUNDS, "sim-data": str(data), "sim-global-eval": False}
    report = simulate(rc, out, client_mods=[capture_mod(captured)])
    return out, report, load_captured(captured), frame["text"].tolist()


def test_only_masked_updates_and_aggregate_metrics_leave(run) -> None:
    _, report, messages, texts = run
    shapes = [tuple(p.shape) for p in build_model(JobConfig.from_run_config(report["config"]), 2).model.parameters()
              if p.requires_grad]
    seen = check_egress(messages, shapes, texts, secagg=True)
    departments = len(SIZES)
    # SecAgg+: four stages per round, one evaluation per round, per department.
    assert seen == {"train": 4 * ROUNDS * departments, "evaluate": ROUNDS * departments,
                    "masked": ROUNDS * departments}


def test_egress_log_records_every_reply_that_left(run) -> None:
    out, _, messages, _ = run
    names = sorted(SIZES)
    by_department: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for snap in messages:
        by_department[names[int(snap["partition"])]].append(snap)
    for name in names:
        ledger_path = out / "sites" / name / "ledger.json"
        log_path = egress_log_path(ledger_path)
        assert log_path.stat().st_mode & 0o777 == 0o600
        records = read_egress_log(log_path)
        assert len(records) == len(by_department[name]) == 5 * ROUNDS
        assert all(r["site"] == name and r["error"] is None for r in records)
        # Same replies, same content: (type, round, array/config names and sizes) as a multiset.
        def shape_of(r: dict[str, Any]) -> tuple[str, str, tuple[str, ...]]:
            return (r["message_type"], str(r["round"]), tuple(sorted(f"{c['record']}/{c['name']}"
                                                                      for c in r["configs"] + r["metrics"])))

        def snap_shape(s: dict[str, Any]) -> tuple[str, str, tuple[str, ...]]:
            items = [f"{rn}/{k}" for rn, rec in {**s["configs"], **s["metrics"]}.items() for k in rec]
            return (s["type"], s["round"], tuple(sorted(items)))

        assert sorted(map(shape_of, records)) == sorted(map(snap_shape, by_department[name]))
        ledger = LedgerFile(ledger_path, name, 8.0, 1e-5, "rdp").read()
        charged = {e.round: e.epsilon_after for e in ledger.entries}
        for r in records:
            if r["secagg_stage"] == Stage.COLLECT_MASKED_VECTORS:
                # The round's charge was made (and recorded) before its masked update left.
                assert r["epsilon_after"] == pytest.approx(charged[r["round"]])
                assert r["epsilon_after"] > r["epsilon_before"]
                masked = [c for c in r["configs"] if c["name"] == "masked_params"]
                assert masked and masked[0]["bytes"] > 0
            else:
                assert r["epsilon_after"] == r["epsilon_before"]
        stages = [r["secagg_stage"] for r in records if r["message_type"] == "train"]
        assert stages == list(Stage.all()) * ROUNDS
        assert not any(r["arrays"] for r in records)  # under SecAgg+ no array record leaves in the clear
