"""The two-phase recipe at a real department (tiny model, real Opacus, real ledger): a probe round trains the head
alone and charges exactly what the plan said; fine-tuning rounds then train the adapters; both phases together
spend the site's budget, recomputed by an independent accountant."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant

from client import runner
from client.ledger import LedgerFile
from client.plan import FINETUNE, PROBE
from client.runner import Department
from client.site import SiteConfig
from client.train import head_inputs
from common import keys
from common.config import JobConfig
from common.model import build_model, device, head_module, trainable_names
from common.params import get_trainable
from common.text import encode
from tests.conftest import TINY_JOB, make_department_frame

BUDGET, DELTA, ROUNDS = 4.0, 1e-5, 3


def _department(tmp_path: Path, rows: int = 160, **overrides: int) -> Department:
    data = tmp_path / "notes.csv"
    make_department_frame({"cardiology": rows}).to_csv(data, index=False)
    site = SiteConfig(name="cardiology", data=str(data), epsilon=BUDGET, delta=DELTA,
                      ledger=str(tmp_path / "ledger.json"))
    job = JobConfig.from_run_config({**TINY_JOB, "labels": "negative,positive", "num-server-rounds": ROUNDS,
                                     "secagg": False, "min-departments": 1, **overrides})
    return Department(site, job, "run-1")


def _independent_epsilon(path: Path) -> float:
    acc = RDPAccountant()
    acc.history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in LedgerFile(
        path, "cardiology", BUDGET, DELTA, "rdp").read().entries]
    return float(acc.get_epsilon(delta=DELTA))


@pytest.mark.filterwarnings("ignore::UserWarning")  # Opacus' RDP notes on extreme orders
def test_probe_then_finetune_charges_the_plan_and_stays_within_budget(tmp_path: Path) -> None:
    dept = _department(tmp_path)
    built = build_model(dept.job, 2)
    names = trainable_names(built.model)
    head = [i for i, n in enumerate(names) if "classifier" in n]
    global_arrays = get_trainable(built.model)

    probe = dept.fit(global_arrays, 1, ROUNDS, None)
    assert probe.metrics[keys.M_STATUS] == keys.STATUS_TRAINED and probe.metrics[keys.M_PHASE] == PROBE
    plan = json.loads(str(probe.metrics[keys.M_PLAN]))
    assert [p["phase"] for p in plan["phases"]] == [PROBE, FINETUNE]
    assert [p["rounds"] for p in plan["phases"]] == [1, ROUNDS - 1]
    entries = LedgerFile(tmp_path / "ledger.json", "cardiology", BUDGET, DELTA, "rdp").read().entries
    planned = plan["phases"][0]
    assert [e.charge for e in entries] == [(planned["noise_multiplier"], planned["sample_rate"],
                                            planned["steps_per_round"])]
    # The probe's charge alone spends its share of the budget; the head moved, nothing else did.
    assert _independent_epsilon(tmp_path / "ledger.json") == pytest.approx(
        dept.job.probe_epsilon_share * BUDGET, rel=0.01)
    moved = [i for i, u in enumerate(probe.update) if np.abs(u).max() > 0]
    assert moved == head

    global_arrays = [g + u for g, u in zip(global_arrays, probe.update, strict=True)]
    for server_round in range(2, ROUNDS + 1):
        out = dept.fit(global_arrays, server_round, ROUNDS, None)
        assert out.metrics[keys.M_PHASE] == FINETUNE
        assert any(np.abs(u).max() > 0 for i, u in enumerate(out.update) if i not in head)  # the adapters train
        global_arrays = [g + u for g, u in zip(global_arrays, out.update, strict=True)]
    spent = _independent_epsilon(tmp_path / "ledger.json")
    assert spent <= BUDGET * (1 + 1e-6)
    assert spent == pytest.approx(BUDGET, rel=0.01)  # both phases together spend the budget, no more


def test_a_small_department_still_takes_useful_steps(tmp_path: Path) -> None:
    """80 training rows: batches of at most a quarter of them (not the job's 64), and at least min-local-steps
    steps per fine-tuning round (0.5 epoch would be 2)."""
    dept = _department(tmp_path, rows=100, **{"batch-size": 64})
    built = build_model(dept.job, 2)
    plan = dept.preview_plan(built.model)
    finetune = plan.phase(FINETUNE)
    assert finetune.batch_size == 20 and finetune.sample_rate == 0.25
    assert finetune.steps_per_round == dept.job.min_local_steps
    assert plan.phase(PROBE).batch_size == 20
    assert not (tmp_path / "ledger.json").exists()  # previewing charges nothing


def test_head_inputs_come_back_in_row_order(tmp_path: Path) -> None:
    """Rows go through sorted by length; what the probe trains on must still pair each row with its own label."""
    job = JobConfig.from_run_config({**TINY_JOB, "labels": "negative,positive"})
    built = build_model(job, 2)
    frame = make_department_frame({"x": 37})
    texts = [t if i % 3 else t + " and some more words here" for i, t in enumerate(frame["text"])]
    data = encode(built.tokenizer, texts, np.zeros(len(texts), dtype=np.int64), job.max_length)
    head = head_module(built.model)
    batched = head_inputs(built.model, head, data, device(), batch_size=8)
    one_by_one = torch.cat([head_inputs(built.model, head, encode(built.tokenizer, [t], np.zeros(1, np.int64),
                                                                  job.max_length), device())
                            for t in texts])
    torch.testing.assert_close(batched, one_by_one, rtol=1e-4, atol=1e-5)


def test_a_worker_reuses_the_model_and_data_but_nothing_of_another_department(tmp_path: Path) -> None:
    """Two departments' messages in one process (a simulation worker): one model build and one tokenisation per
    split for the run, and each message starts from the global weights, not the previous department's."""
    data = tmp_path / "notes.csv"
    make_department_frame({"cardiology": 120, "oncology": 120}).to_csv(data, index=False)
    job = JobConfig.from_run_config({**TINY_JOB, "labels": "negative,positive", "num-server-rounds": 2,
                                     "secagg": False, "min-departments": 1, "probe-rounds": 0})
    sites = [SiteConfig(name=name, data=str(data), epsilon=BUDGET, delta=DELTA, department_column="department",
                        ledger=str(tmp_path / name / "ledger.json")) for name in ("cardiology", "oncology")]
    built = build_model(job, 2)
    global_arrays = get_trainable(built.model)
    builds: list[int] = []
    real_build = runner.build_model

    def counting_build(*args: Any, **kwargs: Any) -> Any:
        builds.append(1)
        return real_build(*args, **kwargs)

    with mock.patch.object(runner, "build_model", counting_build):
        trained = Department(sites[0], job, "run-7").fit(global_arrays, 1, 2, None)
        assert any(np.abs(u).max() > 0 for u in trained.update)
        other = Department(sites[1], job, "run-7")
        kept = other._model(global_arrays, None)  # the same skeleton, with the global weights back in place
        for got, want in zip(get_trainable(kept.model), global_arrays, strict=True):
            np.testing.assert_array_equal(got, want)
        assert not any(hasattr(p, "grad_sample") or p.grad is not None for p in kept.model.parameters())
        other.evaluate(global_arrays, None)
        Department(sites[0], job, "run-7").evaluate(global_arrays, None)
        assert len(builds) == 1
        Department(sites[0], job, "run-8").evaluate(global_arrays, None)  # another run: built anew
        assert len(builds) == 2
