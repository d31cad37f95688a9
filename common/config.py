"""Typed, frozen job and simulation configs that check themselves when constructed (`common.settings`).

Nothing else in fedsilo reads Flower's `run_config` directly: `from_run_config` parses it, with the same checks as
direct construction, so a bad value raises the same `ConfigError` naming the key either way. Each field's help text
is declared with the field and is what `--help` (`run_config_help`) and docs/configuration.md show.
Site facts (data location, privacy budget, ledger path) are *not* part of the job config: in deployment they come
from the site's own config file; `SimulationConfig` describes the sites the operator simulates on one machine.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from common.errors import ConfigError
from common.settings import Settings, as_mapping, format_keys, known_keys, load, option, settings_fields

FINETUNE_MODES = ("lora", "full")
GRAD_SAMPLE_MODES = ("ghost", "hooks", "functorch")
OPTIMIZERS = ("adam", "sgd")
ACCOUNTANTS = ("rdp", "prv", "gdp")
SECAGG_MODULUS = 2**32

RunConfig = Mapping[str, bool | int | float | str]
JOB_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
JOB_ID_MAX = 64
# The default SecAgg+ neighbourhood: every department up to 31, above that 31 (Bell et al., CCS 2020: a
# neighbourhood of O(log n) departments suffices; Shamir sharing costs grow with its size).
SECAGG_NEIGHBOURHOOD = 31


def _job_id(value: str) -> str:
    """A job id as given ("" stays ""): short and plain, since it travels in every fit config and every ledger."""
    if len(value) > JOB_ID_MAX or not set(value) <= JOB_ID_CHARS:
        raise ValueError(f"must be at most {JOB_ID_MAX} letters, digits, '.', '_' or '-', got {value!r}")
    return value


def _num_shares(value: float) -> float:
    """`secagg-num-shares` as Flower's SecAggPlusWorkflow reads it: a fraction (<= 1) stays a float, a count (> 1)
    becomes an int. A count is odd: Flower's neighbour ring is the department and as many on each side."""
    if value <= 1:
        return value
    if not value.is_integer():
        raise ValueError(f"must be a fraction of the departments (at most 1) or a whole number of departments, "
                         f"got {value:g}")
    count = int(value)
    if count < 3 or count % 2 == 0:
        raise ValueError(f"as a number of departments must be odd and at least 3 (the department and as many "
                         f"neighbours on each side), got {count}")
    return count


def _majority(value: float) -> float:
    """`secagg-reconstruction-threshold`, refused unless above half of a neighbourhood (fails closed)."""
    if value <= 0.5:
        raise ValueError(f"must be above 0.5, got {value:g}: the server decides which departments it reports as "
                         f"dropped, so with a threshold of half a neighbourhood or less it can collect both halves "
                         f"of a department's secrets (its self-mask and its key) from different neighbours and "
                         f"unmask that department's update without any colluder")
    return value


