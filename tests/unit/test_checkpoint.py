"""Checkpoints and resume without Ray: round-trip, refusals, config compatibility, skipped rounds, dropout records."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, RecordDict

from common import keys
from common.cli import main
from common.config import JobConfig, SimulationConfig, as_run_config
from common.errors import ConfigError, ParameterMismatchError
from common.model import build_model
from common.params import get_trainable
from server.checkpoint import CHECKPOINT, MAY_DIFFER_ON_RESUME, load_checkpoint, resume_config, save_checkpoint
from server.compat import MAIN_CONFIGS_RECORD, WorkflowKey
from server.recording import failure_text
from server.records import AggregateStatus, DepartmentRound, Dropout, ResumeRecord, load_report
from server.report import RunRecorder
from server.resume import resume_state
from server.secagg import skip_completed
from server.strategy import FedSiloStrategy

JOB = JobConfig(model="tiny-random", labels="neg,pos", num_server_rounds=3)


@pytest.fixture(scope="module")
def model():
    return build_model(JOB, 2).model


def _recorder(out: Path) -> RunRecorder:
    rec = RunRecorder(config={"num-server-rounds": 3}, out_dir=out, budget=8.0)
    rec.department("a").n_train, rec.department("a").n_test = 10, 3
    r = rec.round(1)
    r.seconds, r.fit_seconds, r.global_accuracy, r.peak_rss_mb = 1.5, 1.25, 0.75, 123.4
    r.aggregate = AggregateStatus.APPLIED
    r.departments["a"] = DepartmentRound(status="trained", epsilon=1.0, accuracy=0.7, n_test=3)
    r.departments["b"] = DepartmentRound(status="dropped", reason="dropped out during unmask (attempt 1)")
    r.dropouts.append(Dropout(department="b", node_id=7, stage="unmask", attempt=1))
    return rec


def _save(out: Path, model, server_round: int = 1, job: JobConfig = JOB) -> Path:
    arrays = [a + 1.0 for a in get_trainable(model)]
    return save_checkpoint(out, model, arrays, job, server_round, run_config=as_run_config(job, SimulationConfig()),
                           report=_recorder(out).to_dict())


def test_checkpoint_round_trip_describes_itself(tmp_path: Path, model) -> None:
    _save(tmp_path, model)
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.round == 1
    assert ckpt.run_config["model"] == "tiny-random" and ckpt.run_config["num-server-rounds"] == 3
    assert set(ckpt.versions) >= {"torch", "flwr", "opacus", "transformers", "peft", "python"}
    for got, base in zip(ckpt.arrays_for(model), get_trainable(model), strict=True):
        np.testing.assert_array_equal(got, base + 1.0)
    assert ckpt.report["rounds"][0]["dropouts"][0]["stage"] == "unmask"
    assert not list(tmp_path.glob(".*.tmp"))  # atomic: no temporary file left behind


def test_recorder_round_trips_through_its_dict(tmp_path: Path) -> None:
    rec = _recorder(tmp_path)
    again = load_report(rec.to_dict())
    assert again == rec.report and again.rounds[0].fit_seconds == 1.25


def test_weights_of_another_model_are_refused(tmp_path: Path, model) -> None:
    _save(tmp_path, model)
    full = build_model(JobConfig(model="tiny-random", labels="neg,pos", finetune="full"), 2).model
    with pytest.raises(ParameterMismatchError, match="do not fit this model"):
        load_checkpoint(tmp_path).arrays_for(full)


def test_missing_torn_or_foreign_checkpoints_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_checkpoint(tmp_path)
    (tmp_path / CHECKPOINT).write_bytes(b"\x80\x02 not a checkpoint")
    with pytest.raises(ConfigError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path)
    import torch

    torch.save({"format": "something-else/9"}, tmp_path / CHECKPOINT)
    with pytest.raises(ConfigError, match="something-else/9"):
        load_checkpoint(tmp_path)


def test_resume_config_allows_only_what_does_not_change_the_job(tmp_path: Path) -> None:
    saved = as_run_config(JOB, SimulationConfig())
    same = resume_config(saved, {"learning-rate": JOB.learning_rate, "num-server-rounds": 3.0}, tmp_path)
    assert same["resume"] is True and same["learning-rate"] == JOB.learning_rate
    moved = resume_config(saved, {"out-dir": "/elsewhere", "min-departments": 5, "round-retries": 0}, tmp_path)
    assert (moved["out-dir"], moved["min-departments"], moved["round-retries"]) == ("/elsewhere", 5, 0)
    for key, value in (("num-server-rounds", 5), ("model", "minilm"), ("dp", False), ("sim-epsilon", 1.0),
                       ("labels", "pos,neg"), ("secagg-max-weight", 3.0)):
        with pytest.raises(ConfigError, match=f"{key}: checkpoint"):
            resume_config(saved, {key: value}, tmp_path)
    with pytest.raises(ConfigError, match="not in the checkpoint"):
        resume_config(saved, {"no-such-key": 1}, tmp_path)
    assert "out-dir" in MAY_DIFFER_ON_RESUME and "model" not in MAY_DIFFER_ON_RESUME


def test_resume_state_keeps_completed_rounds_only(tmp_path: Path, model) -> None:
    _save(tmp_path, model, server_round=1)
    start = resume_state(tmp_path, model, as_run_config(JOB, SimulationConfig()), 8.0)
    assert start.completed == 1
    assert [r.round for r in start.recorder.rounds] == [1]
    assert start.recorder.report.resumes[0].after_round == 1
    with pytest.raises(ConfigError, match="num-server-rounds"):
        resume_state(tmp_path, model, as_run_config(JobConfig(model="tiny-random", labels="neg,pos",
                                                              num_server_rounds=4), SimulationConfig()), 8.0)


def test_resume_keeps_every_field_of_every_completed_round(tmp_path: Path, model) -> None:
    rec = _recorder(tmp_path)
    rec.report.resumes.append(ResumeRecord(after_round=0, time="2026-01-01T00:00:00+0000",
                                           checkpoint_versions={"flwr": "1.41.0"}))
    r2 = rec.round(2)
    r2.seconds, r2.fit_seconds, r2.failures, r2.attempts, r2.update_norm = 3.5, 2.75, 1, 2, 0.25
    r2.keep_previous("secure aggregation halted (too few departments)")
    r2.errors.append("attempt 1: oncology died")
    r2.departments["a"] = DepartmentRound(status="trained", epsilon=2.0, accuracy=0.8, n_test=3, train_seconds=1.5)
    rec.round(3).fit_seconds = 9.0  # written to the report, but the crash came before its checkpoint
    arrays = get_trainable(model)
    run_config = as_run_config(JOB, SimulationConfig())
    save_checkpoint(tmp_path, model, arrays, JOB, 2, run_config=run_config, report=rec.to_dict())
    start = resume_state(tmp_path, model, run_config, 8.0)
    assert start.recorder.rounds == rec.rounds[:2]  # every field of rounds 1 and 2, fit_seconds included
    assert [r.fit_seconds for r in start.recorder.rounds] == [1.25, 2.75]
    assert start.recorder.departments == rec.departments
    assert start.recorder.report.resumes[0] == rec.report.resumes[0]
    assert start.recorder.report.resumes[1].after_round == 2 and start.recorder.final is None
    assert start.recorder.config == dict(run_config)


def _context(current_round: int) -> Context:
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    ctx.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: current_round})
    return ctx


def test_completed_rounds_are_skipped() -> None:
    ran: list[int] = []

    def workflow(grid: object, context: Context) -> None:
        ran.append(int(context.state.config_records[MAIN_CONFIGS_RECORD][WorkflowKey.CURRENT_ROUND]))

    wrapped = skip_completed(workflow, 2)
    for rnd in (1, 2, 3, 4):
        wrapped(None, _context(rnd))  # type: ignore[arg-type]
    assert ran == [3, 4]
    assert skip_completed(workflow, 0) is workflow


def test_dropouts_and_halts_are_recorded_by_name(tmp_path: Path) -> None:
    job = JobConfig(num_server_rounds=2, round_retries=1)
    strategy = FedSiloStrategy(job, [np.zeros(2, np.float32)], "fp", RunRecorder({}, tmp_path))
    strategy.node_names[11] = "oncology"
    strategy.record_dropouts(1, "collect_masked_vectors", {11, 12})
    strategy.record_dropouts(1, "unmask", {11})
    strategy.record_halt(1, [RuntimeError("\x1b[36mray::x\x1b[39m\\n trace\\nCrash: oncology died")], 1)
    record = strategy.recorder.round(1)
    assert [(d.department, d.stage) for d in record.dropouts] == [
        ("oncology", "collect_masked_vectors"), ("node-12", "collect_masked_vectors"), ("oncology", "unmask")]
    assert record.departments["oncology"].status == keys.STATUS_DROPPED
    assert record.attempts == 2  # one retry follows the halt
    assert record.errors == ["attempt 1: ray::x | trace | Crash: oncology died"]  # no colours, last lines
    assert record.aggregate is AggregateStatus.KEPT_PREVIOUS
    assert record.aggregate_reason == "secure aggregation halted (too few departments)"


def test_failure_text_keeps_the_cause() -> None:
    assert failure_text(ValueError("x" * 1000 + "\nthe cause")).endswith("the cause")
    assert len(failure_text(ValueError("y" * 5000))) <= 400


def test_evaluation_dropouts_are_recorded(tmp_path: Path) -> None:
    strategy = FedSiloStrategy(JobConfig(num_server_rounds=2), [np.zeros(2, np.float32)], "fp",
                               RunRecorder({}, tmp_path))
    strategy.asked["evaluate"] = {1, 2}
    strategy.node_names.update({1: "a", 2: "b"})
    strategy.record_missing(1, "evaluate", {1})
    assert strategy.recorder.round(1).dropouts == [Dropout(department="b", node_id=2, stage="evaluate", attempt=1)]


def test_cli_refuses_to_resume_a_different_job_and_writes_nothing(tmp_path: Path, model, capsys) -> None:
    out = tmp_path / "run"
    _save(out, model)
    before = (out / CHECKPOINT).read_bytes()
    assert main(["simulate", "--resume", str(out), "--rounds", "9", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedsilo: error: Cannot resume") and "num-server-rounds" in err
    assert (out / CHECKPOINT).read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == [CHECKPOINT]
    assert main(["simulate", "--resume", str(tmp_path / "nothing"), "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["simulate", "--out", str(out), "--quiet"]) == 2
    assert "--resume" in capsys.readouterr().err


def test_server_run_resume_checks_before_submitting(tmp_path: Path, model, capsys) -> None:
    out = tmp_path / "run"
    _save(out, model)
    state = tmp_path / "state"  # no SuperLink connection: a submission would fail differently
    assert main(["server", "run", "--state-dir", str(state), "--resume", str(out), "--model", "minilm"]) == 2
    assert "model: checkpoint 'tiny-random'" in capsys.readouterr().err
    assert main(["server", "run", "--state-dir", str(state), "--labels", "a,b"]) == 2
    assert "--out and --labels are required" in capsys.readouterr().err
    assert main(["server", "run", "--state-dir", str(state), "--out", str(out), "--labels", "neg,pos"]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_a_resume_keeps_the_job_id(tmp_path: Path, model) -> None:
    """F1: the job's identity survives a resume; sites count their per-job cap on it (tests/unit/test_job_identity)."""
    from server.checkpoint import JOB_ID
    from server.resume import job_identity

    assert JOB_ID not in MAY_DIFFER_ON_RESUME
    new = job_identity(JOB, tmp_path)  # a new job: the server generates its id
    assert len(new.job_id) == 32 and job_identity(JOB, tmp_path).job_id != new.job_id
    _save(tmp_path, model, server_round=1, job=new)
    saved = load_checkpoint(tmp_path).run_config
    assert saved[JOB_ID] == new.job_id
    resumed = job_identity(replace(JOB, resume=True, out_dir=str(tmp_path)), tmp_path)
    assert resumed.job_id == new.job_id  # the resumed run (a new Flower run id) is the same job
    for asked in ({}, {JOB_ID: ""}, {JOB_ID: new.job_id}):
        assert resume_config(saved, asked, tmp_path)[JOB_ID] == new.job_id
    with pytest.raises(ConfigError, match="job-id: checkpoint"):
        resume_config(saved, {JOB_ID: "another-job"}, tmp_path)
    start = resume_state(tmp_path, model, as_run_config(resumed, SimulationConfig()), 8.0)
    assert start.recorder.report.config[JOB_ID] == new.job_id


def test_a_checkpoint_from_before_job_ids_resumes_under_a_new_one(tmp_path: Path, model) -> None:
    from server.checkpoint import JOB_ID
    from server.resume import job_identity

    _save(tmp_path, model, server_round=1)
    doc = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    del doc["run_config"][JOB_ID]
    torch.save(doc, tmp_path / CHECKPOINT)
    resumed = job_identity(replace(JOB, resume=True, out_dir=str(tmp_path)), tmp_path)
    assert resumed.job_id
    assert resume_config(load_checkpoint(tmp_path).run_config, {JOB_ID: resumed.job_id}, tmp_path)[JOB_ID] \
        == resumed.job_id
