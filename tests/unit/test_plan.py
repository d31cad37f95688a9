"""The privacy-utility plan (client.plan): local work that scales with the department, the budget split between the
probe and fine-tuning, and the warning when noise would swamp the signal. Epsilons are recomputed here with a fresh
Opacus accountant, independently of the plan's own computation."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from opacus.accountants import RDPAccountant

from client.plan import FINETUNE, NOISY_RATIO, PROBE, Plan, format_plans, plan_job
from common import keys
from common.config import JobConfig
from common.errors import BudgetExhaustedError
from common.privacy import Charge, local_work
from server.recording import fit_result
from server.records import RoundRecord
from server.report import RunRecorder

DELTA = 1e-5
JOB = JobConfig(labels="a,b", num_server_rounds=4)
HEAD, TRAINABLE = 770, 74_498  # MiniLM's head and LoRA r=8 + head


def _eps(history: list[Charge]) -> float:
    acc = RDPAccountant()
    acc.history = list(history)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta=DELTA))


def _plan(n: int = 2400, job: JobConfig = JOB, *, server_round: int = 1, budget: float = 8.0,
          before: tuple[Charge, ...] = (), job_history: tuple[Charge, ...] = (), cap: float | None = None) -> Plan:
    return plan_job(site="cardiology", n=n, job=job, server_round=server_round, num_rounds=job.num_server_rounds,
                    before=before, job_history=job_history, epsilon_budget=budget, delta=DELTA, accountant="rdp",
                    job_cap=cap, head_weights=HEAD, trainable_weights=TRAINABLE)


def _all_rounds(plan: Plan) -> list[Charge]:
    return [(p.noise_multiplier, p.sample_rate, p.steps_per_round * p.rounds) for p in plan.phases]


@pytest.mark.parametrize(("n", "batch", "q", "steps"), [
    (200, 50, 0.25, 10),  # small: a quarter of the rows per batch, at least min-local-steps
    (2400, 63.1578947368421, 1 / 38, 10),  # 0.25 epoch = 9.5 steps: raised to 10
    (8058, 63.952380952380956, 1 / 126, 32),  # 0.25 epoch
    (100_000, 63.979526551503516, 1 / 1563, 100),  # 0.25 epoch would be 391 steps: bounded by max-local-steps
])
def test_local_work_scales_with_the_department(n: int, batch: float, q: float, steps: int) -> None:
    work = local_work(n, JOB.batch_size, JOB.local_epochs, min_steps=JOB.min_local_steps,
                      max_steps=JOB.max_local_steps)
    assert (work.expected_batch, work.sample_rate, work.steps) == (pytest.approx(batch), pytest.approx(q), steps)


def test_the_probe_spends_its_share_and_both_phases_the_budget() -> None:
    plan = _plan()
    assert [(p.phase, p.rounds) for p in plan.phases] == [(PROBE, 1), (FINETUNE, 3)]
    probe, finetune = plan.phases
    assert _eps([_all_rounds(plan)[0]]) == pytest.approx(JOB.probe_epsilon_share * 8.0, rel=0.01)
    total = _eps(_all_rounds(plan))
    assert total <= 8.0 * (1 + 1e-6) and total == pytest.approx(8.0, rel=0.01)
    assert plan.epsilon_planned == pytest.approx(total, rel=1e-6)
    assert probe.noised_weights == HEAD and finetune.noised_weights == TRAINABLE
    assert plan.warnings == ()


def test_the_probe_share_is_of_what_is_left_after_earlier_jobs() -> None:
    earlier = ((1.0, 0.05, 200),)
    spent = _eps(list(earlier))
    plan = _plan(before=earlier)
    probe_total = _eps([*earlier, _all_rounds(plan)[0]])
    assert probe_total == pytest.approx(spent + JOB.probe_epsilon_share * (8.0 - spent), rel=0.01)
    assert _eps([*earlier, *_all_rounds(plan)]) == pytest.approx(8.0, rel=0.01)


def test_a_per_job_cap_binds_both_phases() -> None:
    plan = _plan(before=((1.0, 0.05, 200),), cap=2.0)
    assert _eps([_all_rounds(plan)[0]]) == pytest.approx(JOB.probe_epsilon_share * 2.0, rel=0.01)
    assert _eps(_all_rounds(plan)) == pytest.approx(2.0, rel=0.01)


def test_after_the_probe_only_finetuning_is_planned_on_the_ledger_as_it_is() -> None:
    first = _plan()
    probe_charge = first.phase(PROBE).charge
    later = _plan(server_round=2, job_history=(probe_charge,))
    assert [p.phase for p in later.phases] == [FINETUNE]
    assert later.phase(FINETUNE).noise_multiplier == pytest.approx(first.phase(FINETUNE).noise_multiplier, rel=1e-3)


def test_a_probe_only_job_gives_the_probe_the_whole_budget() -> None:
    job = JobConfig(labels="a,b", num_server_rounds=2, probe_rounds=2)
    plan = _plan(job=job)
    assert [(p.phase, p.rounds) for p in plan.phases] == [(PROBE, 2)]
    assert _eps(_all_rounds(plan)) == pytest.approx(8.0, rel=0.01)


def test_without_probe_rounds_the_plan_is_the_single_phase_one() -> None:
    plan = _plan(job=JobConfig(labels="a,b", num_server_rounds=4, probe_rounds=0))
    assert [(p.phase, p.rounds) for p in plan.phases] == [(FINETUNE, 4)]
    assert _eps(_all_rounds(plan)) == pytest.approx(8.0, rel=0.01)


def test_noise_that_swamps_the_signal_is_warned_about_with_what_would_help() -> None:
    plan = _plan(n=200, budget=1.0)
    finetune = plan.phase(FINETUNE)
    assert finetune.noise_ratio > NOISY_RATIO
    (warning,) = [w for w in plan.warnings if "finetune" in w]
    for remedy in ("more training rows", "fewer trainable weights", "larger epsilon budget"):
        assert remedy in warning
    assert "warning:" in format_plans([plan])


def test_a_budget_already_spent_cannot_be_planned() -> None:
    with pytest.raises(BudgetExhaustedError):
        _plan(before=((0.3, 0.5, 1000),), budget=1.0)


def test_without_dp_nothing_is_noised_or_warned() -> None:
    plan = _plan(n=200, budget=1.0, job=JobConfig(labels="a,b", dp=False))
    assert all(p.noise_multiplier == 0 for p in plan.phases) and plan.warnings == ()
    assert plan.to_json()["phases"][0]["noise_ratio"] == 0


def test_the_server_keeps_each_departments_first_plan(tmp_path: Path) -> None:
    recorder = RunRecorder({}, tmp_path)
    record = RoundRecord(round=1)
    plan = _plan()

    def reply(text: str) -> FitRes:
        metrics = {keys.M_DEPARTMENT: "cardiology", keys.M_STATUS: keys.STATUS_TRAINED, keys.M_PHASE: PROBE,
                   keys.M_PLAN: text}
        return FitRes(status=Status(Code.OK, ""), parameters=ndarrays_to_parameters([]), num_examples=1,
                      metrics=metrics)

    fit_result(recorder, record, "cardiology", reply(json.dumps(plan.to_json())))
    kept = recorder.department("cardiology").plan
    assert kept is not None and [p.phase for p in kept.phases] == [PROBE, FINETUNE]
    assert kept.phases[1].noise_multiplier == plan.phase(FINETUNE).noise_multiplier
    assert record.departments["cardiology"].phase == PROBE
    later = _plan(server_round=2, job_history=(plan.phase(PROBE).charge,))
    fit_result(recorder, record, "cardiology", reply(json.dumps(later.to_json())))
    assert recorder.department("cardiology").plan == kept  # the first plan, made before anything was charged
    other = RunRecorder({}, tmp_path / "other")
    fit_result(other, record, "cardiology", reply('{"site": "x"}'))  # not a plan: the round is still recorded
    assert other.department("cardiology").plan is None


def test_each_later_round_keeps_the_jobs_noise_and_its_budget(rdp_curves: list[float]) -> None:
    """Rounds 2..4 of a job, each charging what its plan says: a later round's plan starts from the job's last
    charge (two or three new RDP curves, not a search from scratch), keeps its noise within the search's tolerance,
    and the whole job stays within the budget by an independent accountant."""
    history: list[Charge] = list(_all_rounds(_plan())[:1])  # the probe round's charge
    sigmas = []
    before = 0
    for server_round in (2, 3, 4):
        if server_round == 3:
            before = len(rdp_curves)
        plan = _plan(server_round=server_round, job_history=tuple(history))
        (finetune,) = plan.phases
        assert finetune.rounds == JOB.num_server_rounds - server_round + 1
        sigmas.append(finetune.noise_multiplier)
        history.append((finetune.noise_multiplier, finetune.sample_rate, finetune.steps_per_round))
    assert len(rdp_curves) - before <= 6  # two later rounds' plans; a search from scratch computes about 10 each
    assert max(sigmas) / min(sigmas) - 1 <= 1e-3
    assert _eps(history) <= 8.0 * (1 + 1e-6)
