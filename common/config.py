"""Typed, frozen job and simulation configs, validated once at the edge (`from_run_config`).

Nothing else in fedsilo reads Flower's `run_config` directly. A bad value raises `ConfigError` naming the key.
Site facts (data location, privacy budget, ledger path) are *not* part of the job config: in deployment they come
from the site's own config file; `SimulationConfig` describes the sites the operator simulates on one machine.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from common.errors import ConfigError

FINETUNE_MODES = ("lora", "full")
GRAD_SAMPLE_MODES = ("ghost", "hooks", "functorch")
OPTIMIZERS = ("adam", "sgd")
ACCOUNTANTS = ("rdp", "prv", "gdp")

RunConfig = Mapping[str, bool | int | float | str]


def _get(rc: RunConfig, key: str, kind: type, default: Any) -> Any:
    """Read `key` from a run config as `kind`, accepting ints for floats and 'true'/'false' strings for bools."""
    if key not in rc:
        return default
    value = rc[key]
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"Config key '{key}' must be true or false, got {value!r}.")
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"Config key '{key}' must be a number, got {value!r}.")
        if not math.isfinite(float(value)):
            raise ConfigError(f"Config key '{key}' must be finite, got {value!r}.")
        return float(value)
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"Config key '{key}' must be an integer, got {value!r}.")
        return value
    if not isinstance(value, str):
        raise ConfigError(f"Config key '{key}' must be a string, got {value!r}.")
    return value


def _key(field_name: str) -> str:
    return field_name.replace("_", "-")


def _check_positive(key: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"Config key '{key}' must be positive, got {value}.")


def _parse_fields(cls: type, rc: RunConfig) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fields(cls):
        kind = {"bool": bool, "int": int, "float": float, "str": str}[str(f.type)]
        out[f.name] = _get(rc, _key(f.name), kind, f.default)
    return out


@dataclass(frozen=True)
class JobConfig:
    """What the operator's job asks every department to do. Defaults are tuned for the 2-core default run."""

    num_server_rounds: int = 4  # federated rounds
    model: str = "minilm"  # "minilm" (packaged all-MiniLM-L6-v2), "tiny-random", or a local HF model directory
    finetune: str = "lora"  # "lora": adapter + classifier trained and exchanged; "full": every weight
    lora_r: int = 8  # LoRA rank
    lora_alpha: int = 16  # LoRA scaling numerator
    max_length: int = 64  # tokens per text after truncation
    batch_size: int = 64  # expected (Poisson) batch size
    learning_rate: float = 5e-3  # local learning rate
    optimizer: str = "adam"  # local optimizer: "adam" or "sgd" (momentum 0.9)
    local_epochs: float = 0.25  # fraction of a department's training data visited per round
    clip_norm: float = 1.0  # per-example gradient clipping norm (DP-SGD)
    max_update_norm: float = 1000.0  # L2 bound on one department's update: checked on site before masking, and by
    # the server (each update without SecAgg+, the aggregate with it); generous: LoRA updates here stay below ~20
    dp: bool = True  # DP-SGD on; off only for baselines
    grad_sample_mode: str = "hooks"  # Opacus per-sample gradient mode (hooks: fastest for LoRA here)
    secagg: bool = True  # SecAgg+ on
    secagg_num_shares: float = 1.0  # fraction of sampled departments each key is shared with
    secagg_reconstruction_threshold: float = 0.67  # fraction of shares needed to reconstruct
    secagg_max_weight: float = 10000.0  # largest number of examples one department may weigh in with
    secagg_clipping_range: float = 1.0  # |update * n / max_weight| must stay below this (checked on site)
    secagg_quantization_range: int = 2**22  # quantization levels
    labels: str = ""  # comma-separated class names, in label-index order
    seed: int = 0  # base seed (model init for tiny-random, sampling)
    min_departments: int = 2  # departments that must be online before a round starts
    out_dir: str = ""  # where the server writes report, CSV, plots and checkpoints ("" = none)
    resume: bool = False  # continue the run whose checkpoint is in out-dir (`--resume`), from its last round
    round_retries: int = 1  # times a round whose secure aggregation halted is retried before it counts as failed
    stage_timeout: float = 1800.0  # seconds the server waits for replies to one message exchange (a SecAgg+ stage,
    # training, evaluation); a department still silent then counts as dropped for the round. Flower waits for the
    # message's TTL (12 h) otherwise when a department's node stays up but its ClientApp hangs or never replies.

    @classmethod
    def from_run_config(cls, rc: RunConfig) -> JobConfig:
        cfg = cls(**_parse_fields(cls, rc))
        cfg.validate()
        return cfg

    @property
    def label_names(self) -> tuple[str, ...]:
        return tuple(x.strip() for x in self.labels.split(",") if x.strip())

    def validate(self) -> None:
        if self.num_server_rounds < 1:
            raise ConfigError(f"Config key 'num-server-rounds' must be at least 1, got {self.num_server_rounds}.")
        if self.finetune not in FINETUNE_MODES:
            raise ConfigError(f"Config key 'finetune' must be one of {FINETUNE_MODES}, got {self.finetune!r}.")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"Config key 'optimizer' must be one of {OPTIMIZERS}, got {self.optimizer!r}.")
        if self.grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ConfigError(
                f"Config key 'grad-sample-mode' must be one of {GRAD_SAMPLE_MODES}, got {self.grad_sample_mode!r}."
            )
        for key, value in (
            ("lora-r", self.lora_r),
            ("lora-alpha", self.lora_alpha),
            ("max-length", self.max_length),
            ("batch-size", self.batch_size),
            ("learning-rate", self.learning_rate),
            ("local-epochs", self.local_epochs),
            ("clip-norm", self.clip_norm),
            ("max-update-norm", self.max_update_norm),
            ("stage-timeout", self.stage_timeout),
            ("secagg-max-weight", self.secagg_max_weight),
            ("secagg-clipping-range", self.secagg_clipping_range),
            ("secagg-quantization-range", self.secagg_quantization_range),
        ):
            _check_positive(key, value)
        if self.max_length > 512:
            raise ConfigError(f"Config key 'max-length' must be at most 512, got {self.max_length}.")
        if not 0 < self.secagg_num_shares <= 1:
            raise ConfigError("Config key 'secagg-num-shares' must be a fraction in (0, 1].")
        if not 0 < self.secagg_reconstruction_threshold <= 1:
            raise ConfigError("Config key 'secagg-reconstruction-threshold' must be a fraction in (0, 1].")
        if self.secagg_quantization_range >= 2**32:
            raise ConfigError("Config key 'secagg-quantization-range' must be below the SecAgg+ modulus 2**32.")
        if self.round_retries < 0:
            raise ConfigError(f"Config key 'round-retries' must be at least 0, got {self.round_retries}.")
        if self.resume and not self.out_dir:
            raise ConfigError("Config key 'resume' needs 'out-dir': the directory holding the run's checkpoint.")
        if self.min_departments < 1:
            raise ConfigError(f"Config key 'min-departments' must be at least 1, got {self.min_departments}.")
        if self.secagg and self.min_departments < 2:
            raise ConfigError("SecAgg+ needs at least 2 departments per round: set 'min-departments' >= 2.")
        names = self.label_names
        if self.labels and len(names) < 2:
            raise ConfigError(f"Config key 'labels' must name at least 2 classes, got {self.labels!r}.")
        if len(set(names)) != len(names):
            raise ConfigError(f"Config key 'labels' has duplicates: {self.labels!r}.")


