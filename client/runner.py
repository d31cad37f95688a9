"""What a department does when asked to train or evaluate: pure of Flower (the ClientApp wraps it).

Order of operations for a training round, all on site:
1. resolve the site's own config and check the job against it (labels, DP, data usable, model fingerprint);
2. check the site's ledger against its egress log (it must not show less spent than was recorded on the way out),
   plan the round's DP charge from the ledger, the site's budget and its per-job cap, decline if it does not fit;
3. charge the ledger (atomically) *before* training, so a crash can only over-count;
4. train with DP-SGD, check Opacus recorded exactly the charged steps;
5. check the update (arrays, finiteness, norm bound) before SecAgg+ masks it;
6. return the update (trainable weights minus global weights) and aggregate metrics only.
"""

from __future__ import annotations

import logging
import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from client.egress_log import check_against_egress, egress_log_path, read_egress_log_locked
from client.ledger import Ledger, LedgerFile
from client.site import SiteConfig
from client.train import train_round
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
from common.model import BuiltModel, base_fingerprint, build_model, device, trainable_names
from common.params import get_trainable, max_abs, set_trainable, subtract
from common.preflight import check_department_data
from common.privacy import Charge, epsilon_spent, noise_for_budget, sample_rate, steps_per_round
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

    @property
    def split(self) -> Split:
        if self._split is None:
            self._split = self.site.load_split(self.job.label_names)
        return self._split

    def _model(self, global_arrays: list[np.ndarray], fingerprint: str | None) -> BuiltModel:
        built = build_model(self.job, len(self.job.label_names))
        if fingerprint is not None and base_fingerprint(built.model) != fingerprint:
            raise ModelError(
                f"Site {self.site.name}: the frozen base model here differs from the server's "
                "(fingerprint mismatch); refusing to combine updates from different models."
            )
        set_trainable(built.model, global_arrays)
        return built

    def _encode(self, built: BuiltModel, texts: list[str], labels: np.ndarray) -> Encoded:
        return encode(built.tokenizer, texts, labels, self.job.max_length)

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
                              batch_size=self.job.batch_size, delta=self.site.delta if self.job.dp else None)
        q = sample_rate(self.job.batch_size, n)
        steps = steps_per_round(self.job.local_epochs, q)
        with self.ledger_file.open() as ledger:
            self._check_egress(ledger)
            try:
                this_job = self.job_id(job_id)
                self.site.policy.check_job(self.site.name, self.job)
            except PolicyError as exc:
                return self._decline(ledger, global_arrays, server_round, keys.STATUS_DECLINED_POLICY, exc)
            sigma: float | None = None
            if self.job.dp:
                try:
                    sigma = self._plan_noise(ledger, q, steps * max(1, num_rounds - server_round + 1), this_job)
                    self._check_job_cap(ledger, this_job, (sigma, q, steps))
                    self.ledger_file.charge(ledger, run_id=self.run_id, server_round=server_round,
                                            charge=(sigma, q, steps), job_id=this_job)
                except BudgetExhaustedError as exc:
                    return self._decline(ledger, global_arrays, server_round, keys.STATUS_DECLINED_BUDGET, exc)
            metrics = self._base_metrics(ledger, keys.STATUS_TRAINED)
        built = self._model(global_arrays, fingerprint)
        data = self._encode(built, self.split.train_texts, self.split.train_labels)
        # Reproducible only without DP; DP sampling and noise must be unpredictable (seeded from the OS).
        seed = None if self.job.dp else zlib.crc32(f"{self.job.seed}/{server_round}/{self.site.name}".encode())
        result = train_round(built.model, data, self.job, steps=steps, noise_multiplier=sigma, dev=device(),
                             seed=seed)
        if sigma is not None and result.accountant_history != [(sigma, q, steps)]:
            raise PrivacyError(
                f"Site {self.site.name}: Opacus recorded {result.accountant_history}, but the ledger was charged "
                f"{[(sigma, q, steps)]}. Refusing to release the update."
            )
        update = subtract(get_trainable(built.model), global_arrays)
        why = check_update(update, global_arrays, max_norm=self.job.max_update_norm,
                           names=trainable_names(built.model))
        if why is not None:  # checked before SecAgg+ masks it: afterwards nobody could tell whose update broke
            raise InvalidUpdateError(f"Site {self.site.name}: refusing to send its update of round {server_round}: "
                                     f"{why}.")
        self._check_secagg_range(update, n)
        metrics.update({keys.M_NOISE: sigma if sigma is not None else 0.0, keys.M_STEPS: result.steps,
                        keys.M_TRAIN_LOSS: result.mean_loss, keys.M_TRAIN_SECONDS: result.seconds})
        return FitOutcome(update, n, metrics)

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
        after = epsilon_spent([*self.this_jobs_charges(ledger, job_id), charge], ledger.delta, ledger.accountant)
        if not math.isfinite(after) or after > cap:
            raise BudgetExhaustedError(f"Site {self.site.name}: this round would bring job {job_id}'s epsilon to "
                                       f"{after:.4g}, over the site's per-job cap {cap:g} (max_epsilon_per_job).")

    def this_jobs_charges(self, ledger: Ledger, job_id: str) -> list[Charge]:
        """The charges the per-job cap counts: every charge of this job, in any of its runs (a job resumed after a
        crash runs again under a new run id, with the same job id), and, to be strict, every charge made in this
        run (should a server send different job ids within one run)."""
        return [e.charge for e in ledger.entries if e.job_id == job_id or e.run_id == self.run_id]

    def _plan_noise(self, ledger: Ledger, q: float, steps: int, job_id: str | None = None) -> float:
        """Noise for `steps` more steps that keeps the site within its total budget and, when its policy caps
        one job's spending, this job's own charges (`this_jobs_charges`) within that cap (the larger noise
        satisfies both)."""
        sigma = noise_for_budget(history=ledger.history, epsilon_budget=ledger.epsilon_budget, delta=ledger.delta,
                                 q=q, steps=steps, accountant=ledger.accountant)
        cap = self.site.policy.max_epsilon_per_job
        if cap is not None:
            this_job = self.this_jobs_charges(ledger, job_id or self.run_id)
            sigma = max(sigma, noise_for_budget(history=this_job, epsilon_budget=cap, delta=ledger.delta, q=q,
                                                steps=steps, accountant=ledger.accountant))
        return sigma

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