@dataclass(frozen=True)
class JobConfig(Settings):
    """What the operator's job asks every department to do. Defaults are tuned for the 2-core default run."""

    label: ClassVar[str] = "Config key"
    dashes: ClassVar[bool] = True

    num_server_rounds: int = option(4, help="federated rounds", ge=1)
    evaluate_every: int = option(1, help="federated evaluation every this many rounds, and always in the last "
                                 "round; rounds without it record no accuracy", ge=1)
    model: str = option("minilm", help='"minilm" (the packaged all-MiniLM-L6-v2), "tiny-random", or a local '
                                       "Hugging Face model directory")
    finetune: str = option("lora", help='"lora": LoRA adapters and the classifier are trained and exchanged; '
                                        '"full": every weight', choices=FINETUNE_MODES)
    lora_r: int = option(8, help="LoRA rank", gt=0)
    lora_alpha: int = option(16, help="LoRA scaling numerator", gt=0)
    lora_freeze_a: bool = option(False, help="FFA-LoRA (Sun et al., ICLR 2024): LoRA's A matrices stay at their "
                                 "seeded initialisation (the same at every department) and only B trains: half the "
                                 "noised adapter weights, and averaging B across departments is exact")
    max_length: int = option(64, help="tokens per text after truncation", gt=0, le=512)
    batch_size: int = option(64, help="expected (Poisson) batch size of DP-SGD", gt=0)
    learning_rate: float = option(5e-3, help="local learning rate", gt=0)
    optimizer: str = option("adam", help='local optimizer: "adam", or "sgd" (momentum 0.9)', choices=OPTIMIZERS)
    local_epochs: float = option(0.25, help="fraction of a department's training data visited per round (within "
                                 "min-local-steps and max-local-steps)", gt=0)
    min_local_steps: int = option(10, help="fewest DP-SGD steps a department takes per fine-tuning round: a small "
                                  "department visits its data more than local-epochs, since extra DP steps cost "
                                  "little epsilon", ge=1)
    max_local_steps: int = option(100, help="most DP-SGD steps a department takes per fine-tuning round: a large "
                                  "department visits less than local-epochs (0: no bound)", ge=0)
    probe_rounds: int = option(1, help="rounds, at the start of a job, in which each department trains only the "
                               "classifier head, with DP, on the frozen model's cached head inputs (a linear probe; "
                               "fine-tuning then starts from its head); 0: none", ge=0)
    probe_epochs: float = option(20.0, help="epochs of a department's training data the probe visits per probe "
                                 "round", gt=0)
    probe_batch_size: int = option(256, help="expected (Poisson) batch size of the probe (at most a quarter of a "
                                   "department's training rows)", gt=0)
    probe_learning_rate: float = option(0.01, help="the probe's learning rate (Adam)", gt=0)
    probe_epsilon_share: float = option(0.25, help="share of what a site may still spend on the job that the probe "
                                        "phase is planned to use (fine-tuning gets the rest)", gt=0, lt=1)
    clip_norm: float = option(1.0, help="per-example gradient clipping norm (DP-SGD)", gt=0)
    max_update_norm: float = option(1000.0, help="L2 bound on one department's update: checked on site before "
                                    "masking, and by the server (each update without SecAgg+, the aggregate with "
                                    "it); generous: LoRA updates here stay below ~20", gt=0)
    dp: bool = option(True, help="DP-SGD on; off only for baselines")
    grad_sample_mode: str = option("hooks", help="Opacus per-sample gradient mode (hooks: fastest for LoRA here)",
                                   choices=GRAD_SAMPLE_MODES)
    secagg: bool = option(True, help="SecAgg+ secure aggregation on (needs min-departments >= 2)")
    secagg_num_shares: float = option(
        SECAGG_NEIGHBOURHOOD, help="each department's SecAgg+ neighbourhood (the departments its mask keys are "
        "secret-shared with, itself included): a whole number N > 1 is that many departments (every department "
        "when a round samples N or fewer), a fraction <= 1 that fraction of the departments sampled",
        gt=0, convert=_num_shares, note="a fraction in (0, 1], or an odd whole number, at least 3")
    secagg_reconstruction_threshold: float = option(
        0.67, help="fraction of a neighbourhood's shares needed to reconstruct a department's mask keys; above 0.5, "
        "since the server chooses whom it reports as dropped: with a threshold of t shares among k neighbours it "
        "can unmask one department with 2t - k colluding neighbours (t if it follows the protocol), and a "
        "neighbourhood still unmasks with k - t of its departments dropped", le=1, convert=_majority,
        note="above 0.5")
    secagg_max_weight: float = option(10000.0, help="largest number of examples one department may weigh in "
                                      "with", gt=0)
    secagg_clipping_range: float = option(4.0, help="|update * n / max_weight| must stay below this (checked on "
                                          "site); a probe round's head update reaches about 1", gt=0)
    secagg_quantization_range: int = option(2**22, help="quantization levels (below the SecAgg+ modulus 2**32)",
                                            gt=0, lt=SECAGG_MODULUS)
    labels: str = option("", help="comma-separated class names, in label-index order (\"\": the simulation "
                         "data's label set)", note="at least 2 distinct names, or empty")
    seed: int = option(0, help="base seed (model initialisation for tiny-random, sampling)")
    min_departments: int = option(2, help="departments that must be online before a round starts", ge=1,
                                  note="at least 2 with secagg")
    out_dir: str = option("", help='where the server writes report, CSV, plots and checkpoints ("": none)')
    resume: bool = option(False, help="continue the run whose checkpoint is in out-dir (`--resume`), from its last "
                          "round", note="needs out-dir")
    job_id: str = option("", help="the job's identity, kept across `--resume`: each site counts its per-job epsilon "
                         "cap (policy max_epsilon_per_job) over every charge of this job, in whichever run it was "
                         'made; "": the server generates one when the job starts (a resume keeps the checkpoint\'s)',
                         convert=_job_id, note="up to 64 letters, digits, '.', '_' or '-'")
    round_retries: int = option(1, help="times a round whose secure aggregation halted is retried before it "
                                "counts as failed", ge=0)
    max_idle_rounds: int = option(3, help="end the job early (report outcome ended_early, non-zero exit) after "
                                  "this many consecutive rounds in which fewer than min-departments trained "
                                  "(declined, failed or dropped); 0: never", ge=0)
    stage_timeout: float = option(1800.0, help="seconds the server waits for replies to one message exchange (a "
                                  "SecAgg+ stage, training, evaluation); a department still silent then counts as "
                                  "dropped for the round (otherwise Flower waits for the message's TTL, 12 h, when "
                                  "a department's node stays up but its ClientApp hangs)", gt=0)

    @classmethod
    def from_run_config(cls, rc: RunConfig) -> JobConfig:
        """This config's keys of a run config (other keys are ignored: see `check_known_keys`)."""
        return load(cls, rc, lenient=True, ignore_unknown=True)

    @property
    def label_names(self) -> tuple[str, ...]:
        return tuple(x.strip() for x in self.labels.split(",") if x.strip())

    def check(self) -> None:
        if self.resume and not self.out_dir:
            raise self.invalid("resume", "needs 'out-dir': the directory holding the run's checkpoint")
        if self.secagg and self.min_departments < 2:
            raise self.invalid("min_departments", "must be at least 2 with SecAgg+ (it needs at least 2 "
                               f"departments per round), got {self.min_departments}")
        if self.max_local_steps and self.max_local_steps < self.min_local_steps:
            raise self.invalid("max_local_steps", f"must be 0 or at least min-local-steps "
                               f"({self.min_local_steps}), got {self.max_local_steps}")
        names = self.label_names
        if self.labels and len(names) < 2:
            raise self.invalid("labels", f"must name at least 2 classes, got {self.labels!r}")
        if len(set(names)) != len(names):
            raise self.invalid("labels", f"has duplicates: {self.labels!r}")


