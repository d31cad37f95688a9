"""A simulation SIGKILLed after round k completes, then `fedsilo simulate --resume`: same rounds, ledgers consistent.

The run is a real `python -m common.cli simulate` subprocess (Ray included); the whole process tree is killed, as
a machine restart would, right after the checkpoint of round 1 appears.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest

from client.ledger import LedgerFile
from common.privacy import epsilon_spent
from server.checkpoint import CHECKPOINT, load_checkpoint
from server.report import REPORT_JSON
from tests.conftest import TINY_JOB, make_department_frame

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
ROUNDS = 3
BUDGET = 8.0
DEPARTMENTS = {"cardiology": 40, "oncology": 32, "radiology": 24}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "common.cli", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}


def _kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the CLI and every process it started (Ray's GCS, raylet and workers), as a power cut would."""
    tree = [proc.pid, *(p.pid for p in psutil.Process(proc.pid).children(recursive=True))]
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
    proc.wait(timeout=30)
    psutil.wait_procs([p for p in map(_process, tree) if p is not None], timeout=30)


def _process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


def _completed_round(out: Path) -> int:
    if not (out / CHECKPOINT).exists():
        return -1
    return load_checkpoint(out).round


def test_sigkill_after_a_round_then_resume(tmp_path: Path) -> None:
    data = tmp_path / "departments.csv"
    make_department_frame(DEPARTMENTS).to_csv(data, index=False)
    out = tmp_path / "run"
    job = [f"-c{k}={v}" for k, v in TINY_JOB.items() if k != "model"]
    log = (tmp_path / "first.log").open("wb")
    proc = subprocess.Popen(_cli("simulate", "--out", str(out), "--data", str(data), "--model", "tiny-random",
                                 "--rounds", str(ROUNDS), "--epsilon", str(BUDGET), "--quiet", *job),
                            cwd=tmp_path, env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while _completed_round(out) < 1:
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "round 1 did not complete in time"
            time.sleep(0.5)
    finally:
        _kill_tree(proc)
    killed_after = _completed_round(out)
    assert 1 <= killed_after < ROUNDS
    assert not json.loads((out / REPORT_JSON).read_text()).get("final")  # it really died mid-job

    # Resuming with a different job is refused, and changes nothing.
    before = {p: p.read_bytes() for p in (out / CHECKPOINT, out / REPORT_JSON)}
    refused = subprocess.run(_cli("simulate", "--resume", str(out), "--quiet", "-clearning-rate=0.5"), cwd=tmp_path,
                             env=_env(), capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2
    assert "fedsilo: error: Cannot resume" in refused.stderr and "learning-rate" in refused.stderr
    assert {p: p.read_bytes() for p in before} == before

    resumed = subprocess.run(_cli("simulate", "--resume", str(out), "--quiet"), cwd=tmp_path, env=_env(),
                             capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    report = json.loads((out / REPORT_JSON).read_text())
    assert [r["round"] for r in report["rounds"]] == list(range(1, ROUNDS + 1))
    assert report["final"]["rounds_completed"] == ROUNDS
    assert [r["after_round"] for r in report["resumes"]] == [killed_after]
    assert all(r["aggregate"] == "applied" for r in report["rounds"])
    assert load_checkpoint(out).round == ROUNDS
    # The rounds completed before the kill keep every field they had (fit_seconds was once reset to 0.0).
    killed = json.loads(before[out / REPORT_JSON])
    kept = [r for r in killed["rounds"] if r["round"] <= killed_after]
    assert [r for r in report["rounds"] if r["round"] <= killed_after] == kept
    assert all(r["fit_seconds"] > 0 for r in report["rounds"])

    for name in DEPARTMENTS:
        ledger = LedgerFile(out / "sites" / name / "ledger.json", name, BUDGET, 1e-5, "rdp").read()
        charged = Counter(e.round for e in ledger.entries)
        for r in report["rounds"]:
            if r["departments"][name]["status"] == "trained":
                assert charged[r["round"]] >= 1, (name, r["round"], charged)  # never under-counted
        assert sorted(charged) == list(range(1, ROUNDS + 1))
        # The killed run and the resumed one (two run ids) number rounds as one job: resumed rounds follow.
        runs = [e.run_id for e in ledger.entries]
        assert len(set(runs)) == 2
        assert {e.job_id for e in ledger.entries} == {report["config"]["job-id"]}  # one job across both runs
        resumed_rounds = [e.round for e in ledger.entries if e.run_id == runs[-1]]
        assert resumed_rounds == list(range(killed_after + 1, ROUNDS + 1))
        afters = [e.epsilon_after for e in ledger.entries]
        assert afters == sorted(afters) and afters[-1] <= BUDGET
        assert ledger.epsilon == pytest.approx(epsilon_spent(ledger.history, 1e-5, "rdp"))
        assert report["final"]["epsilon"][name] == pytest.approx(ledger.epsilon)
