"""A department's privacy-utility plan for a job, computed from its own ledger and policy before anything is charged.

A job has up to two phases per department:
- **probe** (the first `probe-rounds` rounds): DP-SGD on the classifier head alone, over the head's inputs computed
  once by the frozen model (a linear probe: few noised coordinates, large batches, many cheap epochs);
- **finetune** (the rounds after): DP-SGD on every trainable weight (LoRA adapters and head, or all weights).

Both phases are DP-SGD charges `(sigma, q, steps)` to the same ledger, through the same accountant. The probe is
planned to spend at most `probe-epsilon-share` of what the site may still spend on the job (its total budget, and its
per-job cap if its policy sets one); fine-tuning's noise is then planned on the history *including* the probe's
planned charges, so the two phases together stay within the budget. Every round re-plans from the ledger as it is
(a department that missed rounds gets less noise later), exactly as a single-phase job did.

Local work scales with the department: the expected batch is at most a quarter of its training rows
(`common.preflight.MIN_BATCHES_PER_EPOCH`), and a fine-tuning round takes `local-epochs` of its data within
[`min-local-steps`, `max-local-steps`] steps, so a department of 200 rows still takes useful steps and one of
100,000 does not spend hours per round.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from common.config import JobConfig
from common.errors import ConfigError
from common.privacy import Charge, LocalWork, epsilon_spent, local_work, noise_for_budget

PROBE = "probe"
FINETUNE = "finetune"
PHASES = (PROBE, FINETUNE)
# Above this, the expected L2 norm of one averaged step's noise is more than NOISY_RATIO times the largest signal a
# step can carry (the clip norm): the plan warns that noise will swamp the signal.
NOISY_RATIO = 10.0


def probe_work(n: int, job: JobConfig) -> LocalWork:
    return local_work(n, job.probe_batch_size, job.probe_epochs)


def finetune_work(n: int, job: JobConfig) -> LocalWork:
    return local_work(n, job.batch_size, job.local_epochs, min_steps=job.min_local_steps,
                      max_steps=job.max_local_steps)


def phase_of(job: JobConfig, server_round: int) -> str:
    return PROBE if server_round <= job.probe_rounds else FINETUNE


@dataclass(frozen=True)
class PhasePlan:
    """One phase's remaining rounds at a department, and what each of them charges."""

    phase: str
    rounds: int  # rounds of this phase still to come in the job, the current one included
    batch_size: int  # the plain loader's batch (Opacus samples each row with rate 1 / number of such batches)
    expected_batch: float
    sample_rate: float
    steps_per_round: int
    noise_multiplier: float  # 0 without DP
    clip_norm: float
    noised_weights: int  # the coordinates DP-SGD noises in this phase

    @property
    def charge(self) -> Charge:
        """One round's ledger charge."""
        return (self.noise_multiplier, self.sample_rate, self.steps_per_round)

    @property
    def noise_ratio(self) -> float:
        """Expected L2 norm of the noise in one averaged DP-SGD step over the largest signal a step can carry (the
        clip norm): sigma * sqrt(noised weights) / expected batch."""
        return self.noise_multiplier * math.sqrt(self.noised_weights) / self.expected_batch


@dataclass(frozen=True)
class Plan:
    """A department's plan for the rest of a job, as computed before the current round's charge."""

    site: str
    n_train: int
    epsilon_budget: float
    delta: float
    epsilon_spent: float  # before the current round
    epsilon_planned: float  # after every planned round of the job (the budget, when noise was solved for it)
    phases: tuple[PhasePlan, ...]
    warnings: tuple[str, ...] = ()

    def phase(self, name: str) -> PhasePlan:
        for p in self.phases:
            if p.phase == name:
                return p
        raise ConfigError(f"The plan of site {self.site} has no {name} phase.")

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["phases"] = [{**asdict(p), "noise_ratio": p.noise_ratio} for p in self.phases]
        doc["warnings"] = list(self.warnings)
        return doc


def _remaining_rounds(job: JobConfig, server_round: int, num_rounds: int) -> dict[str, int]:
    probe_last = min(job.probe_rounds, num_rounds)
    return {PROBE: max(0, probe_last - server_round + 1),
            FINETUNE: max(0, num_rounds - max(server_round, probe_last + 1) + 1)}