@dataclass(frozen=True)
class SimulationConfig(Settings):
    """The sites an operator simulates on one machine (simulation only; deployment sites own their config)."""

    label: ClassVar[str] = "Config key"
    dashes: ClassVar[bool] = True

    sim_data: str = option("hutto", help='"hutto" (the four Hutto ICWSM-2014 corpora), "hutto-small" (6 '
                           "departments of 400 Hutto rows, 3 classes: the small-department scenario) or a "
                           "CSV/TSV/JSONL/Parquet file split into departments")
    sim_text_column: str = option("text", help="text column of sim-data")
    sim_label_column: str = option("label", help="label column of sim-data")
    sim_department_column: str = option("department", help="department column of sim-data")
    sim_test_fraction: float = option(0.2, help="per-department held-out share for evaluation", gt=0, lt=1)
    sim_split_seed: int = option(-1, help="seed of every simulated department's train/test split (-1: the job's "
                                 "seed); the utility study holds it at its base seed, so every repeat tests on the "
                                 "same rows, which its tuning never sees", ge=-1)
    sim_epsilon: float = option(8.0, help="every simulated site's privacy budget epsilon ...", gt=0)
    sim_delta: float = option(1e-5, help="... and delta", gt=0, lt=1)
    sim_site_epsilons: str = option("", help='per-site budget overrides, "name=eps,name=eps"', note="eps > 0")
    sim_global_eval: bool = option(True, help="the server also evaluates on the union of the departments' test "
                                   "splits")

    @classmethod
    def from_run_config(cls, rc: RunConfig) -> SimulationConfig:
        """This config's keys of a run config (other keys are ignored: see `check_known_keys`)."""
        return load(cls, rc, lenient=True, ignore_unknown=True)

    def site_epsilon(self, department: str) -> float:
        return self.site_epsilon_overrides().get(department, self.sim_epsilon)

    def site_epsilon_overrides(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for item in filter(None, (x.strip() for x in self.sim_site_epsilons.split(","))):
            name, sep, value = item.partition("=")
            try:
                eps = float(value)
            except ValueError:
                eps = float("nan")
            if not sep or not name.strip() or not math.isfinite(eps) or eps <= 0:
                raise self.invalid("sim_site_epsilons", f"must look like 'name=eps,name=eps' with eps > 0, got "
                                                        f"{item!r}")
            out[name.strip()] = eps
        return out

    def check(self) -> None:
        self.site_epsilon_overrides()


RUN_CONFIGS: tuple[type[Settings], ...] = (JobConfig, SimulationConfig)


def check_known_keys(rc: RunConfig) -> None:
    """Reject keys that neither config knows (flwr does this for `flwr run`; the CLI path must too)."""
    known = known_keys(*RUN_CONFIGS)
    unknown = sorted(set(rc) - known)
    if unknown:
        raise ConfigError(f"Unknown config key(s): {', '.join(unknown)}. Known keys: {', '.join(sorted(known))}.")


def as_run_config(*configs: JobConfig | SimulationConfig) -> dict[str, bool | int | float | str]:
    """The run-config view (kebab-case keys) of resolved configs, e.g. for reports."""
    return as_mapping(*configs)


def run_config_help(width: int = 100) -> str:
    """Every run-config key with its type, default, allowed values and help text: a plain-text block for an
    argparse epilog (with `argparse.RawDescriptionHelpFormatter`)."""
    return ("run-config keys (-c KEY=VALUE; the defaults are pyproject.toml's [tool.flwr.app.config]):\n"
            + format_keys(*RUN_CONFIGS, width=width))


def run_config_key_help(key: str) -> str:
    """The help text of one run-config key (e.g. for a flag that sets it); ConfigError for an unknown key."""
    for cls in RUN_CONFIGS:
        for f in settings_fields(cls):
            if f.key == key:
                return f.spec.help
    raise ConfigError(f"Unknown config key {key!r}.")