@dataclass(frozen=True)
class SimulationConfig:
    """The sites an operator simulates on one machine (simulation only; deployment sites own their config)."""

    sim_data: str = "hutto"  # "hutto" (the four Hutto ICWSM-2014 corpora) or a CSV/TSV/JSONL/Parquet file
    sim_text_column: str = "text"
    sim_label_column: str = "label"
    sim_department_column: str = "department"
    sim_test_fraction: float = 0.2  # per-department held-out share
    sim_epsilon: float = 8.0  # every simulated site's budget epsilon ...
    sim_delta: float = 1e-5  # ... and delta
    sim_site_epsilons: str = ""  # per-site overrides, "name=eps,name=eps"
    sim_global_eval: bool = True  # server also evaluates on the union of department test splits

    @classmethod
    def from_run_config(cls, rc: RunConfig) -> SimulationConfig:
        cfg = cls(**_parse_fields(cls, rc))
        cfg.validate()
        return cfg

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
                raise ConfigError(
                    f"Config key 'sim-site-epsilons' must look like 'name=eps,name=eps' with eps > 0, got {item!r}."
                )
            out[name.strip()] = eps
        return out

    def validate(self) -> None:
        _check_positive("sim-epsilon", self.sim_epsilon)
        if not 0 < self.sim_delta < 1:
            raise ConfigError(f"Config key 'sim-delta' must be in (0, 1), got {self.sim_delta}.")
        if not 0 < self.sim_test_fraction < 1:
            raise ConfigError(f"Config key 'sim-test-fraction' must be in (0, 1), got {self.sim_test_fraction}.")
        self.site_epsilon_overrides()


def check_known_keys(rc: RunConfig) -> None:
    """Reject keys that neither config knows (flwr does this for `flwr run`; the CLI path must too)."""
    known = {_key(f.name) for f in fields(JobConfig)} | {_key(f.name) for f in fields(SimulationConfig)}
    unknown = sorted(set(rc) - known)
    if unknown:
        raise ConfigError(f"Unknown config key(s): {', '.join(unknown)}. Known keys: {', '.join(sorted(known))}.")


def as_run_config(*configs: JobConfig | SimulationConfig) -> dict[str, bool | int | float | str]:
    """The run-config view (kebab-case keys) of resolved configs, e.g. for reports."""
    return {_key(f.name): getattr(cfg, f.name) for cfg in configs for f in fields(cfg)}