def plan_job(*, site: str, n: int, job: JobConfig, server_round: int, num_rounds: int,
             before: Sequence[Charge], job_history: Sequence[Charge], epsilon_budget: float, delta: float,
             accountant: str, job_cap: float | None, head_weights: int, trainable_weights: int) -> Plan:
    """The plan for rounds `server_round`..`num_rounds`. The site's ledger holds `before` (charges of other jobs)
    and `job_history` (this job's charges, which its per-job cap counts). Raises `BudgetExhaustedError` when no
    noise lets a phase's rounds fit the budget or the cap (the site then declines the round)."""
    history = [*before, *job_history]
    rounds = _remaining_rounds(job, server_round, num_rounds)
    works = {PROBE: probe_work(n, job), FINETUNE: finetune_work(n, job)}
    weights = {PROBE: head_weights, FINETUNE: trainable_weights}
    sigmas = {PROBE: 0.0, FINETUNE: 0.0}
    planned_all, planned_job = list(history), list(job_history)
    if job.dp:
        for phase in PHASES:
            if not rounds[phase]:
                continue
            work = works[phase]
            steps = work.steps * rounds[phase]
            last = phase == FINETUNE or not rounds[FINETUNE]  # the last phase may use all that is left
            share = 1.0 if last else job.probe_epsilon_share
            # a later round re-plans the rest of the job: its last charge at this rate is within a tolerance or two
            # of the answer (common.privacy.noise_for_budget's hint)
            hint = next((s for s, q, _ in reversed(job_history) if q == work.sample_rate), None)
            sigma = _noise(planned_all, epsilon_budget, share, delta, work.sample_rate, steps, accountant,
                           before=before, hint=hint)
            if job_cap is not None:
                sigma = max(sigma, _noise(planned_job, job_cap, share, delta, work.sample_rate, steps, accountant,
                                          before=[], hint=hint))
            sigmas[phase] = sigma
            planned_all.append((sigma, work.sample_rate, steps))
            planned_job.append((sigma, work.sample_rate, steps))
    phases = tuple(PhasePlan(phase=phase, rounds=rounds[phase], batch_size=works[phase].batch_size,
                             expected_batch=works[phase].expected_batch,
                             sample_rate=works[phase].sample_rate, steps_per_round=works[phase].steps,
                             noise_multiplier=sigmas[phase], clip_norm=job.clip_norm,
                             noised_weights=weights[phase])
                   for phase in PHASES if rounds[phase])
    spent = epsilon_spent(history, delta, accountant)
    planned = epsilon_spent(planned_all, delta, accountant)
    warnings = tuple(w for p in phases if (w := noise_warning(site, n, p, epsilon_budget)))
    return Plan(site=site, n_train=n, epsilon_budget=epsilon_budget, delta=delta, epsilon_spent=spent,
                epsilon_planned=planned, phases=phases, warnings=warnings)


def _noise(history: list[Charge], budget: float, share: float, delta: float, q: float, steps: int, accountant: str,
           *, before: Sequence[Charge], hint: float | None) -> float:
    """Noise for `steps` more steps at rate `q` after `history`, within `share` of what the budget leaves after
    `before` (the site's spending before this job; with share 1: within the budget)."""
    target = budget
    if share < 1:
        spent_before = epsilon_spent(before, delta, accountant)
        target = spent_before + share * max(0.0, budget - spent_before)
    return noise_for_budget(history=history, epsilon_budget=target, delta=delta, q=q, steps=steps,
                            accountant=accountant, hint=hint)


def noise_warning(site: str, n: int, phase: PhasePlan, epsilon_budget: float) -> str | None:
    """A warning when DP noise would swamp the signal of `phase`, saying what would help; None otherwise."""
    if phase.noise_multiplier == 0 or phase.noise_ratio <= NOISY_RATIO:
        return None
    return (f"Site {site}, {phase.phase} phase: one averaged DP-SGD step's noise is about {phase.noise_ratio:.0f}x "
            f"the largest signal it can carry (noise multiplier {phase.noise_multiplier:.3g}, expected batch "
            f"{phase.expected_batch:.0f} of {n} rows, {phase.noised_weights:,} noised weights): the model will "
            f"learn little. What would help: more training rows (larger batches), fewer trainable weights (a "
            f"lower lora-r, or the probe alone: probe-rounds = num-server-rounds), or a larger epsilon budget "
            f"than {epsilon_budget:g}.")


def format_plans(plans: Sequence[Plan]) -> str:
    """The plans as a table, one line per department and phase, then any warnings."""
    lines = [f"{'department':<16} {'rows':>6} {'phase':<8} {'rounds':>6} {'batch':>6} {'steps/rd':>8} "
             f"{'sigma':>7} {'noise/clip':>10} {'eps after':>9}"]
    for plan in plans:
        for p in plan.phases:
            sigma = f"{p.noise_multiplier:.3g}" if p.noise_multiplier else "-"
            ratio = f"{p.noise_ratio:.2f}" if p.noise_multiplier else "-"
            lines.append(f"{plan.site:<16.16} {plan.n_train:>6} {p.phase:<8} {p.rounds:>6} {p.expected_batch:>6.0f} "
                         f"{p.steps_per_round:>8} {sigma:>7} {ratio:>10} {plan.epsilon_planned:>9.3g}")
    lines.extend(f"warning: {w}" for plan in plans for w in plan.warnings)
    return "\n".join(lines)
