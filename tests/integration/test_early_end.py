"""A job in which too few departments can train ends early, with the reason, and `simulate` fails (exit 2)."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import Context, Message, MessageType

from client.compat import ClientAppCallable, Mod
from common.cli import EXIT_ERROR, main
from server.records import read_report
from server.report import REPORT_JSON
from tests.conftest import TINY_JOB, make_department_frame

pytestmark = pytest.mark.slow

DEPARTMENTS = {"cardiology": 24, "radiology": 24}


class Broken(RuntimeError):
    pass


def radiology_always_fails() -> Mod:
    def mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type == MessageType.TRAIN and int(ctxt.node_config["partition-id"]) == 1:
            raise Broken("radiology's training fails every round")
        return call_next(msg, ctxt)

    return mod


def test_job_ends_after_max_idle_rounds_with_the_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    import simulations.run

    data = tmp_path / "departments.csv"
    make_department_frame(DEPARTMENTS).to_csv(data, index=False)
    real = simulations.run.simulate
    monkeypatch.setattr(simulations.run, "simulate",
                        lambda rc, out, **kw: real(rc, out, **kw, client_mods=[radiology_always_fails()]))
    out = tmp_path / "out"
    argv = ["simulate", "--quiet", "--data", str(data), "--rounds", "5", "--no-secagg", "--out", str(out),
            *[f"-c{k}={v}" for k, v in TINY_JOB.items()], "-c", "max-idle-rounds=2"]
    assert main(argv) == EXIT_ERROR
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fedsilo: error: ")]
    assert len(err) == 1 and "ended early after 2 of 5 rounds" in err[0], err
    assert "radiology: failed" in err[0]
    report = read_report(out / REPORT_JSON)
    assert [r.round for r in report.rounds] == [1, 2]
    assert report.final is not None and report.final.outcome == "ended_early"
    assert report.final.rounds_completed == 2
    assert "fewer than min-departments (2)" in (report.final.outcome_reason or "")
