"""What a department does when asked to train or evaluate: pure of Flower (the ClientApp wraps it).

Order of operations for a training round, all on site:
1. resolve the site's own config and check the job against it (labels, DP, data usable, model fingerprint);
2. check the site's ledger against its egress log (it must not show less spent than was recorded on the way out),
   plan the rest of the job (`client.plan`: the probe and fine-tuning phases' DP charges) from the ledger, the
   site's budget and its per-job cap, decline if it does not fit;
3. charge the ledger (atomically) *before* training, so a crash can only over-count;
4. train with DP-SGD (the probe round: the head alone, on its cached inputs; then every trainable weight), check
   Opacus recorded exactly the charged steps;
5. check the update (arrays, finiteness, norm bound) before SecAgg+ masks it;
6. return the update (trainable weights minus global weights), aggregate metrics and the plan only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from client.egress_log import check_against_egress, egress_log_path, read_egress_log_locked
from client.ledger import Ledger, LedgerEntry, LedgerFile
from client.plan import PROBE, Plan, phase_of, plan_job
from client.reuse import RUN_CACHE
from client.site import SiteConfig
from client.train import head_inputs, train_head, train_round
from common import keys
from common.config import JOB_ID_CHARS, JOB_ID_MAX, JobConfig
from common.data import Split
from common.errors import (
    BudgetExhaustedError,
    InvalidUpdateError,
    ModelError,
    PolicyError,
    PrivacyError,
    SecureAggregationError,
)
from common.model import BuiltModel, base_fingerprint, build_model, count_weights, device, head_module, trainable_names
from common.params import get_trainable, max_abs, set_trainable, subtract
from common.preflight import check_department_data
from common.privacy import Charge, epsilon_spent
from common.text import Encoded, encode, evaluate
from common.updates import check_update

log = logging.getLogger(__name__)

Metrics = dict[str, bool | int | float | str]


@dataclass
class FitOutcome:
    update: list[np.ndarray]
    num_examples: int  # FedAvg weight; 0 when the site declined
    metrics: Metrics


class Department:
    """One site's view of one job."""

    def __init__(self, site: SiteConfig, job: JobConfig, run_id: str) -> None:
        self.site = site
        self.job = job
        self.run_id = run_id
        if not job.label_names:
            raise ModelError("The job does not name its labels (config key 'labels').")
        self.ledger_file = LedgerFile(Path(site.ledger), site.name, site.epsilon, site.delta, site.accountant)
        self._split: Split | None = None
        RUN_CACHE.begin(run_id)  # what this process kept for another run is dropped

    @property
    def split(self) -> Split:
        if self._split is None:
            self._split = RUN_CACHE.get(("split", self.site, self.job.label_names),
                                        lambda: self.site.load_split(self.job.label_names))
        return self._split

    def _model(self, global_arrays: list[np.ndarray], fingerprint: str | None) -> BuiltModel:
        """The job's model with the global weights in place: the skeleton is built once per run in this process
        (`client.reuse`); every trainable weight is overwritten here, and the frozen ones are fingerprinted anew
        at every message, so nothing of another message or department carries over unnoticed."""
        built: BuiltModel = RUN_CACHE.model(("model", self.job),
                                            lambda: build_model(self.job, len(self.job.label_names)))
        if fingerprint is not None and base_fingerprint(built.model) != fingerprint:
            raise ModelError(
                f"Site {self.site.name}: the frozen base model here differs from the server's "
                "(fingerprint mismatch); refusing to combine updates from different models."
            )
        set_trainable(built.model, global_arrays)
        return built

    def _encode(self, built: BuiltModel, texts: list[str], labels: np.ndarray) -> Encoded:
        """`texts` tokenised (once per run and site in this process: `client.reuse`)."""
        digest = hashlib.sha256("\x00".join(texts).encode() + labels.tobytes()).hexdigest()
        key = ("encoded", self.site, self.job, digest)
        return RUN_CACHE.get(key, lambda: encode(built.tokenizer, texts, labels, self.job.max_length))

    def _base_metrics(self, ledger: Ledger, status: str) -> Metrics:
        return {keys.M_DEPARTMENT: self.site.name, keys.M_STATUS: status, keys.M_EPSILON: ledger.epsilon,
                keys.M_DELTA: self.site.delta, keys.M_NUM_EXAMPLES: len(self.split.train_texts)}

    def job_id(self, sent: str | None) -> str:
        """The job id the server sent in the fit config, checked; none sent (a server from before job ids): the
        run id stands in for it, so the per-job cap is counted per run, as before."""
        if sent is None or sent == "":
            return self.run_id
        if len(sent) > JOB_ID_MAX or not set(sent) <= JOB_ID_CHARS:
            raise PolicyError(f"Site {self.site.name} refuses the job: its job id {sent[:80]!r} is not up to "
                              f"{JOB_ID_MAX} letters, digits, '.', '_' or '-'.")
        return sent

    def fit(self, global_arrays: list[np.ndarray], server_round: int, num_rounds: int,
            fingerprint: str | None, job_id: str | None = None) -> FitOutcome:
        """Train one round. `job_id`: the job's identity across resumes, as the server sent it (None: the run id)."""
        if not self.job.dp and not self.site.allow_non_private:
            raise PrivacyError(f"Site {self.site.name} does not allow training without DP (allow_non_private).")
        n = len(self.split.train_texts)
        if n < 1:
            raise PrivacyError(f"Site {self.site.name} has no training examples.")
        if self.job.secagg and n > self.job.secagg_max_weight:
            raise SecureAggregationError(
                f"Site {self.site.name} has {n} training examples, more than secagg-max-weight "
                f"{self.job.secagg_max_weight:g}: its weight would overflow SecAgg+. Raise secagg-max-weight."
            )
        check_department_data(self.site.name, self.split.train_labels, self.job.label_names,
                              delta=self.site.delta if self.job.dp else None)
        built = self._model(global_arrays, fingerprint)  # before planning: the plan counts its noised weights
        phase = phase_of(self.job, server_round)
        with self.ledger_file.open() as ledger:
            self._check_egress(ledger)
            try:
                this_job = self.job_id(job_id)
                self.site.policy.check_job(self.site.name, self.job)
            except PolicyError as exc:
                return self._decline(ledger, global_arrays, server_round, keys.STATUS_DECLINED_POLICY, exc)
            try:
                plan = self.plan(ledger, built.model, server_round, num_rounds, this_job)
                current = plan.phase(phase)
                if self.job.dp:
                    self._check_job_cap(ledger, this_job, current.charge)
                    self.ledger_file.charge(ledger, run_id=self.run_id, server_round=server_round,
                                            charge=current.charge, job_id=this_job)
            except BudgetExhaustedError as exc:
                return self._decline(ledger, global_arrays, server_round, keys.STATUS_DECLINED_BUDGET, exc)
            metrics = self._base_metrics(ledger, keys.STATUS_TRAINED)
        for warning in plan.warnings:
            log.warning("fit: %s", warning)
        sigma = current.noise_multiplier if self.job.dp else None
        data = self._encode(built, self.split.train_texts, self.split.train_labels)
        # Reproducible only without DP; DP sampling and noise must be unpredictable (seeded from the OS).
        seed = None if self.job.dp else zlib.crc32(f"{self.job.seed}/{server_round}/{self.site.name}".encode())
        if phase == PROBE:
            head = head_module(built.model)
            result = train_head(head, head_inputs(built.model, head, data, device()), data.labels, self.job,
                                batch_size=current.batch_size, steps=current.steps_per_round,
                                noise_multiplier=sigma, dev=device(), seed=seed)
        else:
            result = train_round(built.model, data, self.job, batch_size=current.batch_size,
                                 steps=current.steps_per_round, noise_multiplier=sigma, dev=device(), seed=seed)
        if sigma is not None and result.accountant_history != [current.charge]:
            raise PrivacyError(
                f"Site {self.site.name}: Opacus recorded {result.accountant_history}, but the ledger was charged "
                f"{[current.charge]}. Refusing to release the update."
            )
        update = subtract(get_trainable(built.model), global_arrays)
        why = check_update(update, global_arrays, max_norm=self.job.max_update_norm,
                           names=trainable_names(built.model))
        if why is not None:  # checked before SecAgg+ masks it: afterwards nobody could tell whose update broke
            raise InvalidUpdateError(f"Site {self.site.name}: refusing to send its update of round {server_round}: "
                                     f"{why}.")
        self._check_secagg_range(update, n)
        metrics.update({keys.M_NOISE: sigma if sigma is not None else 0.0, keys.M_STEPS: result.steps,
                        keys.M_TRAIN_LOSS: result.mean_loss, keys.M_TRAIN_SECONDS: result.seconds,
                        keys.M_PHASE: phase, keys.M_PLAN: json.dumps(plan.to_json())})
        return FitOutcome(update, n, metrics)

    def plan(self, ledger: Ledger, model: torch.nn.Module, server_round: int, num_rounds: int,
             job_id: str) -> Plan:
        """This department's plan for rounds `server_round`..`num_rounds` of the job, from its ledger and policy
        (`client.plan.plan_job`); `BudgetExhaustedError` when the rounds cannot fit its budget or per-job cap."""
        job_entries = self.this_jobs_entries(ledger, job_id)
        counted = {id(e) for e in job_entries}
        return plan_job(site=self.site.name, n=len(self.split.train_texts), job=self.job, server_round=server_round,
                        num_rounds=num_rounds, before=[e.charge for e in ledger.entries if id(e) not in counted],
                        job_history=[e.charge for e in job_entries], epsilon_budget=ledger.epsilon_budget,
                        delta=ledger.delta, accountant=ledger.accountant,
                        job_cap=self.site.policy.max_epsilon_per_job,
                        head_weights=count_weights(head_module(model)) if phase_of(self.job, server_round) == PROBE
                        else 0, trainable_weights=count_weights(model))

    def preview_plan(self, model: torch.nn.Module, job_id: str | None = None) -> Plan:
        """The plan this department would make at the job's first round, from its ledger as it is now (nothing
        charged): what `fedsilo simulate` prints before training. `model`: as `build_model` makes it."""
        return self.plan(self.ledger_file.read(), model, 1, self.job.num_server_rounds, self.job_id(job_id))

    def _check_egress(self, ledger: Ledger) -> None:
        """Before anything is charged: the ledger must show at least what the site's egress log recorded it had
        spent when it sent (`LedgerBehindEgressError` otherwise: a ledger with charges removed, re-checksummed)."""
        egress = egress_log_path(self.ledger_file.path)
        check_against_egress(ledger, read_egress_log_locked(egress), egress, self.ledger_file.path,
                             epsilon_recomputed=ledger.epsilon)

    def _check_job_cap(self, ledger: Ledger, job_id: str, charge: Charge) -> None:
        """Fail closed: this job's charges with `charge` added stay within the policy's per-job cap (the plan
        should already ensure it; this checks the charge that is about to be made, independently of the plan)."""
        cap = self.site.policy.max_epsilon_per_job
        if cap is None:
            return
        charges = [e.charge for e in self.this_jobs_entries(ledger, job_id)]
        after = epsilon_spent([*charges, charge], ledger.delta, ledger.accountant)
        if not math.isfinite(after) or after > cap:
            raise BudgetExhaustedError(f"Site {self.site.name}: this round would bring job {job_id}'s epsilon to "
                                       f"{after:.4g}, over the site's per-job cap {cap:g} (max_epsilon_per_job).")

    def this_jobs_entries(self, ledger: Ledger, job_id: str) -> list[LedgerEntry]:
        """The ledger entries the per-job cap counts: every charge of this job, in any of its runs (a job resumed
        after a crash runs again under a new run id, with the same job id), and, to be strict, every charge made
        in this run (should a server send different job ids within one run)."""
        return [e for e in ledger.entries if e.job_id == job_id or e.run_id == self.run_id]

    def _decline(self, ledger: Ledger, global_arrays: list[np.ndarray], server_round: int, status: str,
                 why: Exception) -> FitOutcome:
        log.warning("fit: site %s declines round %s: %s", self.site.name, server_round, why)
        metrics = self._base_metrics(ledger, status)
        metrics[keys.M_REASON] = str(why)
        return FitOutcome([np.zeros_like(a) for a in global_arrays], 0, metrics)

    def _check_secagg_range(self, update: list[np.ndarray], n: int) -> None:
        """SecAgg+ clips `update * n / max_weight` to +-clipping_range silently: detect it instead."""
        peak = max_abs(update)
        if not math.isfinite(peak):
            raise PrivacyError(f"Site {self.site.name}: the update is not finite; refusing to send it.")
        if self.job.secagg and peak * n / self.job.secagg_max_weight > self.job.secagg_clipping_range:
            raise SecureAggregationError(
                f"Site {self.site.name}: update peak {peak:.4g} x weight {n}/{self.job.secagg_max_weight:g} "
                f"exceeds secagg-clipping-range {self.job.secagg_clipping_range:g}; SecAgg+ would clip it."
            )

    def evaluate(self, global_arrays: list[np.ndarray], fingerprint: str | None) -> tuple[float, int, Metrics]:
        built = self._model(global_arrays, fingerprint)
        data = self._encode(built, self.split.test_texts, self.split.test_labels)
        result = evaluate(built.model, data, device())
        ledger = self.ledger_file.read()
        return result.loss, result.n, {keys.M_DEPARTMENT: self.site.name, keys.M_ACCURACY: result.accuracy,
                                       keys.M_CORRECT: result.correct, keys.M_EPSILON: ledger.epsilon,
                                       keys.M_DELTA: self.site.delta}
