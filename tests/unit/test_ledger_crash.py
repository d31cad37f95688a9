"""Crash safety of a site's ledger, driven through the real `Department.fit` with training faked.

A crash is simulated by raising `Crash`, a BaseException that no fedsilo handler catches, at a chosen point: while
planning the round, mid-write of the ledger's temporary file (half of it written), after the temporary file is
synced but before the rename, after the rename, during training, or after training but before the update is sent.
After a crash the site restarts (a fresh `Department` reading the ledger from disk). The property test draws random
schedules of rounds, crashes, restarts, new jobs and a lost ledger file, and checks after every event that the
spent epsilon on disk never decreases, never passes the budget, and covers every update that left the site.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

from client.ledger import CREATED_MARK, LedgerFile
from client.runner import Department, FitOutcome
from client.site import SiteConfig
from client.train import TrainResult
from common import keys
from common.config import JobConfig
from common.data import Split
from common.errors import LedgerError
from common.model import BuiltModel
from common.privacy import sample_rate

SITE = "cardiology"
DELTA = 1e-5
BATCH = 4
LABELS = "negative,positive"


class Crash(BaseException):
    """The process dies here. Not an `Exception`, so nothing in fedsilo catches it, as with a real crash."""


WRITE_STAGES = ("tmp_write", "before_replace", "after_replace")
STAGES = ("plan", *WRITE_STAGES, "train", "before_send")


class _TornFile:
    """A file object whose first write stores half of the data, then the process dies."""

    def __init__(self, fh: Any) -> None:
        self.fh = fh

    def __enter__(self) -> _TornFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.fh.close()

    def write(self, data: bytes) -> int:
        self.fh.write(data[: len(data) // 2])
        self.fh.flush()
        raise Crash("mid-write")


class _FaultyOS:
    """`os` as seen by common.files (the ledger's writes), dying at one point of the atomic write; records its calls."""

    def __init__(self, stage: str | None) -> None:
        self.stage = stage
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def fdopen(self, fd: int, mode: str) -> Any:
        self.calls.append("write-tmp")
        fh = os.fdopen(fd, mode)
        return _TornFile(fh) if self.stage == "tmp_write" else fh

    def fsync(self, fd: int) -> None:
        self.calls.append("fsync-dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "fsync-file")
        os.fsync(fd)

    def replace(self, src: Any, dst: Any) -> None:
        if self.stage == "before_replace":
            raise Crash("before rename")
        self.calls.append("rename")
        os.replace(src, dst)
        if self.stage == "after_replace":
            raise Crash("after rename")


def _site(tmp: Path, budget: float) -> SiteConfig:
    return SiteConfig(name=SITE, data=str(tmp / "unused.csv"), epsilon=budget, delta=DELTA,
                      ledger=str(tmp / "ledger.json"))


def _ledger(tmp: Path, budget: float) -> LedgerFile:
    return LedgerFile(tmp / "ledger.json", SITE, budget, DELTA, "rdp")


def _department(tmp: Path, budget: float, n: int, run_id: str, rounds: int) -> Department:
    job = JobConfig(labels=LABELS, batch_size=BATCH, local_epochs=0.5, num_server_rounds=rounds, probe_rounds=0)
    dept = Department(_site(tmp, budget), job, run_id)
    labels = np.arange(n, dtype=np.int64) % 2
    dept._split = Split(SITE, ["a note"] * n, labels, ["a note", "another"], np.array([0, 1]))
    return dept


FAST_SIGMA = 3.0  # Opacus' RDP evaluation is slow for small noise; the crash tests do not need a planned noise
GLOBAL = [np.zeros((2, 3), np.float32), np.zeros(2, np.float32)]  # torch.nn.Linear(3, 2): weight, bias


class _Harness:
    """Fakes the model and training around the real `Department.fit`, with a crash at `stage` (or none)."""

    def __init__(self, tmp: Path, budget: float, sigma: float | None = FAST_SIGMA) -> None:
        self.tmp = tmp
        self.budget = budget
        self.sigma = sigma  # None: the real noise planner; else a fixed noise (planning is tested in test_privacy)
        self.trained_with: list[int] = []  # ledger entries on disk, seen at the start of each training

    @contextlib.contextmanager
    def patched(self, stage: str | None, dept: Department) -> Iterator[_FaultyOS]:
        faulty = _FaultyOS(stage if stage in WRITE_STAGES else None)
        n = len(dept.split.train_labels)

        def fake_train(model: torch.nn.Module, data: object, job: JobConfig, *, batch_size: int, steps: int,
                       noise_multiplier: float | None, dev: torch.device, seed: int | None) -> TrainResult:
            q = sample_rate(batch_size, n)
            # Write-ahead: before any training the charge must already be on disk (read as a restarted site would).
            self.trained_with.append(len(_ledger(self.tmp, self.budget).read().entries))
            if stage == "train":
                raise Crash("during training")
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.01)
            return TrainResult(steps=steps, mean_loss=0.5, seconds=0.0,
                               accountant_history=[(float(noise_multiplier or 0.0), q, steps)])

        def crashing_plan(**kwargs: Any) -> float:
            raise Crash("while planning")

        def fixed_plan(**kwargs: Any) -> float:
            assert self.sigma is not None
            return self.sigma  # whether it fits is still checked by the ledger's own charge (check_charge)

        with contextlib.ExitStack() as stack:
            stack.enter_context(mock.patch("common.files.os", faulty))
            stack.enter_context(mock.patch("client.runner.train_round", fake_train))
            stack.enter_context(mock.patch("client.runner.build_model",
                                           lambda job, k: BuiltModel(torch.nn.Linear(3, 2), tokenizer=None)))
            stack.enter_context(mock.patch.object(Department, "_encode", lambda self, built, texts, labels: None))
            if stage == "plan":
                stack.enter_context(mock.patch("client.plan.noise_for_budget", crashing_plan))
            elif self.sigma is not None:
                stack.enter_context(mock.patch("client.plan.noise_for_budget", fixed_plan))
            yield faulty

    def fit(self, dept: Department, stage: str | None, server_round: int, rounds: int) -> FitOutcome | None:
        """One round; None when the process "died" at `stage`."""
        with self.patched(stage, dept), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Opacus' RDP warnings for extreme orders
            try:
                return dept.fit(GLOBAL, server_round, rounds, None)
            except Crash:
                return None


def test_charge_is_durable_before_training_and_write_is_atomic(tmp_path: Path) -> None:
    harness = _Harness(tmp_path, budget=8.0, sigma=None)  # the real noise planner
    dept = _department(tmp_path, 8.0, 40, "run-1", rounds=3)
    with harness.patched(None, dept) as faulty:
        outcome = dept.fit(GLOBAL, 1, 3, None)
    assert outcome.metrics[keys.M_STATUS] == keys.STATUS_TRAINED
    # temp file written and synced, renamed over the ledger, then the directory synced: all before training
    assert faulty.calls[:4] == ["write-tmp", "fsync-file", "rename", "fsync-dir"]
    assert harness.trained_with == [1]
    assert CREATED_MARK.strip() in (tmp_path / "ledger.json.lock").read_text()


def test_new_ledger_directories_are_synced_into_their_parents(tmp_path: Path) -> None:
    faulty = _FaultyOS(None)
    lf = LedgerFile(tmp_path / "sites" / SITE / "ledger.json", SITE, 8.0, DELTA, "rdp")
    with mock.patch("common.files.os", faulty), lf.open() as ledger:
        lf.charge(ledger, run_id="r", server_round=1, charge=(3.0, 0.1, 5))
    # sites/ into tmp_path, sites/cardiology/ into sites/; then the write-ahead sequence; then the lock's mark
    assert faulty.calls == ["fsync-dir", "fsync-dir", "write-tmp", "fsync-file", "rename", "fsync-dir", "fsync-file"]


@pytest.mark.parametrize("stage", ["after_replace", "train", "before_send"])
def test_crash_after_the_charge_over_counts_never_under(tmp_path: Path, stage: str) -> None:
    harness = _Harness(tmp_path, budget=8.0)
    outcome = harness.fit(_department(tmp_path, 8.0, 40, "run-1", 3), stage, 1, 3)
    assert outcome is None or stage == "before_send"  # before_send: fit finished, the send never happened
    ledger = _ledger(tmp_path, 8.0).read()  # the restarted site
    assert [(e.run_id, e.round) for e in ledger.entries] == [("run-1", 1)]
    assert ledger.epsilon > 0


@pytest.mark.parametrize("stage", ["tmp_write", "before_replace"])
def test_crash_mid_write_keeps_the_previous_ledger_and_trains_nothing(tmp_path: Path, stage: str) -> None:
    harness = _Harness(tmp_path, budget=8.0)
    assert harness.fit(_department(tmp_path, 8.0, 40, "run-1", 3), None, 1, 3) is not None
    before = (tmp_path / "ledger.json").read_bytes()
    assert harness.fit(_department(tmp_path, 8.0, 40, "run-1", 3), stage, 2, 3) is None
    assert harness.trained_with == [1]  # the second round never trained
    assert (tmp_path / "ledger.json").read_bytes() == before
    torn = list(tmp_path.glob(".ledger.json.*.tmp"))
    assert len(torn) == 1 and torn[0].stat().st_size > 0
    ledger = _ledger(tmp_path, 8.0).read()  # restart: previous ledger intact, the torn temp file removed
    assert [e.round for e in ledger.entries] == [1]
    assert not list(tmp_path.glob(".ledger.json.*.tmp"))
    assert harness.fit(_department(tmp_path, 8.0, 40, "run-1", 3), None, 2, 3) is not None
    assert [e.round for e in _ledger(tmp_path, 8.0).read().entries] == [1, 2]


def test_a_failed_write_refuses_to_train(tmp_path: Path) -> None:
    harness = _Harness(tmp_path, budget=8.0)
    dept = _department(tmp_path, 8.0, 40, "run-1", 3)

    def disk_full(src: Any, dst: Any) -> None:
        raise OSError(28, "No space left on device")

    with harness.patched(None, dept) as faulty, pytest.raises(LedgerError, match="No space left"):
        faulty.replace = disk_full  # type: ignore[method-assign]
        dept.fit(GLOBAL, 1, 3, None)
    assert harness.trained_with == []
    assert not (tmp_path / "ledger.json").exists()
    assert not list(tmp_path.glob(".ledger.json.*.tmp"))


def test_a_lost_ledger_is_refused_not_reset(tmp_path: Path) -> None:
    harness = _Harness(tmp_path, budget=8.0)
    assert harness.fit(_department(tmp_path, 8.0, 40, "run-1", 3), None, 1, 3) is not None
    (tmp_path / "ledger.json").unlink()
    with pytest.raises(LedgerError, match="missing"):
        _ledger(tmp_path, 8.0).read()
    with pytest.raises(LedgerError, match="missing"):
        harness.fit(_department(tmp_path, 8.0, 40, "run-1", 3), None, 2, 3)
    assert harness.trained_with == [1]
    assert not (tmp_path / "ledger.json").exists()  # nothing was written in its place


def test_a_ledger_without_the_mark_gets_it_on_first_open(tmp_path: Path) -> None:
    """Ledgers written before loss detection existed are marked when first opened, then protected."""
    lf = _ledger(tmp_path, 8.0)
    with lf.open() as ledger:
        lf.charge(ledger, run_id="r", server_round=1, charge=(1.0, 0.1, 10))
    (tmp_path / "ledger.json.lock").write_text("")
    lf.read()
    (tmp_path / "ledger.json").unlink()
    with pytest.raises(LedgerError, match="missing"):
        lf.read()


# --- property test over random schedules -------------------------------------------------------------------------

_EXAMPLES_ENV = os.environ.get("FEDSILO_HYPOTHESIS_EXAMPLES")
SCHEDULE_SETTINGS = settings(max_examples=int(_EXAMPLES_ENV or 12), derandomize=_EXAMPLES_ENV is None,
                             deadline=None, database=None)

# Mostly rounds (a third without a crash), some restarts and new jobs, rarely a lost ledger (it ends the schedule).
EVENT = st.sampled_from([
    *(("round", stage) for stage in (None,) * len(STAGES) + STAGES),
    ("restart", None), ("restart", None), ("new_job", None), ("new_job", None), ("lose_ledger", None),
])


@SCHEDULE_SETTINGS
@given(
    budget=st.floats(min_value=0.2, max_value=3.0),
    sigma=st.sampled_from((2.0, 3.0, 5.0)),
    n=st.integers(min_value=40, max_value=160),
    rounds=st.integers(min_value=1, max_value=4),
    events=st.lists(EVENT, min_size=1, max_size=12),
)
def test_spent_epsilon_never_decreases_nor_passes_the_budget(budget: float, sigma: float, n: int, rounds: int,
                                                             events: list[tuple[str, str | None]]) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        harness = _Harness(tmp, budget, sigma)
        job, server_round = 1, 1
        dept = _department(tmp, budget, n, f"run-{job}", rounds)
        expected_entries, last_eps, lost = 0, 0.0, False
        sent: list[tuple[str, int]] = []
        for kind, stage in events:
            if kind == "restart":
                dept = _department(tmp, budget, n, f"run-{job}", rounds)
            elif kind == "new_job" or server_round > rounds:
                job, server_round = job + 1, 1
                dept = _department(tmp, budget, n, f"run-{job}", rounds)
            elif kind == "lose_ledger":
                if expected_entries and not lost:  # losing a ledger never written changes nothing
                    (tmp / "ledger.json").unlink()
                    lost = True
            if kind != "round":
                continue
            trainings = len(harness.trained_with)
            if lost:
                with pytest.raises(LedgerError):
                    harness.fit(dept, stage, server_round, rounds)
                assert len(harness.trained_with) == trainings  # refused before training
                continue
            outcome = harness.fit(dept, stage, server_round, rounds)
            event(f"crash {stage}" if outcome is None else f"{outcome.metrics[keys.M_STATUS]} ({stage or 'no crash'})")
            if outcome is None:  # crashed: the site restarts, the server retries the round
                expected_entries += stage in ("after_replace", "train")
                dept = _department(tmp, budget, n, f"run-{job}", rounds)
            else:
                if outcome.metrics[keys.M_STATUS] == keys.STATUS_TRAINED:
                    expected_entries += 1
                    if stage != "before_send":
                        sent.append((f"run-{job}", server_round))
                server_round += 1
            # a training that started saw its own charge already on disk
            assert all(seen == expected_entries for seen in harness.trained_with[trainings:])
            ledger = _ledger(tmp, budget).read()  # what a restarted site sees
            eps = ledger.epsilon
            assert eps >= last_eps
            assert eps <= budget * (1 + 1e-9)
            assert len(ledger.entries) == expected_entries
            charged = [(e.run_id, e.round) for e in ledger.entries]
            assert all(charged.count(s) >= sent.count(s) for s in set(sent))
            assert not list(tmp.glob(".ledger.json.*.tmp"))
            last_eps = eps
