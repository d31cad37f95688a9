"""Job lifecycle on the server, without processes: Flower's JSON answers parsed, `server jobs|stop|logs` and
`server run --detach` driving a fake `flwr`, and SIGINT/SIGTERM on `server run` stopping the job it follows."""

from __future__ import annotations

import io
import json
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from common.cli import EXIT_ERROR, main
from common.errors import JobInterruptedError
from common.runtime import DeploymentError
from server import deploy
from server.deploy import (
    CONNECTION,
    JobEntry,
    JobSignals,
    ServerState,
    flwr_json,
    follow_job,
    format_jobs,
    job_statuses,
    parse_run_id,
    read_job_entries,
    record_job,
)
from server.records import DepartmentRound, DepartmentSize, RoundRecord, RunReport, dump_report

RUN_ID = 4711


def _proc(stdout: str, returncode: int = 0, stderr: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.CompletedProcess(["flwr"], returncode, stdout, stderr)


def _state(tmp_path: Path) -> ServerState:
    state = ServerState(tmp_path / "state")
    state.write_connection("127.0.0.1:1", None)
    return state


class FakeFlwr:
    """`server.deploy._flwr`: records each call's arguments and answers from `answers` by subcommand."""

    def __init__(self, answers: dict[str, subprocess.CompletedProcess[str]], on_call: dict[str, int] | None = None
                 ) -> None:
        self.answers = answers
        self.on_call = on_call or {}  # subcommand -> a signal this process receives while it runs
        self.calls: list[tuple[str, ...]] = []

    def __call__(self, state: ServerState, *args: str, **_kwargs: object) -> subprocess.CompletedProcess[str]:
        self.calls.append(args)
        if args[0] in self.on_call:
            signal.raise_signal(self.on_call[args[0]])
        return self.answers[args[0]]

    def lines(self, state: ServerState, *args: str, **kwargs: object) -> FakePopen:
        """`server.deploy._flwr_lines`: the same answer, as a process whose output is read line by line."""
        answer = self(state, *args, **kwargs)
        return FakePopen(answer.stdout + answer.stderr, answer.returncode)


class FakePopen:
    def __init__(self, output: str, returncode: int) -> None:
        self.stdout = io.StringIO(output)
        self.returncode = returncode

    def wait(self) -> int:
        return self.returncode

    def poll(self) -> int:
        return self.returncode

    def kill(self) -> None:
        raise AssertionError("a finished process is not killed")


# Flower's JSON answers (rich pretty-prints them; a warning may come before).
RUN_ANSWER = json.dumps({"success": True, "run-id": str(RUN_ID), "federation-id": "", "fab-id": "fedsilo/fedsilo"},
                        indent=2)
FAILED_ANSWER = json.dumps({"success": False, "error-message": "✋ Stopping run ID 9...\nCannot stop run 9 for "
                                                                "flwr_aid=; run is already finished."}, indent=2)


def _ls_answer(*runs: tuple[int, str]) -> str:
    return json.dumps({"success": True, "runs": [{"run-id": str(r), "status": s, "elapsed": 75.4, "fab-id": "x"}
                                                  for r, s in runs]}, indent=2)


def test_flower_json_answers_are_parsed_and_failures_carry_flowers_message() -> None:
    assert parse_run_id(flwr_json(_proc("Some warning\n" + RUN_ANSWER), "Submitting")) == RUN_ID
    with pytest.raises(DeploymentError, match=r"Stopping job 9 failed: .*run is already finished"):
        flwr_json(_proc(FAILED_ANSWER), "Stopping job 9")
    with pytest.raises(DeploymentError, match=r"Listing jobs failed \(flwr exit status 1\): connection refused"):
        flwr_json(_proc("", 1, "connection refused"), "Listing jobs")
    with pytest.raises(DeploymentError, match="names no run id"):
        parse_run_id({"success": True})


def _write_report(out: Path, *, final: bool) -> None:
    rounds = [RoundRecord(round=1, aggregate="applied",
                          departments={"cardiology": DepartmentRound(status="trained"),
                                       "oncology": DepartmentRound(status="declined_policy")}),
              RoundRecord(round=2, departments={"radiology": DepartmentRound(status="trained")})]
    report = RunReport(config={"num-server-rounds": 5, "out-dir": str(out)},
                       departments={"cardiology": DepartmentSize(n_train=10)}, rounds=rounds)
    doc = dump_report(report)
    if final:
        doc["final"] = {"global_accuracy": 0.5, "federated_global_accuracy": 0.5, "epsilon": {}, "delta": 1e-5,
                        "dp": True, "secure_aggregation": True, "rounds_completed": 2, "outcome": "ended_early",
                        "outcome_reason": "too few departments"}
    out.mkdir(parents=True)
    (out / "report.json").write_text(json.dumps(doc))


def test_jobs_show_flowers_status_with_rounds_and_departments_from_the_report(tmp_path: Path) -> None:
    state = _state(tmp_path)
    running, ended = tmp_path / "run1", tmp_path / "run2"
    _write_report(running, final=False)
    _write_report(ended, final=True)
    record_job(state, JobEntry(1, str(running), 5))
    record_job(state, JobEntry(2, str(ended), 5))
    record_job(state, JobEntry(3, str(tmp_path / "not-yet"), 7))
    (state.jobs / "broken.json").write_text("{")
    entries = read_job_entries(state)
    assert sorted(entries) == [1, 2, 3]
    doc = json.loads(_ls_answer((1, "running"), (2, "finished:completed"), (3, "pending"), (9, "finished:stopped")))
    jobs = {job.run_id: job for job in job_statuses(doc, entries)}
    assert [j.run_id for j in job_statuses(doc, entries)] == [9, 3, 2, 1]  # no times: by run id
    queued = {1: "2026-12-07 14:02:15Z", 2: "2026-12-07 13:58:01Z", 3: "2026-12-07 14:10:00Z",
              9: "2026-12-07 09:00:00Z"}
    for run in doc["runs"]:
        run["pending-at"] = queued[int(run["run-id"])]
    assert [j.run_id for j in job_statuses(doc, entries)] == [3, 1, 2, 9]  # newest first: run ids are random
    assert (jobs[1].rounds_done, jobs[1].rounds_asked, jobs[1].outcome) == (1, 5, None)
    assert jobs[1].departments == ("cardiology", "oncology", "radiology")
    assert (jobs[2].rounds_done, jobs[2].outcome) == (2, "ended_early")
    assert (jobs[3].rounds_done, jobs[3].rounds_asked, jobs[3].departments) == (None, 7, ())
    assert (jobs[9].out_dir, jobs[9].rounds_asked) == (None, None)  # not submitted by fedsilo: Flower's status only
    table = format_jobs([jobs[run_id] for run_id in (1, 2, 3, 9)]).splitlines()
    assert table[0].split() == ["RUN", "ID", "STATUS", "ROUNDS", "ELAPSED", "DEPARTMENTS", "OUT"]
    assert table[1].split() == ["1", "running", "1/5", "0:01:15", "cardiology,oncology,radiology", str(running)]
    assert table[2].split()[:4] == ["2", "finished:completed", "(ended_early)", "2/5"]
    assert table[3].split() == ["3", "pending", "0/7", "0:01:15", "-", str(tmp_path / "not-yet")]
    assert table[4].split() == ["9", "finished:stopped", "-", "0:01:15", "-", "-"]
    assert format_jobs([]) == "No jobs on this server.\n"


def test_server_jobs_stop_and_logs_call_flower_on_fedsilos_connection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    state = _state(tmp_path)
    fake = FakeFlwr({"ls": _proc(_ls_answer((RUN_ID, "running"))), "stop": _proc(json.dumps({"success": True})),
                     "log": _proc("", 0)})
    monkeypatch.setattr(deploy, "_flwr", fake)
    monkeypatch.setattr(deploy, "_flwr_lines", fake.lines)
    assert main(["server", "jobs", "--state-dir", str(state.root), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["jobs"]
    assert listed[0]["run-id"] == RUN_ID and listed[0]["status"] == "running"
    assert main(["server", "stop", "--state-dir", str(state.root), str(RUN_ID)]) == 0
    assert f"Job {RUN_ID} stopped." in capsys.readouterr().out
    assert main(["server", "logs", "--state-dir", str(state.root), str(RUN_ID)]) == 0
    assert main(["server", "logs", "--state-dir", str(state.root), str(RUN_ID), "--follow"]) == 0
    assert fake.calls == [("ls", CONNECTION, "--format", "json"), ("stop", str(RUN_ID), CONNECTION, "--format", "json"),
                          ("log", str(RUN_ID), CONNECTION, "--show"), ("log", str(RUN_ID), CONNECTION, "--stream")]
    fake.answers["stop"] = _proc(FAILED_ANSWER)
    fake.answers["log"] = _proc("", 1)
    assert main(["server", "stop", "--state-dir", str(state.root), "9"]) == EXIT_ERROR
    assert "run is already finished" in capsys.readouterr().err
    assert main(["server", "logs", "--state-dir", str(state.root), "9"]) == EXIT_ERROR


def test_a_resume_first_stops_the_jobs_still_listed_as_writing_its_run(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """After a server crash the dead job is listed as running for a minute: `--resume` stops it (and any other
    unfinished job fedsilo submitted into the same directory), and no other job."""
    state = _state(tmp_path)
    out, other = tmp_path / "run", tmp_path / "other"
    for run_id, where in ((1, out), (2, out), (3, other), (4, out), (5, out)):
        record_job(state, JobEntry(run_id, str(where), 2))
    fake = FakeFlwr({"ls": _proc(_ls_answer((1, "running"), (2, "finished:failed"), (3, "running"), (4, "pending"),
                                            (5, "finished:stopped"), (9, "running"))),
                     "stop": _proc(json.dumps({"success": True}))})
    monkeypatch.setattr(deploy, "_flwr", fake)
    assert deploy.stop_unfinished_jobs(state.root, out) == [4, 1]
    assert [c[:2] for c in fake.calls] == [("ls", CONNECTION), ("stop", "4"), ("stop", "1")]
    fake.calls.clear()
    assert deploy.stop_unfinished_jobs(state.root, tmp_path / "nothing-there") == []
    assert fake.calls == [("ls", CONNECTION, "--format", "json")]


def test_server_run_detach_submits_records_the_job_and_says_how_to_follow_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    state = _state(tmp_path)
    fake = FakeFlwr({"run": _proc(RUN_ANSWER)})
    monkeypatch.setattr(deploy, "_flwr", fake)
    monkeypatch.setattr(deploy, "_flwr_lines", fake.lines)
    out = tmp_path / "out"
    assert main(["server", "run", "--state-dir", str(state.root), "--out", str(out), "--labels", "a,b",
                 "--model", "tiny-random", "--rounds", "3", "--detach"]) == 0
    printed = capsys.readouterr().out
    assert f"Job {RUN_ID} submitted" in printed
    assert f"fedsilo server logs --state-dir {state.root} {RUN_ID} --follow" in printed
    assert f"fedsilo server stop --state-dir {state.root} {RUN_ID}" in printed
    (call,) = fake.calls
    assert call[0] == "run" and call[-2:] == ("--format", "json") and "--stream" not in call
    assert read_job_entries(state)[RUN_ID] == JobEntry(RUN_ID, str(out.resolve()), 3,
                                                       read_job_entries(state)[RUN_ID].submitted)


def _raising(signum: int, result: int = 0) -> Callable[[ServerState, int], int]:
    def stream(_state: ServerState, _run_id: int) -> int:
        signal.raise_signal(signum)  # delivered to this process's handler at once
        return result

    return stream


class Stops:
    def __init__(self, error: DeploymentError | None = None) -> None:
        self.stopped: list[int] = []
        self.error = error

    def __call__(self, _state: ServerState, run_id: int) -> None:
        self.stopped.append(run_id)
        if self.error is not None:
            raise self.error


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_following_stops_the_job_on_the_server(tmp_path: Path, signum: int) -> None:
    stops = Stops()
    previous = signal.getsignal(signum)
    with JobSignals() as signals, pytest.raises(JobInterruptedError) as raised:
        follow_job(tmp_path, RUN_ID, signals, stream=_raising(signum), stop=stops)
    assert stops.stopped == [RUN_ID]
    assert raised.value.exit_status == 128 + signum  # 130 for SIGINT, 143 for SIGTERM
    assert str(raised.value) == f"{signal.Signals(signum).name}: stopped job {RUN_ID} on the server."
    assert signal.getsignal(signum) is previous  # handlers given back


def test_a_signal_during_submission_waits_for_the_run_id_then_stops_the_job(tmp_path: Path) -> None:
    stops, streamed = Stops(), []
    with JobSignals() as signals:
        signal.raise_signal(signal.SIGTERM)  # while `flwr run` submits: only remembered
        assert signals.received == signal.SIGTERM
        with pytest.raises(JobInterruptedError) as raised:
            follow_job(tmp_path, RUN_ID, signals, stream=lambda s, r: streamed.append(r) or 0, stop=stops)
    assert streamed == [] and stops.stopped == [RUN_ID] and raised.value.exit_status == 143


def test_a_second_signal_does_not_cut_the_stop_short(tmp_path: Path) -> None:
    stopped = []

    def stop(_state: ServerState, run_id: int) -> None:
        signal.raise_signal(signal.SIGINT)  # the operator presses Ctrl-C again
        stopped.append(run_id)

    with JobSignals() as signals, pytest.raises(JobInterruptedError):
        follow_job(tmp_path, RUN_ID, signals, stream=_raising(signal.SIGINT), stop=stop)
    assert stopped == [RUN_ID]


def test_a_stop_that_fails_is_reported_with_the_signals_exit_status(tmp_path: Path) -> None:
    stops = Stops(DeploymentError("Stopping job 4711 failed: run is already finished"))
    with JobSignals() as signals, pytest.raises(JobInterruptedError, match=r"could not stop job 4711 on the server: "
                                                                           r".*already finished") as raised:
        follow_job(tmp_path, RUN_ID, signals, stream=_raising(signal.SIGTERM), stop=stops)
    assert raised.value.exit_status == 143


def test_a_job_followed_to_its_end_is_not_stopped(tmp_path: Path) -> None:
    stops = Stops()
    with JobSignals() as signals:
        assert follow_job(tmp_path, RUN_ID, signals, stream=lambda s, r: 0, stop=stops) == 0
        assert not signals.armed
    assert stops.stopped == []


def test_server_run_stopped_by_sigterm_while_following_exits_143(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    state = _state(tmp_path)
    fake = FakeFlwr({"run": _proc(RUN_ANSWER), "log": _proc("", 0), "stop": _proc(json.dumps({"success": True}))},
                    on_call={"log": signal.SIGTERM})
    monkeypatch.setattr(deploy, "_flwr", fake)
    monkeypatch.setattr(deploy, "_flwr_lines", fake.lines)
    previous = signal.getsignal(signal.SIGTERM)
    assert main(["server", "run", "--state-dir", str(state.root), "--out", str(tmp_path / "out"), "--labels", "a,b",
                 "--model", "tiny-random"]) == 143
    assert [call[0] for call in fake.calls] == ["run", "log", "stop"]
    assert fake.calls[1] == ("log", str(RUN_ID), CONNECTION, "--stream")
    assert fake.calls[2] == ("stop", str(RUN_ID), CONNECTION, "--format", "json")
    err = capsys.readouterr().err
    assert f"fedsilo: SIGTERM: stopped job {RUN_ID} on the server. It had completed no round." in err
    assert signal.getsignal(signal.SIGTERM) is previous


COLOURED_LOG = ("Using SuperLink: fedsilo (127.0.0.1:47100)\n"
                "\x1b[92mINFO \x1b[0m:      [ROUND 1]\n"
                "2026-12-07 13:48:19,300 INFO server.recording: round 1/3: 17.2s, global accuracy 0.5\n"
                "2026-12-07 13:48:19,300 INFO server.recording: round 1/3: 17.2s, global accuracy 0.5\n")


def test_server_logs_prints_fedsilos_lines_once_without_colour_and_flowers_reason_when_it_fails(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    state = _state(tmp_path)
    fake = FakeFlwr({"log": _proc(COLOURED_LOG, 0)})
    monkeypatch.setattr(deploy, "_flwr_lines", fake.lines)
    assert main(["server", "logs", "--state-dir", str(state.root), str(RUN_ID)]) == 0
    assert capsys.readouterr().out == ("2026-12-07 13:48:19,300 INFO server.recording: round 1/3: 17.2s, global "
                                       "accuracy 0.5\n")
    assert main(["server", "logs", "--state-dir", str(state.root), str(RUN_ID), "--verbose"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[:2] == ["Using SuperLink: fedsilo (127.0.0.1:47100)", "INFO :      [ROUND 1]"]
    assert len(out.splitlines()) == 3 and "\x1b" not in out
    fake.answers["log"] = _proc("Using SuperLink: fedsilo (127.0.0.1:47100)\n❌ Run ID 9 not found\n", 1)
    assert main(["server", "logs", "--state-dir", str(state.root), "9"]) == EXIT_ERROR
    assert "Run ID 9 not found" in capsys.readouterr().err
